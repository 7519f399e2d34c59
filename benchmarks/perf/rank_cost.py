"""What the frozen merged adapter costs a training step, by its rank: the step time of round t against round 1.

With K teachers of LoRA rank r, the exact merged delta has rank up to K*r*(t-1) when round t trains (round 1 trains
on the bare student). This benchmark installs a merged adapter of each such rank on the same loaded model (random
fp32 factors: the cost does not depend on the values), attaches a fresh rank-r branch like MoT does, and times
SFTTrainer steps. ``merge_max_rank=K*r`` keeps every later round at the rank-K*r cost. An fp32 student holds the
delta in its weights instead (``frozen_delta="auto"``): the ``fp32-weights`` rows.

Where the delta is a frozen adapter, the steps alternate between MoT's one low-rank pass for the merged adapter and
the branch (fused.py, the default) and PEFT's pass per adapter, in the same trainer: a side-by-side ratio.

    python benchmarks/perf/rank_cost.py                  # 70M Qwen3, K=4 r=16 (ranks 0..320), fp32 and nf4, ~9 min
    python benchmarks/perf/rank_cost.py --size tiny --steps 3 --precisions fp32   # smoke run

Writes the ``rank_cost`` record of benchmarks/results/perf.json and its table in rank_cost.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch
from peft import LoraConfig
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, build_student, machine, teacher_data, update_results  # noqa: E402
from cpu_bf16 import cpu_capabilities, cpu_kind  # noqa: E402
from overhead import StepTimer, load  # noqa: E402

from merge_of_thought import adapters  # noqa: E402
from merge_of_thought.frozen import FrozenDelta  # noqa: E402
from merge_of_thought.merging import LowRankDelta  # noqa: E402


# student precision -> (how it is loaded, where the merged delta lives)
HOMES = {"fp32": ("fp32", "adapter"), "fp32-weights": ("fp32", "weights"), "nf4": ("nf4", "adapter")}


def merged_of_rank(shapes: dict[str, tuple[int, int]], rank: int, seed: int = 0) -> dict[str, LowRankDelta]:
    """Random fp32 factors of ``rank`` (capped by the layer's size) for every adapted layer."""
    generator = torch.Generator().manual_seed(seed)
    merged = {}
    for name, (fan_in, fan_out) in shapes.items():
        r = min(rank, fan_in, fan_out)
        merged[name] = LowRankDelta(torch.randn(fan_out, r, generator=generator) * 1e-3,
                                    torch.randn(r, fan_in, generator=generator) * 1e-3)
    return merged


class AlternatePasses(TrainerCallback):
    """Odd steps in PEFT's pass per adapter, even steps in MoT's one pass (fused.py); steps are tagged with it.
    Listed before the StepTimer, so the switch is not timed."""

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        one_pass = state.global_step % 2 == 0
        adapters.activate(model, "branch", one_pass=one_pass)
        args.run_name = "one-pass" if one_pass else "two-pass"  # the tag StepTimer records


def step_times(model, shapes, tokenizer, lora: LoraConfig, rank: int, steps: int, warmup: int, batch: int,
               home: FrozenDelta) -> tuple[dict[str, list[float]], object]:  # fmt: skip
    """Step times of a fresh branch trained above a merged delta of ``rank`` (0: none) in ``home`` (a frozen
    adapter, or the fp32 weights), by pass ("one-pass", and "two-pass" where a frozen adapter makes them differ),
    and the wrapped model."""
    if rank:
        model = home.install(model, merged_of_rank(shapes, rank))
    model = adapters.add_branch_adapter(model, "branch", lora, seed=0)
    timer = StepTimer()
    alternate = bool(rank) and home.home == "adapter"
    callbacks = [AlternatePasses(), timer] if alternate else [timer]
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, max_steps=warmup + steps * (2 if alternate else 1),
                         per_device_train_batch_size=batch, learning_rate=1e-4, bf16=False,
                         gradient_checkpointing=False, report_to=[], save_strategy="no", disable_tqdm=True,
                         logging_steps=10**6, dataloader_pin_memory=False, run_name="one-pass")
        SFTTrainer(model, args=args, train_dataset=teacher_data(0), processing_class=tokenizer,
                   callbacks=callbacks).train()
    by_pass: dict[str, list[float]] = {}
    for tag, seconds in timer.steps[warmup:]:
        by_pass.setdefault(tag, []).append(seconds)
    return by_pass, model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="70m", choices=["70m", "tiny"])
    parser.add_argument("--precisions", nargs="+", default=list(HOMES), choices=list(HOMES),
                        help="fp32-weights: an fp32 student holding the delta in its weights (frozen_delta='weights')")
    parser.add_argument("--teachers", type=int, default=4)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per rank (after 2 warm-up steps)")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    folder = build_student(Path(tempfile.gettempdir()) / f"mot-bench-{args.size}", args.size)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    ranks = [args.teachers * args.lora_r * t for t in range(args.rounds)]  # what round t+1 trains above
    record = {"machine": machine(), "cpu": cpu_capabilities(), "size": args.size, "teachers": args.teachers,
              "lora_r": args.lora_r, "batch": args.batch, "timed_steps": args.steps, "results": {}}
    for precision in args.precisions:
        loaded_as, home = HOMES[precision]
        model = load(folder, loaded_as)
        frozen = FrozenDelta(home, None, "CAUSAL_LM")
        modules = adapters.check_targets(model, lora)
        shapes = dict(zip(modules, adapters.layer_dims(model, modules)))
        rows = []
        for rank in ranks:
            times, model = step_times(model, shapes, tokenizer, lora, rank, args.steps, warmup=2, batch=args.batch,
                                      home=frozen)  # fmt: skip
            merged_mb = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                            if adapters.MERGED_ADAPTER in n) / 2**20
            adapters.remove_adapter(model, "branch")
            row = {"merged_rank": rank, "step_seconds": median(times["one-pass"]), "merged_adapter_mb": merged_mb}
            if "two-pass" in times:
                row["two_pass_step_seconds"] = median(times["two-pass"])
            rows.append(row)
            print(f"{precision} merged rank {rank}: {row['step_seconds']:.3f} s/step (PEFT's two passes: "
                  f"{row.get('two_pass_step_seconds', row['step_seconds']):.3f}), adapter {merged_mb:.1f} MB",
                  flush=True)  # fmt: skip
        base = rows[0]["step_seconds"]
        for row in rows:
            row["vs_round1"] = row["step_seconds"] / base
            row["two_pass_vs_round1"] = row.get("two_pass_step_seconds", row["step_seconds"]) / base
        record["results"][precision] = rows
        del model
    record["command"] = "python benchmarks/perf/rank_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    record["date"] = time.strftime("%Y-%m-%d")
    update_results("rank_cost", record)
    write_markdown(record)
    return record


