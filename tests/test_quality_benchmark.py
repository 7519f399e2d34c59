"""benchmarks/quality/run.py: its reporting rule, its MTD-250 shortcut, and one real micro run of each method."""

import dataclasses
import json
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from merge_of_thought.demo.student import load_demo_student, pretraining_accuracy, pretraining_probes
from merge_of_thought.demo.task import extract_answer, make_problems, make_teacher_dataset, teacher_trace

from helpers import load_benchmark


@pytest.fixture(scope="module")
def quality():
    return load_benchmark("quality/run.py")


def finished_run(name: str, seed: int, accuracy: float, steps: int) -> dict:
    """A cached run as the benchmark saves it: the untrained start, then one scored end point."""
    curve = [{"steps": 0, "accuracy": 0.0, "pretrain_accuracy": 1.0}, {"steps": steps, "accuracy": accuracy,
             "pretrain_accuracy": 0.9}]  # fmt: skip
    return {"name": name, "job": {"seed": seed}, "curve": curve, "seconds": 1.0}


def test_three_digit_teachers_are_right_except_the_noisy_one():
    problems = make_problems(300, seed=0, split="train", digits=3)
    held_out = {p.prompt for p in make_problems(500, seed=0, split="test", digits=3)}
    assert not held_out & {p.prompt for p in problems} and all(100 <= p.a < 1000 for p in problems)
    for teacher in ("column", "verbose", "split", "commuted"):
        assert all(extract_answer(teacher_trace(teacher, p)) == p.answer for p in problems)
    noisy = make_teacher_dataset("noisy", problems, seed=0, noise_rate=0.4)
    wrong = sum(extract_answer(c) != p.answer for c, p in zip(noisy["completion"], problems)) / len(problems)
    assert 0.3 < wrong < 0.5
    assert teacher_trace("column", make_problems(1, digits=3)[0]).count("\n") == 3  # one line per place + answer


def test_shared_regime_teachers_write_one_format(quality):
    """--regime shared: every teacher writes only ``x+y=z`` lines before the answer; commuted swaps the operands."""
    import dataclasses
    import re

    setting = dataclasses.replace(quality.FULL, regime="shared")
    assert setting.teachers == ("column", "commuted", "split", "noisy") and setting.compute_steps == 1000
    problems = make_problems(50, seed=0, split="train")
    for teacher in setting.teachers:
        for trace in make_teacher_dataset(teacher, problems, seed=0)["completion"]:
            *steps, answer = trace.split("\n")
            assert all(re.fullmatch(r"\d+(\+\d+)+=\d+", line) for line in steps) and answer.startswith("#### ")
    column, commuted = (teacher_trace(t, make_problems(1)[0]).splitlines() for t in ("column", "commuted"))
    assert column != commuted and column[-1] == commuted[-1]
    jobs = quality.jobs_for([0], False, teachers=setting.teachers)
    assert [job.name for job in jobs] == ["MoT", "MTD", "STD-column", "STD-commuted", "STD-split", "STD-noisy"]


def test_pretraining_probes_score_the_shipped_student():
    probes = pretraining_probes(100)
    assert len({prompt for prompt, _ in probes}) == 100
    assert all(prompt.endswith(("=", ": ")) and expected for prompt, expected in probes)
    model, tokenizer = load_demo_student(load_in_4bit=False)
    assert pretraining_accuracy(model, tokenizer, probes) >= 0.9  # what it was pre-trained on
    with torch.no_grad():  # a student that lost its pre-training scores low
        for parameter in model.parameters():
            parameter.mul_(0.0).add_(torch.randn_like(parameter) * 0.02)
    assert pretraining_accuracy(model, tokenizer, probes) < 0.1


