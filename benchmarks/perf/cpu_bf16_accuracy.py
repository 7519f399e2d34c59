"""bf16 autocast against fp32 for whole MoT runs on a CPU with native bf16: accuracy and time, 3 seeds (issue 38).

    python benchmarks/perf/cpu_bf16_accuracy.py                    # the demo and the real student, seeds 0 1 2
    python benchmarks/perf/cpu_bf16_accuracy.py --students demo    # the demo only (a few minutes)

cpu_bf16.py measured a bf16 step at 0.72-0.80x an fp32 one on CPUs with AVX512-BF16; this asks what bf16 does to a
MoT run's result there, which decides MoTConfig's CPU default for ``bf16``. Two students, each run in fp32 and in
bf16 (the nf4 layers' compute dtype and TRL's autocast), seed by seed, the order alternating (fp32 first on even
seeds) to cancel slow drift of the machine:

- demo: ``mot demo`` (the shipped tiny nf4 student, 4 synthetic teachers, 4 rounds x 20 steps), ``--bf16`` or not;
  each run in its own process; score: the last round's held-out accuracy on its 30 problems.
- smollm2: benchmarks/real_student's MoT (SmolLM2-135M-Instruct in nf4, shared regime, T=5 x S=10, batch 8),
  ``--bf16`` or not; cached per machine like every real-student run; score: the last round's greedy accuracy on the
  100 held-out problems, and the forgetting probe.

Writes benchmarks/results/cpu_bf16_accuracy.{json,md}: per seed each run's score and wall time, means, and the
paired differences bf16 minus fp32. Nothing here changes a default; the reader of the table does.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402  (common puts benchmarks/ on the path)
from hardware import identity, identity_tag  # noqa: E402

REAL_STUDENT = Path(__file__).resolve().parents[1] / "real_student" / "run.py"
CACHE = RESULTS / "runs" / "cpu_bf16_accuracy"  # committed, as the real-student runs are: a session may stop
PRECISIONS = ("fp32", "bf16")


def demo_worker(seed: int, bf16: bool) -> dict:
    """One ``mot demo`` run in this process: its accuracy per round and its wall time."""
    from merge_of_thought.demo.run import demo_settings, quiet, run_demo

    quiet()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mot-bf16-demo-") as out, contextlib.redirect_stdout(io.StringIO()):
        rows = run_demo(demo_settings("tiny", seed=seed, bf16=bf16, output_dir=out))
    return {"accuracy_by_round": [accuracy for _, accuracy, _ in rows], "accuracy": rows[-1][1],
            "seconds": time.perf_counter() - start}  # fmt: skip


def run_demo_seed(seed: int, bf16: bool, cache: Path) -> dict:
    path = cache / f"demo-{'bf16' if bf16 else 'fp32'}-seed{seed}.json"
    if not path.exists():
        command = [sys.executable, __file__, "--demo-worker", str(seed), "1" if bf16 else "0"]
        line = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        path.write_text(json.dumps(json.loads(line), indent=1) + "\n")
    return json.loads(path.read_text())


def run_real_student_seed(seed: int, bf16: bool) -> dict:
    """MoT on the real student through benchmarks/real_student/run.py (which caches the run per machine)."""
    with tempfile.TemporaryDirectory(prefix="mot-bf16-real-") as out:
        command = [sys.executable, str(REAL_STUDENT), "--methods", "mot", "--seeds", str(seed), "--results-dir", out,
                   *(["--bf16"] if bf16 else [])]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True, text=True)
        report = json.loads(next(Path(out).glob("real_student*.json")).read_text())
    run = report["runs"][0]
    start, end = run["curve"][0], run["curve"][-1]
    return {"accuracy_by_round": [point["accuracy"] for point in run["curve"]], "accuracy": end["accuracy"],
            "forgetting": end["general_nll"] - start["general_nll"], "seconds": run["seconds"]}  # fmt: skip


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: dict[str, dict[int, dict]]) -> dict:
    """Means over seeds per precision and the paired differences bf16 minus fp32 (accuracy, time ratio)."""
    seeds = sorted(set(runs["fp32"]) & set(runs["bf16"]))
    summary = {"seeds": seeds}
    for key in ("accuracy", "seconds", "forgetting"):
        if seeds and key in runs["fp32"][seeds[0]]:
            summary[key] = {p: mean_std([runs[p][s][key] for s in seeds]) for p in PRECISIONS}
    summary["accuracy_difference"] = mean_std([runs["bf16"][s]["accuracy"] - runs["fp32"][s]["accuracy"]
                                               for s in seeds])  # fmt: skip
    summary["time_ratio"] = mean_std([runs["bf16"][s]["seconds"] / runs["fp32"][s]["seconds"] for s in seeds])
    return summary


def markdown(record: dict) -> str:
    lines = ["# bf16 autocast against fp32: whole MoT runs on the CPU", "",
             f"Machine: {record['machine']['cpu']} ({record['machine'].get('cpu_generation', '')}), "
             f"command: `{record['command']}`. Each run's last round; bf16 means the nf4 layers' compute dtype and "
             "TRL's autocast. Design: benchmarks/perf/cpu_bf16_accuracy.py's docstring.", ""]  # fmt: skip
    for student, result in record["students"].items():
        runs, summary = result["runs"], result["summary"]
        forgetting = "forgetting" in summary
        lines += [f"## {student}", "",
                  "| seed | fp32 accuracy | bf16 accuracy | bf16 - fp32 | fp32 s | bf16 s | bf16 / fp32 time |"
                  + (" fp32 forgetting | bf16 forgetting |" if forgetting else ""),
                  "|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if forgetting else "")]  # fmt: skip
        for seed in summary["seeds"]:
            a, b = runs["fp32"][str(seed)], runs["bf16"][str(seed)]  # JSON keys
            row = (f"| {seed} | {a['accuracy']:.3f} | {b['accuracy']:.3f} | {b['accuracy'] - a['accuracy']:+.3f} | "
                   f"{a['seconds']:.0f} | {b['seconds']:.0f} | {b['seconds'] / a['seconds']:.2f} |")
            lines.append(row + (f" {a['forgetting']:.3f} | {b['forgetting']:.3f} |" if forgetting else ""))
        (fm, fs), (bm, bs) = summary["accuracy"]["fp32"], summary["accuracy"]["bf16"]
        dm, ds = summary["accuracy_difference"]
        tm, ts = summary["time_ratio"]
        lines += ["", f"Mean over seeds {summary['seeds']}: accuracy fp32 {fm:.3f} +- {fs:.3f}, bf16 {bm:.3f} +- "
                  f"{bs:.3f}; paired bf16 - fp32 {dm:+.3f} +- {ds:.3f}; time bf16 / fp32 {tm:.2f} +- {ts:.2f}.", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--students", nargs="+", choices=["demo", "smollm2"], default=["demo", "smollm2"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--demo-worker", nargs=2, metavar=("SEED", "BF16"), help=argparse.SUPPRESS)
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.demo_worker:
        print(json.dumps(demo_worker(int(args.demo_worker[0]), args.demo_worker[1] == "1")))
        return {}
    machine = identity()  # the CPU, its kernel flags, the libraries: runs are cached per machine
    cache = CACHE / identity_tag(machine)
    cache.mkdir(parents=True, exist_ok=True)
    out = Path(args.results)
    path = out / "cpu_bf16_accuracy.json"
    record = {"command": ("python benchmarks/perf/cpu_bf16_accuracy.py " + " ".join(argv or sys.argv[1:])).strip(),
              "machine": machine, "students": {}}  # fmt: skip
    for student in args.students:
        runs: dict[str, dict[int, dict]] = {p: {} for p in PRECISIONS}
        for seed in args.seeds:
            for bf16 in (False, True) if seed % 2 == 0 else (True, False):
                run = run_demo_seed(seed, bf16, cache) if student == "demo" else run_real_student_seed(seed, bf16)
                runs["bf16" if bf16 else "fp32"][seed] = run
                print(f"{student} seed {seed} {'bf16' if bf16 else 'fp32'}: accuracy {run['accuracy']:.3f}, "
                      f"{run['seconds']:.0f}s", flush=True)  # fmt: skip
        record["students"][student] = {"runs": runs, "summary": summarize(runs)}
        out.mkdir(parents=True, exist_ok=True)  # after each student: a stopped run keeps what it finished
        path.write_text(json.dumps(record, indent=1) + "\n")
        (out / "cpu_bf16_accuracy.md").write_text(markdown(json.loads(path.read_text())))
    print((out / "cpu_bf16_accuracy.md").read_text())
    return record


if __name__ == "__main__":
    main()