def write_markdown(record: dict) -> None:
    k, r = record["teachers"], record["lora_r"]
    lines = [
        f"# Step time against the merged adapter's rank ({record['size']} Qwen3, K={k}, r={r}, batch "
        f"{record['batch']})",
        "",
        f"Command: `{record['command'].strip()}`. Median of {record['timed_steps']} steps per rank and pass, all "
        "ranks in one process on one loaded model. Round t trains above a merged adapter of rank K*r*(t-1) when the "
        f"merge is exact (the default); with `merge_max_rank={k * r}` every round after the first stays at rank "
        f"{k * r}. With a frozen adapter, steps alternate between MoT's one low-rank pass for it and the branch "
        "(the default) and PEFT's pass per adapter.",
        "",
        f"Machine: {cpu_kind(record['cpu']) if 'cpu' in record else 'not recorded'}.",
        "",
        "| precision | round | exact merged rank | s/step | vs round 1 | PEFT's two passes: s/step | vs round 1 | "
        "one pass / two | merged adapter MB (fp32) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for precision, rows in record["results"].items():
        for t, row in enumerate(rows, 1):
            two = row.get("two_pass_step_seconds")
            two_cells = f"{two:.3f} | {row['two_pass_vs_round1']:.3f} | {row['step_seconds'] / two:.3f}" if two else (
                "- | - | -")
            lines.append(f"| {precision} | {t} | {row['merged_rank']} | {row['step_seconds']:.3f} | "
                         f"{row['vs_round1']:.3f} | {two_cells} | {row['merged_adapter_mb']:.1f} |")
    (RESULTS / "rank_cost.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