def test_summary_reports_the_last_round_and_paired_differences(quality, tmp_path):
    def run(name, seed, accuracies, steps, method="std"):
        curve = [{"steps": s, "accuracy": a, "pretrain_accuracy": 1.0 - s / 1000} for s, a in zip(steps, accuracies)]
        if method == "mot":
            for round_idx, point in enumerate(curve):
                point["round"] = round_idx
                if round_idx:  # the merges' agreement, recorded from round 1
                    point["merge_kept_norm"] = 0.5 + 0.1 * round_idx + 0.1 * seed
        return {"name": name, "job": {"seed": seed, "method": method}, "curve": curve, "seconds": 1.0}

    setting = dataclasses.replace(quality.FULL)
    results = []
    for seed, bonus in ((0, 0.0), (1, 0.1)):
        results.append(run("MoT", seed, [0.0, 0.9, 0.5], [0, 500, 1000], "mot"))  # best round 1, last round 2
        results.append(run("MTD", seed, [0.0, 0.2 + bonus, 0.4, 0.4, 0.6], [0, 250, 500, 750, 1000], "mtd"))
        results.append(run("STD-column", seed, [0.0, 0.7 + bonus], [0, 250]))
        results.append(run("STD-noisy", seed, [0.0, 0.3], [0, 250]))
    summary = quality.summarize(results, setting)
    methods = summary["methods"]
    assert methods["MoT"]["accuracy"]["mean"] == pytest.approx(0.5)  # the last round, not the best one
    assert methods["MTD-250"]["accuracy"]["values"] == pytest.approx([0.2, 0.3])
    assert methods["MTD-1000"]["steps"] == 1000 and methods["MTD-250"]["steps"] == 250
    assert summary["best_std"] == "STD-column"
    assert summary["mot_minus"]["STD-column"]["values"] == pytest.approx([-0.2, -0.3])
    assert methods["MoT"]["forgetting"]["mean"] == pytest.approx(1.0)
    assert summary["mot_rounds"]["MoT"][1]["mean"] == pytest.approx(0.9)
    assert summary["mot_kept_norm"]["MoT"][2]["values"] == pytest.approx([0.7, 0.8])
    quality.write_markdown(summary, tmp_path / "q.md", "cmd", 1.0)
    assert "| merge kept norm | - | 0.650 +- 0.071 | 0.750 +- 0.071 |" in (tmp_path / "q.md").read_text()


def test_a_mean_paired_difference_of_zero_prints_without_a_sign(quality):
    # MoT (0.16, 0.12) minus MTD (0.14, 0.14): a mean a hair below zero, which "%.3f" alone prints as -0.000
    assert quality._fmt(quality._mean_std([0.16 - 0.14, 0.12 - 0.14])) == "0.000 +- 0.028"
    assert quality._fmt(quality._mean_std([-0.05, -0.06])) == "-0.055 +- 0.007"


def test_runs_are_cached_per_machine_and_the_report_names_it(quality, tmp_path):
    """One seed's run differs between CPUs (README.md), so the cache is per machine and a report says which."""
    import hardware  # benchmarks/hardware.py, on the path once the benchmark is loaded

    identity = quality.machine()
    cpuinfo = open("/proc/cpuinfo").read()
    flags = set(cpuinfo.split())
    assert identity["cpu_flags"] == [flag for flag in hardware.KERNEL_FLAGS if flag in flags]
    assert identity["torch"] == torch.__version__ and identity["cpu"]
    family = re.search(r"^cpu family\s*:\s*(\d+)", cpuinfo, re.M).group(1)
    assert identity["cpu_generation"].startswith(f"family {family} model ")
    assert quality.machine_tag(identity) == quality.machine_tag(dict(identity))  # stable within a machine
    toggled = {**identity, "cpu_flags": sorted(set(identity["cpu_flags"]) ^ {"avx512_bf16"})}
    assert quality.machine_tag(toggled) != quality.machine_tag(identity)  # another CPU: another cache folder
    newer = {**identity, "cpu_generation": "family 99 model 1"}  # the same name and flags, another generation
    assert quality.machine_tag(newer) != quality.machine_tag(identity)
    summary = quality.summarize([finished_run("STD-column", 0, 0.5, 250)], quality.FULL)
    summary["machine"] = {**identity, "cpu": "Test CPU", "cpu_generation": "family 1 model 2",
                          "cpu_flags": ["avx2", "avx512_bf16"], "torch": "9.9"}  # fmt: skip
    quality.write_markdown(summary, tmp_path / "q.md", "cmd", 1.0)
    report = (tmp_path / "q.md").read_text()
    assert "Machine (every run): Test CPU, family 1 model 2 (avx2, avx512_bf16); torch 9.9, bitsandbytes" in report


