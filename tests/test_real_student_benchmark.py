"""benchmarks/real_student: the task and teachers as designed, and its --quick smoke test on the real student."""

from __future__ import annotations

import json
import random
import re

import pytest

from helpers import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("real_student/run.py")


def final(text: str) -> int:
    return int(re.findall(r"####\s*(-?\d+)", text)[-1])


def test_teachers_share_the_answer_line_and_only_the_noisy_one_is_wrong(bench):
    """Both regimes: every teacher ends with ``#### <n>``, only the noisy one is ever wrong, and the formats
    regime's traces differ from their first word."""
    import task  # benchmarks/real_student/task.py, on the path once the benchmark is loaded

    pool, held = task.split()
    assert len(held) == 300 and not {(p.a, p.b, p.c) for p in held} & {(p.a, p.b, p.c) for p in pool}
    problems = random.Random(0).sample(pool, 200)
    for teacher in {t for teachers in task.REGIMES.values() for t in teachers}:
        rows = task.teacher_dataset(teacher, problems, seed=0)
        answers = [final(row["completion"][0]["content"]) for row in rows]
        wrong = sum(a != p.answer for a, p in zip(answers, problems)) / len(problems)
        if teacher == "noisy":
            assert 0.25 < wrong < 0.45
        else:
            assert wrong == 0
        assert all(row["prompt"][0]["role"] == "user" for row in rows)
    right = task.trace("right", task.Problem(47, 25, 38), random.Random(0))
    assert right.splitlines()[0] == "25 + 38 = 63"  # another path than the left-to-right teachers
    firsts = [task.trace(t, task.Problem(47, 25, 38), random.Random(0)).split()[0] for t in task.REGIMES["formats"]]
    assert firsts == ["47", "First", "Ones:", "(40"]
    column = task.trace("column", task.Problem(47, 25, 38), random.Random(0)).splitlines()
    assert column[:2] == ["Ones: 7 + 5 + 8 = 20, write 0, carry 2.", "Tens: 4 + 2 + 3 + 2 = 11, write 11."]


