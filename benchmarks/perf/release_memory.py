"""When MoT hands freed memory back to the OS: after every branch and merge (before) or once a round, after the merge.

``collection.release_freed_memory`` (gc, then glibc's ``malloc_trim``) returns the free parts of the heap; the next
step then faults in again every buffer it reuses. A short MoT run on SmolLM2-135M fp32 (the real student, converted
once by ``merge_of_thought.smollm2_135m()``) runs each way in its own process, alternating: ``branch`` trims after
every branch and merge (the rule before), ``round`` after the merge only (now). Reported: peak RSS, the first step of
each branch against the median step (the re-faulting shows in the first), and the wall time.

    python benchmarks/perf/release_memory.py               # T=3 K=2 S=3, batch 8, each way twice (~15 min)
    python benchmarks/perf/release_memory.py --repeats 1 --threads 1    # a shared machine: one thread
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, Timer, machine, peak_rss_mb, teacher_data  # noqa: E402
from hardware import describe, identity  # noqa: E402
from overhead import LORA, StepTimer, common_args  # noqa: E402

from merge_of_thought import MoTConfig, MoTTrainer, collection, smollm2_135m  # noqa: E402

ROUNDS, TEACHERS, STEPS, BATCH = 3, 2, 3, 8


def worker(policy: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    if policy == "branch":  # the rule before: also after every branch
        train_branch = MoTTrainer._train_branch

        def trimmed(self, *args, **kwargs):
            result = train_branch(self, *args, **kwargs)
            collection.release_freed_memory()
            return result

        MoTTrainer._train_branch = trimmed
    folder = smollm2_135m()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    data = {f"teacher{k}": teacher_data(k) for k in range(TEACHERS)}
    timer, out = StepTimer(), tempfile.TemporaryDirectory(prefix="mot-release-")
    with Timer() as wall:
        trainer = MoTTrainer(model, args=MoTConfig(num_rounds=ROUNDS, **common_args(out.name, STEPS, BATCH)),
                             teachers=data, processing_class=AutoTokenizer.from_pretrained(folder),
                             peft_config=LoraConfig(**LORA), callbacks=[timer])
        trainer.train()
    out.cleanup()
    branches: dict[str, list[float]] = {}
    for name, seconds in timer.steps:
        branches.setdefault(name, []).append(seconds)
    steps = [s for s, *_ in branches.values()]  # first step of each branch
    later = [s for _, *rest in branches.values() for s in rest]
    return {"wall_seconds": wall.seconds, "peak_rss_mb": peak_rss_mb(), "first_steps": steps,
            "median_first_step": median(steps), "median_later_step": median(later), "branches": branches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.threads)))
        return
    smollm2_135m()  # converted once, before the timed runs
    runs: dict[str, list[dict]] = {"branch": [], "round": []}
    for repeat in range(args.repeats):
        for policy in ("branch", "round") if repeat % 2 == 0 else ("round", "branch"):
            cmd = [sys.executable, __file__, "--worker", policy, "--threads", str(args.threads)]
            result = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[policy].append(json.loads(result.strip().splitlines()[-1]))
            print(policy, {k: v for k, v in runs[policy][-1].items() if k != "branches"}, flush=True)
            record = {"command": "python " + " ".join(sys.argv), "machine": {**machine(), "threads": args.threads,
                      **identity()}, "runs": runs,
                      "shape": {"rounds": ROUNDS, "teachers": TEACHERS, "steps": STEPS, "batch": BATCH}}  # fmt: skip
            (RESULTS / "release_memory.json").write_text(json.dumps(record, indent=2) + "\n")  # after every run
            (RESULTS / "release_memory.md").write_text("\n".join(markdown(record)) + "\n")
    print("\n".join(markdown(record)))


def markdown(record: dict) -> list[str]:
    shape = record["shape"]
    lines = [f"# Returning freed memory: after every branch or once a round (SmolLM2-135M fp32, T={shape['rounds']} "
             f"K={shape['teachers']} S={shape['steps']}, batch {shape['batch']})", "",
             f"Command: `{record['command']}` (torch threads: {record['machine']['threads']}). Machine: "
             f"{describe(record['machine'])}.", "",
             "| trim after | run | wall (s) | peak RSS (MB) | first step of a branch, median (s) | "
             "later steps, median (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for policy, results in record["runs"].items():
        for i, r in enumerate(results, start=1):
            lines.append(f"| {'every branch and merge' if policy == 'branch' else 'the merge only'} | {i} | "
                         f"{r['wall_seconds']:.1f} | {r['peak_rss_mb']:.0f} | {r['median_first_step']:.2f} | "
                         f"{r['median_later_step']:.2f} |")
    if not all(record["runs"].values()):  # a run of each rule first
        return lines
    ratio = {policy: [r["median_first_step"] / r["median_later_step"] for r in results]
             for policy, results in record["runs"].items()}
    peak = {policy: median(r["peak_rss_mb"] for r in results) for policy, results in record["runs"].items()}
    lines += ["", "First step of a branch / later steps (per run): " + "; ".join(
        f"{policy} {', '.join(f'{x:.2f}' for x in ratio[policy])}" for policy in ratio) +
        f". Peak RSS, trimming once a round / after every branch: {peak['round'] / peak['branch']:.3f} (medians)."]
    if record.get("note"):
        lines += ["", record["note"]]
    return lines


if __name__ == "__main__":
    main()