def test_a_learning_rate_arm_has_its_own_cache_and_results(quality, tmp_path):
    """Every method at another learning rate: its runs never meet the default rate's in a cache or a table."""
    arm = dataclasses.replace(quality.FULL, regime="shared", learning_rate=1e-3)
    identity = quality.machine()
    assert quality.results_suffix(quality.FULL, quick=False, ablations=False) == ""  # the committed names stay
    assert quality.results_suffix(arm, quick=False, ablations=True) == "_shared_lr0.001_ablations"
    assert quality.cache_folder(arm, False, identity) == f"full-v2-shared-lr0.001-{quality.machine_tag(identity)}"
    runs = [finished_run("STD-column", 0, 0.5, 250)]
    saved = {"summary": {"wall_seconds": 1.0, "command": "cmd", "runs_from_cache": 0}, "runs": runs}
    (tmp_path / "quality_shared_lr0.001.json").write_text(json.dumps(saved))
    quality.main(["--regime", "shared", "--learning-rate", "1e-3", "--report-only", "--results-dir", str(tmp_path),
                  "--work-dir", str(tmp_path / "work")])  # fmt: skip
    assert "| STD-column (best STD) | 250 | 0.500 +- 0.000 |" in (tmp_path / "quality_shared_lr0.001.md").read_text()


def test_a_variant_run_on_fewer_seeds_is_paired_on_those_and_says_so(quality, tmp_path):
    setting = dataclasses.replace(quality.FULL)
    results = [finished_run("MoT", 0, 0.5, 1000), finished_run("MoT", 1, 0.7, 1000),
               finished_run("STD-column", 0, 0.4, 250), finished_run("STD-column", 1, 0.9, 250),
               finished_run("MoT-persistent", 1, 0.8, 1000)]  # fmt: skip
    summary = quality.summarize(results, setting)
    assert summary["mot_minus"]["STD-column"]["values"] == pytest.approx([0.1, -0.2])
    persistent = summary["MoT-persistent_minus"]
    assert persistent["STD-column"]["seeds"] == [1] and persistent["STD-column"]["values"] == pytest.approx([-0.1])
    assert persistent["MoT"]["values"] == pytest.approx([0.1])  # seed 1's MoT, not the mean of both seeds
    summary["not_run"] = ["MoT-persistent seed 0"]
    quality.write_markdown(summary, tmp_path / "q.md", "cmd", 1.0)
    text = (tmp_path / "q.md").read_text()
    assert "Seeds: [0, 1]" in text and "| MoT-persistent (seed 1 only) | 1000 | 0.800 +- 0.000 |" in text
    assert "- vs MoT: 0.100 +- 0.000 (per seed 1: +0.100)" in text
    assert "Not run yet (cached runs only): MoT-persistent seed 0." in text


def test_mot_is_paired_with_the_data_parallel_control_even_without_an_std_run(quality, tmp_path):
    """MTD-parallel (issue 39's control at equal compute and equal sequential steps) gets its paired difference,
    also in a report of MoT and the control alone."""
    results = [finished_run("MoT", 0, 0.5, 1000), finished_run("MoT", 1, 0.7, 1000),
               finished_run("MTD-parallel", 0, 0.6, 250), finished_run("MTD-parallel", 1, 0.4, 250)]  # fmt: skip
    summary = quality.summarize(results, dataclasses.replace(quality.FULL))
    assert "best_std" not in summary
    assert summary["mot_minus"]["MTD-parallel"]["values"] == pytest.approx([-0.1, 0.3])
    quality.write_markdown(summary, tmp_path / "q.md", "cmd", 1.0)
    assert "- vs MTD-parallel: 0.100 +- 0.283 (per seed 0, 1: -0.100, +0.300)" in (tmp_path / "q.md").read_text()


