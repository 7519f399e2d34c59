"""What evaluation costs a MoT run, on the demo's tiny 4-bit student and task (``mot demo``'s settings).

One run per ``eval_branches`` setting (none / loss / all), each of two rounds of four branches, with the merged
student evaluated every round (eval loss and greedy pass@1 on the 30 held-out problems, 64 new tokens). Reported:
seconds per branch (its training plus its own evaluation) and seconds per evaluation of the merged student, as
medians over the run. Written to benchmarks/results/eval_cost.json and printed as a table::

    python benchmarks/perf/eval_cost.py
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig

from merge_of_thought import MoTCallback, MoTConfig, MoTTrainer
from merge_of_thought.demo.run import DemoSettings, quiet
from merge_of_thought.demo.student import load_demo_student
from merge_of_thought.demo.task import make_problems, make_teacher_dataset, make_teacher_datasets
from merge_of_thought.students import student_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine  # noqa: E402


class EvalTimer(MoTCallback):
    """Seconds from the merge (or the start) to the end of the merged student's evaluation, per round."""

    def __init__(self):
        self.started, self.seconds = time.perf_counter(), {}

    def after_merge(self, trainer, round_idx, metrics):
        self.started = time.perf_counter()

    def on_evaluate(self, trainer, round_idx, metrics):
        self.seconds[round_idx] = time.perf_counter() - self.started


def run(eval_branches: str, settings: DemoSettings, rounds: int) -> dict:
    model, tokenizer = load_demo_student(student_path(settings.student), load_in_4bit=settings.load_in_4bit)
    split = dict(seed=settings.seed, eval_size=settings.eval_problems, digits=settings.digits)
    train = make_problems(settings.train_problems, split="train", **split)
    held_out = make_problems(settings.eval_problems, split="test", **split)
    eval_dataset = make_teacher_dataset("column", held_out).add_column("answer", [str(p.answer) for p in held_out])
    args = MoTConfig(
        output_dir=tempfile.mkdtemp(prefix="mot-eval-cost-"), num_rounds=rounds, max_steps=settings.max_steps,
        learning_rate=settings.learning_rate, lr_scheduler_type="constant",
        per_device_train_batch_size=settings.batch_size, gradient_checkpointing=False, report_to=[],
        disable_tqdm=True, logging_steps=settings.max_steps, seed=settings.seed, overwrite_output_dir=True,
        eval_accuracy_samples=len(held_out), eval_max_new_tokens=64, per_device_eval_batch_size=len(held_out),
        answer_match="numeric", eval_branches=eval_branches,
    )  # fmt: skip
    lora = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, target_modules="all-linear")
    timer = EvalTimer()
    trainer = MoTTrainer(model, args=args, teachers=make_teacher_datasets(train, seed=settings.seed),
                         processing_class=tokenizer, peft_config=lora, eval_dataset=eval_dataset,
                         callbacks=[timer])  # fmt: skip
    trainer.train()
    branches = [r["seconds"] for r in trainer.metrics.read() if r["type"] == "branch"]
    return {"eval_branches": eval_branches, "branch_seconds": statistics.median(branches),
            "student_eval_seconds": statistics.median(timer.seconds.values()), "branches": len(branches)}  # fmt: skip


def main() -> None:
    quiet()
    torch.set_num_threads(2)
    settings, rounds = DemoSettings(), 2
    results = [run(mode, settings, rounds) for mode in ("none", "loss", "all")]
    base = results[0]["branch_seconds"]
    print(f"{'eval_branches':>13}  {'s/branch':>8}  {'vs none':>7}  {'student eval s':>14}")
    for r in results:
        r["branch_vs_none"] = r["branch_seconds"] / base
        print(f"{r['eval_branches']:>13}  {r['branch_seconds']:>8.2f}  {r['branch_vs_none']:>6.2f}x  "
              f"{r['student_eval_seconds']:>14.2f}")  # fmt: skip
    record = {"settings": {"student": settings.student, "rounds": rounds, "teachers": 4,
                           "steps_per_branch": settings.max_steps, "batch_size": settings.batch_size,
                           "eval_problems": settings.eval_problems, "eval_max_new_tokens": 64},
              "results": results, "machine": machine()}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "eval_cost.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