def test_the_second_task_is_products_with_the_shared_regimes_kind_of_teachers(bench):
    """The multiply regime (issue 39's second task): its own split of products, the same four kinds of teacher,
    every trace ending with the product's line except the noisy teacher's slips; the sums' split is untouched."""
    import task

    pool, held = task.split(regime="multiply")
    assert len(held) == 300 and len(pool) == 2700 and not set(held) & set(pool)
    assert all(isinstance(p, task.Product) and p.b % 10 > 1 and p.b // 10 > 1 for p in pool + held)
    assert task.split()[1][0] == task.Problem(66, 24, 10)  # the sums' held-out problems as before
    problems = random.Random(0).sample(pool, 200)
    for teacher in task.REGIMES["multiply"]:
        rows = task.teacher_dataset(teacher, problems, seed=0)
        wrong = sum(final(r["completion"][0]["content"]) != p.a * p.b for r, p in zip(rows, problems)) / 200
        assert (0.25 < wrong < 0.45) if teacher == "noisy" else wrong == 0, teacher
    traces = {t: task.trace(t, task.Product(47, 36), random.Random(0)).splitlines() for t in task.REGIMES["multiply"]}
    assert traces["left"] == ["47 × 30 = 1410", "47 × 6 = 282", "1410 + 282 = 1692", "#### 1692"]
    assert traces["right"][:2] == ["40 × 36 = 1440", "7 × 36 = 252"]
    assert bench.default_methods("multiply") == bench.default_methods("shared")


def test_quick_smoke_run_on_smollm2(bench, tmp_path):
    """MoT and the exploratory mot-val-weighted (README.md) in --quick end to end on the real student, in one run
    (the baselines' path is tests/test_baselines.py's; the full --quick runs every method, ~5 min on 2 cores)."""
    results, work = tmp_path / "results", ["--work-dir", str(tmp_path / "work")]
    # one thread: on two, beside the other xdist process's tests, this test took 3.3 times as long (cached apart)
    quick = ["--quick", "--threads", "1"]
    run = [*quick, "--methods", "mot", "mot-val-weighted", *work, "--results-dir", str(results)]
    report_name, identity = "real_student_quick_threads1", bench.quality.machine()
    folder_name = f"quick-threads1-{bench.quality.machine_tag(identity)}"  # the cache of this machine, one thread
    summary = bench.main(run)
    methods = summary["methods"]
    assert set(methods) == {"MoT", "MoT-val-weighted"} and methods["MoT"]["steps"] == 8
    saved = json.loads((results / f"{report_name}_exploratory.json").read_text())
    assert not (results / f"{report_name}.json").exists()  # an exploratory method is reported apart
    mot = next(r for r in saved["runs"] if r["name"] == "MoT")
    assert [p["steps"] for p in mot["curve"]] == [0, 4, 8] and all("merge_kept_norm" in p for p in mot["curve"][1:])
    assert all(0 <= p["accuracy"] <= 1 and p["general_nll"] > 0 for p in mot["curve"])
    # the second forgetting probe: the facts the untrained student stated, asked again at every scoring point
    known = json.loads((tmp_path / "work" / folder_name / "known_facts.json").read_text())
    assert known["asked"] == 4 and 0 < len(known["known"]) <= 4 and known["facts_kept"] > 0.5
    assert all(0 <= p["facts_kept"] <= 1 for p in mot["curve"]) and mot["curve"][0]["facts_kept"] == known["facts_kept"]
    assert set(saved["summary"]["facts"]) == {"MoT", "MoT-val-weighted"}
    # the validation problems are scored where a run is read (the learning-rate grid chooses by them), not before
    assert "validation_accuracy" in mot["curve"][-1] and not any("validation_accuracy" in p for p in mot["curve"][:-1])
    assert "| MoT | 0 |" in (results / f"{report_name}_exploratory.md").read_text().split("Second probe")[1]
    assert (results / f"{report_name}_exploratory.png").read_bytes().startswith(b"\x89PNG")
    assert "| MoT | 8 |" in (results / f"{report_name}_exploratory.md").read_text()
    assert saved["summary"]["machine"] == identity  # the runs' machine, whose kernels decide their results
    assert [p.name for p in (tmp_path / "work").iterdir()] == [folder_name]

    # mot-val-weighted: each round merged with the branches' validation accuracies, normalised (teacher_weighting)
    weighted = next(r for r in saved["runs"] if r["name"] == "MoT-val-weighted")
    assert [p["steps"] for p in weighted["curve"]] == [0, 4, 8]
    for point in weighted["curve"][1:]:
        scores, weights = point["branch_accuracy"], point["weights"]
        assert list(weights) == ["left", "verbose", "right", "noisy"] and set(scores) == set(weights)
        total = sum(scores.values())
        assert weights == pytest.approx({t: s / total if total else 0.25 for t, s in scores.items()})

    again = bench.main(run)
    assert again["runs_from_cache"] == 2  # an interrupted benchmark resumes from its cached runs
    report = bench.main([*quick, "--cached-only", "--methods", "mot", "mtd", *work, "--results-dir", str(results)])
    assert set(report["methods"]) == {"MoT"} and report["not_run"] == ["MTD seed 0"]  # reported, nothing trained
    assert "Not run yet (cached runs only): MTD seed 0." in (results / f"{report_name}.md").read_text()


def test_the_second_probe_reads_mtd_where_its_accuracy_is_read_and_skips_runs_without_it(bench):
    """facts_summary: MTD's run gives MTD-50 (its step-50 point) and MTD-200 (its end); a run cached before the
    probe existed adds no row; fact forgetting is start minus end."""
    setting = bench.Setting()
    start = {"steps": 0, "facts_kept": 0.9}
    mtd = {"name": "MTD", "job": {"seed": 0}, "curve": [start, {"steps": 50, "facts_kept": 0.8},
                                                        {"steps": 200, "facts_kept": 0.5}]}  # fmt: skip
    old = {"name": "STD-left", "job": {"seed": 0}, "curve": [{"steps": 0}, {"steps": 50}]}
    rows = bench.facts_summary([mtd, old], setting)
    assert set(rows) == {"MTD-50", "MTD-200"}
    assert rows["MTD-50"]["fact_forgetting"]["mean"] == pytest.approx(0.1)
    assert rows["MTD-200"]["facts_kept"]["mean"] == 0.5
    assert rows["MTD-200"]["fact_forgetting"]["mean"] == pytest.approx(0.4)
    table = bench.facts_markdown({"facts": rows, "known_facts": 30})
    assert "| MTD-200 | 0 | 0.500 +- 0.000 | 0.400 +- 0.000 |" in table and "the 30 facts" in table
    assert bench.facts_markdown({"facts": {}}) == ""


def test_a_seed_comes_whole_from_one_machine(bench, tmp_path):
    """Runs pair only on one machine, so each seed's runs all come from one cache folder: this machine's, or another
    machine's that holds all of them (later sessions on other CPUs add seeds, never mix one)."""
    here, other, unrelated = tmp_path / "s10-aaaaaaaa", tmp_path / "s10-bbbbbbbb", tmp_path / "s10-formats-cccccccc"
    for folder in (here, other, unrelated):
        folder.mkdir()
    methods = ["mot", "mtd"]

    def put(folder, method, seed):
        (folder / bench.Job(method, seed).file).write_text("{}")

    put(here, "mot", 0)
    put(other, "mot", 0), put(other, "mtd", 0)  # seed 0 complete on the other machine
    put(other, "mot", 1)  # seed 1 partial there, absent here
    for method in methods:
        put(unrelated, method, 1)  # another setting's folder is never read
    assert bench.seed_folder(0, methods, here, training=True) == other
    assert bench.seed_folder(1, methods, here, training=True) == here  # trained here, whole
    assert bench.seed_folder(1, methods, here, training=False) == other  # only reporting: the fullest
    assert bench.seed_folder(2, methods, here, training=False) == here

    summary = {"methods": {}, "machine": None,
               "machines_per_seed": {0: {"cpu": "CPU A", "cpu_generation": "family 1 model 1", "cpu_flags": [],
                                         "torch": "1", "bitsandbytes": "2", "transformers": "3", "peft": "4"},
                                     1: None}}  # fmt: skip
    bench.quality.write_markdown(summary, tmp_path / "r.md", "cmd", 1.0)
    text = (tmp_path / "r.md").read_text()
    assert "Machines, per seed (each seed's runs on one): seed 0: CPU A, family 1 model 1 (none of" in text
    assert "seed 1: not recorded." in text


def test_across_machines_a_method_added_later_pairs_with_a_seed_made_elsewhere_and_the_report_names_it(
        bench, tmp_path):
    """--across-machines: a run the seed's folder lacks comes from another machine's folder that holds it (trained
    here only when none does), and the report names that run's machine, since the pairing crosses CPUs."""
    here, old = tmp_path / "s10-formats-aaaaaaaa", tmp_path / "s10-formats-bbbbbbbb"
    for folder in (here, old):
        folder.mkdir()
    (old / "MoT-seed0.json").write_text("{}"), (old / "MTD-seed0.json").write_text("{}")
    (here / "MTD-parallel-seed0.json").write_text("{}")
    methods = ["mot", "mtd", "mtd-parallel", "std-left"]
    base = bench.seed_folder(0, methods, here, training=False)
    assert base == old  # the fullest folder is the seed's base
    files = {m: bench.run_file(bench.Job(m, 0), base, here, across_machines=True) for m in methods}
    assert files["mot"] == old / "MoT-seed0.json" and files["mtd"] == old / "MTD-seed0.json"
    assert files["mtd-parallel"] == here / "MTD-parallel-seed0.json"  # held only here: read from here
    assert files["std-left"] == here / "STD-left-seed0.json"  # held nowhere: trained here
    assert bench.run_file(bench.Job("mtd-parallel", 0), base, here, across_machines=False) == old / files[
        "mtd-parallel"].name  # without the flag a seed never mixes machines

    cpu = {"cpu": "CPU A", "cpu_generation": "family 1 model 1", "cpu_flags": [], "torch": "1", "bitsandbytes": "2",
           "transformers": "3", "peft": "4"}
    other_cpu = {**cpu, "cpu": "CPU B"}
    runs = [{"name": "MoT", "job": {"seed": 0}, "machine": cpu}, {"name": "MTD", "job": {"seed": 0}, "machine": cpu},
            {"name": "MTD-parallel", "job": {"seed": 0}, "machine": other_cpu}]
    crossed = bench.crossed_runs(runs, {0: cpu})
    assert crossed == {"MTD-parallel seed 0": other_cpu}
    summary = {"methods": {}, "machine": None, "machines_per_seed": {0: cpu}, "machines_crossed": crossed}
    bench.quality.write_markdown(summary, tmp_path / "r.md", "cmd", 1.0)
    text = (tmp_path / "r.md").read_text()
    assert "(each seed's runs on one, except those named next): seed 0: CPU A" in text
    assert "(another machine than the rest of their seed): MTD-parallel seed 0: CPU B" in text


def test_the_learning_rate_grid_chooses_by_validation_and_breaks_ties_to_the_smaller_rate(tmp_path):
    """lr_grid.py over runs cached per rate (run.py --learning-rate): each row's rate is its best validation
    accuracy, whatever the held-out accuracy says; a tie goes to the smaller rate; a choice at the edge says so."""
    grid = load_benchmark("real_student/lr_grid.py")
    machine = grid.run.quality.machine()
    scores = {2e-4: (0.50, 0.90, 0.30), 1e-3: (0.60, 0.10, 0.30)}  # rate: MoT's validation, held-out; MTD's val.
    for rate, (mot_val, mot_held, mtd_val) in scores.items():
        folder = tmp_path / "work" / f"quick-lr{rate:g}-{grid.run.quality.machine_tag(machine)}"
        folder.mkdir(parents=True)
        start = {"accuracy": 0.0, "general_nll": 1.0}
        (folder / "untrained.json").write_text(json.dumps(start))
        mot = [{"steps": 0, **start}, {"steps": 4, "round": 1, "accuracy": 0.2, "general_nll": 1.1},
               {"steps": 8, "round": 2, "accuracy": mot_held, "general_nll": 1.2, "validation_accuracy": mot_val}]
        mtd = [{"steps": 0, **start}, {"steps": 2, "accuracy": 0.1, "general_nll": 1.1, "validation_accuracy": 0.2},
               {"steps": 8, "accuracy": 0.3, "general_nll": 1.3, "validation_accuracy": mtd_val}]
        for name, method, curve in (("MoT", "mot", mot), ("MTD", "mtd", mtd)):
            run = {"job": {"method": method, "seed": 0}, "name": name, "curve": curve, "seconds": 1.0}
            (folder / f"{name}-seed0.json").write_text(json.dumps(run))
    result = grid.main(["--quick", "--cached-only", "--rates", "2e-4", "1e-3", "--methods", "mot", "mtd",
                        "--exploratory", "mtd-parallel", "--work-dir", str(tmp_path / "work"),
                        "--results-dir", str(tmp_path / "out")])  # fmt: skip
    rows = result["rows"]
    assert rows["MoT"]["choice"] == {"rate": 1e-3, "validation_accuracy": 0.6, "edge": True}  # not the held-out 0.9
    assert rows["MTD-2"]["choice"]["rate"] == 2e-4 and rows["MTD-8"]["choice"]["rate"] == 2e-4  # ties: the smaller
    assert rows["MoT"]["rates"][2e-4] == {"validation": 0.5, "held_out": 0.9}
    table = (tmp_path / "out" / "real_student_lr_grid_quick.md").read_text()
    assert "| MoT | 0.50 / 0.90 | 0.60 / 0.10 | 0.001 (edge) |" in table
    assert "accuracy on the 4 validation problems (what chooses) / on the 4 held-out problems" in table  # --quick's
    assert grid.choose({5e-4: 0.4, 1e-3: 0.5, 2e-3: 0.3}) == {"rate": 1e-3, "validation_accuracy": 0.5, "edge": False}
    assert grid.choose({5e-4: 0.4, 1e-3: 0.5})["edge"]  # a row's own edge: the grid's next rate is owed to it


def test_more_validation_problems_are_cached_and_reported_apart(tmp_path, capsys):
    """lr_grid.py --validation N reads run.py's folders made with --validation N (``-val<N>``), never the default
    50's, and says how many problems chose; --compare-seeds then reads each row at its own chosen rate, paired
    against MoT; run.py refuses more validation problems than the held-out ones after the scored ones, before it
    loads anything."""
    grid = load_benchmark("real_student/lr_grid.py")
    tag = grid.run.quality.machine_tag(grid.run.quality.machine())
    start = {"accuracy": 0.0, "general_nll": 1.0, "facts_kept": 1.0}
    # folder: {(name, method, seed): (validation, held-out accuracy)}; the default-50 folder must not be read
    runs = {f"quick-multiply-lr0.001-val4-{tag}": {("MoT", "mot", 0): (0.75, 0.25), ("MoT", "mot", 1): (0.5, 0.5),
                                                   ("STD-left", "std-left", 0): (0.25, 0.75)},
            f"quick-multiply-lr0.002-val4-{tag}": {("MoT", "mot", 0): (0.5, 1.0),
                                                   ("STD-left", "std-left", 0): (0.5, 0.5),
                                                   ("STD-left", "std-left", 1): (0.5, 0.25)},
            f"quick-multiply-lr0.001-{tag}": {("MoT", "mot", 0): (1.0, 1.0)}}  # fmt: skip
    for folder, cached in runs.items():
        (tmp_path / "work" / folder).mkdir(parents=True)
        (tmp_path / "work" / folder / "untrained.json").write_text(json.dumps(start))
        for (name, method, seed), (val, held) in cached.items():
            end = {"steps": 2, "round": 2, "accuracy": held, "general_nll": 1.25, "validation_accuracy": val,
                   "facts_kept": 0.5}  # fmt: skip
            run = {"job": {"method": method, "seed": seed}, "name": name, "curve": [{"steps": 0, **start}, end],
                   "seconds": 1.0}  # fmt: skip
            (tmp_path / "work" / folder / f"{name}-seed{seed}.json").write_text(json.dumps(run))
    elsewhere = tmp_path / "work" / f"quick-multiply-lr0.001-val4-{'0' * 8 if tag != '0' * 8 else '1' * 8}"
    elsewhere.mkdir()  # a row added later, on another machine: read only with --across-machines
    (elsewhere / "machine.json").write_text(json.dumps({**grid.run.quality.machine(), "cpu": "CPU B"}))
    control = {"steps": 2, "accuracy": 0.5, "general_nll": 1.0, "validation_accuracy": 0.25}
    (elsewhere / "MTD-parallel-seed0.json").write_text(json.dumps(
        {"job": {"method": "mtd-parallel", "seed": 0}, "name": "MTD-parallel", "seconds": 1.0,
         "curve": [{"steps": 0, **start}, control]}))  # fmt: skip
    call = ["--quick", "--cached-only", "--regime", "multiply", "--validation", "4", "--rates", "1e-3", "2e-3",
            "--methods", "mot", "std-left", "--exploratory", "mtd-parallel", "--work-dir", str(tmp_path / "work"),
            "--results-dir", str(tmp_path / "out")]  # fmt: skip
    crossing = grid.main([*call, "--across-machines", "--compare-seeds", "0"])
    assert crossing["rows"]["MTD-parallel"]["rates"] == {1e-3: {"validation": 0.25, "held_out": 0.5}}
    assert crossing["rows"]["MoT"]["rates"][1e-3]["validation"] == 0.75  # the seed's own runs are still read
    assert list(crossing["machines_crossed"]) == ["0.001: MTD-parallel seed 0"]
    assert crossing["comparison"]["MTD-parallel"]["machines"][0]["cpu"] == "CPU B"  # the run's own machine
    assert crossing["comparison"]["MoT"]["machines"][0]["cpu"] != "CPU B"  # and MoT's, its seed's
    report = (tmp_path / "out" / "real_student_lr_grid_quick_multiply.md").read_text()
    assert "(rate: run: machine): 0.001: MTD-parallel seed 0: CPU B" in report
    assert "| facts kept | machine, per seed |" in report  # the comparison names each run's CPU
    assert "| MTD-parallel | 0.001 | 0 | 0.500 +- 0.000 (0.50) |" in report and report.count(" | B |") == 1
    assert "Machines: A: " in report and "; B: CPU B" in report
    result = grid.main([*call, "--compare-seeds", "0", "1"])
    assert "MTD-parallel" not in result["rows"] and not result["machines_crossed"]  # without the flag: one machine
    assert result["rows"]["MoT"]["rates"][1e-3]["validation"] == 0.75 and result["validation_problems"] == 4
    assert result["rows"]["MoT"]["choice"]["rate"] == 1e-3 and result["rows"]["STD-left"]["choice"]["rate"] == 2e-3
    mot, std = result["comparison"]["MoT"], result["comparison"]["STD-left"]
    assert mot["rate"] == 1e-3 and mot["accuracy"]["values"] == [0.25, 0.5]
    assert std["rate"] == 2e-3 and std["accuracy"]["values"] == [0.5, 0.25]
    assert std["mot_minus"]["values"] == [-0.25, 0.25] and std["forgetting"]["mean"] == 0.25
    report = (tmp_path / "out" / "real_student_lr_grid_quick_multiply.md").read_text()
    assert "4 validation problems (what chooses) / on the 4 held-out problems" in report
    assert "machine, per seed" not in report and "cross CPUs" not in report  # one machine: no column
    assert "| MoT | 0.75 / 0.25 | 0.50 / 1.00 |" in report
    assert "| STD-left | 0.002 | 0, 1 | 0.375 +- 0.177 (0.50, 0.25) | 0.000 +- 0.354 (-0.25, +0.25) |" in report
    with pytest.raises(SystemExit):
        grid.run.main(["--validation", "201", "--methods", "mot", "--work-dir", str(tmp_path / "refused")])
    assert "--validation: 1 to 200" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    with pytest.raises(SystemExit):  # the grid stops on it too, rather than skipping every rate
        grid.main(["--validation", "201", "--cached-only", "--work-dir", str(tmp_path / "refused")])
    assert "--validation: 1 to 200" in capsys.readouterr().err


def test_more_rounds_scale_every_baselines_steps_and_are_cached_and_reported_apart(bench, tmp_path, capsys):
    """run.py --rounds T: MTD reads at T*S steps (MTD-<T*S>) and ends at K*T*S (MTD-<K*T*S>), so the baselines stay
    at MoT's sequential steps and compute; its runs go to their own folder and report (_rounds<T>), and lr_grid.py
    --rounds T reads them there (here T=3 against --quick's 2: MTD-3 and MTD-12)."""
    grid = load_benchmark("real_student/lr_grid.py")
    work, results = tmp_path / "work", tmp_path / "results"
    common = ["--quick", "--threads", "1", "--regime", "multiply", "--validation", "4", "--work-dir", str(work)]
    summary = grid.run.main([*common, "--rounds", "3", "--learning-rate", "1e-3", "--methods", "mtd",
                             "--results-dir", str(results)])  # fmt: skip
    assert {label: row["steps"] for label, row in summary["methods"].items()} == {"MTD-3": 3, "MTD-12": 12}
    saved = json.loads((results / "real_student_quick_multiply_lr0.001_val4_rounds3_threads1.json").read_text())
    assert [p["steps"] for p in saved["runs"][0]["curve"]] == [0, 3, 6, 9, 12]
    tag = grid.run.quality.machine_tag(grid.run.quality.machine())
    assert [p.name for p in work.iterdir()] == [f"quick-multiply-lr0.001-val4-rounds3-threads1-{tag}"]
    assert "T=3, S=1" in (results / "real_student_quick_multiply_lr0.001_val4_rounds3_threads1.md").read_text()
    # the grid's reading: only T=3's folder holds runs, so at the default T nothing is cached
    call = ["--quick", "--cached-only", "--regime", "multiply", "--validation", "4", "--rates", "1e-3", "--methods",
            "mtd", "--work-dir", str(work), "--results-dir", str(tmp_path / "grid")]  # fmt: skip
    for folder in work.iterdir():  # lr_grid reads run.py's two-thread folders: the same runs, renamed for it
        folder.rename(work / folder.name.replace("-threads1", ""))
    result = grid.main([*call, "--rounds", "3", "--compare-seeds", "0"])
    assert set(result["rows"]) == {"MTD-3", "MTD-12"} and result["rows"]["MTD-12"]["choice"]["rate"] == 1e-3
    assert result["comparison"]["MTD-12"]["accuracy"]["values"] == [summary["methods"]["MTD-12"]["accuracy"]["mean"]]
    report = (tmp_path / "grid" / "real_student_lr_grid_quick_multiply_rounds3.md").read_text()
    assert report.startswith("# Learning rate per method: SmolLM2-135M-Instruct in nf4, multiply regime, seed 0, T=3")
    assert grid.main(call)["rows"] == {}  # the default T's folder has none of them
    with pytest.raises(SystemExit):  # refused by run.py, not read as the default T and reported as _rounds0
        grid.main([*call, "--rounds", "0"])
    assert "--rounds: at least 1" in capsys.readouterr().err