def test_mtd_250_is_the_first_250_steps_of_mtd_1000(tmp_path):
    """The benchmark reads MTD-250 at step 250 of MTD-1000: true with a constant learning rate and the same seed."""
    _, tokenizer = load_demo_student()
    data = make_teacher_dataset("column", make_problems(40, seed=1), seed=1)

    def lora_after(max_steps, stop_at):
        model, _ = load_demo_student()
        args = SFTConfig(output_dir=str(tmp_path / str(max_steps)), max_steps=max_steps, learning_rate=3e-3,
                         lr_scheduler_type="constant", per_device_train_batch_size=8, bf16=False,
                         gradient_checkpointing=False, report_to=[], disable_tqdm=True, save_strategy="no", seed=3)
        trainer = SFTTrainer(model, args=args, train_dataset=data, processing_class=tokenizer,
                             peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        snapshot = {}

        class Snapshot(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step == stop_at:
                    snapshot.update({k: v.clone() for k, v in get_peft_model_state_dict(model).items()})

        trainer.add_callback(Snapshot())
        trainer.train()
        return snapshot

    short, long = lora_after(3, 3), lora_after(9, 3)
    assert short.keys() == long.keys() and all(torch.equal(short[k], long[k]) for k in short)


@pytest.mark.parametrize("method", ["mot", "mtd", "std"])
def test_micro_run_of_each_method(quality, method):
    setting = quality.Setting(rounds=2, steps_per_round=2, train_prompts=24, held_out=8)
    job = quality.Job(method, seed=0, teacher="column" if method == "std" else None)
    result = quality.run_job(job, setting)
    steps = [point["steps"] for point in result["curve"]]
    expected = {"mot": [0, 8, 16], "mtd": [0, 4, 8, 12, 16], "std": [0, 2, 4]}[method]
    assert steps == expected
    assert all(0.0 <= p["accuracy"] <= 1.0 and 0.0 <= p["pretrain_accuracy"] <= 1.0 for p in result["curve"])
    assert result["curve"][0]["pretrain_accuracy"] >= 0.9
    assert result["name"] == {"mot": "MoT", "mtd": "MTD", "std": "STD-column"}[method]
    if method == "mot":  # each merge records how much of the branch updates' norm it kept
        assert all(0.0 < point["merge_kept_norm"] <= 1.0 for point in result["curve"][1:])


def test_nesterov_outer_step_is_dilocos_formula_on_the_branch_deltas(qwen3_dir, tokenizer, tmp_path):
    """outer.py: D_t = D_{t-1} + lr (U_t + mu m_t), m_t = mu m_{t-1} + U_t, U_t the branches' mean, for 3 rounds;
    checked against the saved branch adapters, in float64 and independently of merge_of_thought's merging."""
    from merge_of_thought import MoTTrainer

    from conftest import make_teacher
    from helpers import dense_adapter, quick_config, quick_lora

    outer = load_benchmark("quality/outer.py")
    lr, mu = 0.7, 0.9
    teachers = {"a": make_teacher(0, n=8), "b": make_teacher(1, n=8)}
    trainer = MoTTrainer(qwen3_dir, args=quick_config(tmp_path, num_rounds=3, max_steps=1), teachers=teachers,
                         processing_class=tokenizer, peft_config=quick_lora(),
                         callbacks=[outer.NesterovOuterStep(lr, mu)])  # fmt: skip
    rounds = trainer.train()
    D = m = None
    for t in (1, 2, 3):
        branch = [dense_adapter(trainer.run.branch_dir(t, k)) for k in teachers]
        U = {name: (branch[0][name] + branch[1][name]) / 2 for name in branch[0]}
        m = U if m is None else {name: mu * m[name] + U[name] for name in U}
        step = {name: lr * (U[name] + mu * m[name]) for name in U}
        D = step if D is None else {name: D[name] + step[name] for name in U}
    for name, delta in trainer.merged.items():
        torch.testing.assert_close(delta.dense().double(), D[name], rtol=0, atol=1e-5 * D[name].abs().max().item())
    assert rounds[-1]["outer_rank"] > rounds[0]["outer_rank"]  # the momentum's rank grows with the rounds
