"""MoT-level hooks, transformers callbacks in every branch, TensorBoard per branch and per round, accuracy per round."""

from __future__ import annotations

import math

import pytest

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import TrainerCallback

from merge_of_thought import MoTCallback, MoTTrainer

from conftest import make_teacher
from helpers import quick_config, quick_lora


class Recorder(MoTCallback):
    def __init__(self):
        self.events = []

    def on_train_begin(self, trainer):
        self.events.append("train_begin")

    def on_round_begin(self, trainer, round_idx):
        self.events.append(f"round_begin {round_idx}")

    def on_branch_begin(self, trainer, round_idx, teacher):
        self.events.append(f"branch_begin {round_idx} {teacher}")

    def on_branch_end(self, trainer, round_idx, teacher, metrics):
        assert metrics["teacher"] == teacher and math.isfinite(metrics["train_loss"])
        self.events.append(f"branch_end {round_idx} {teacher}")

    def after_merge(self, trainer, round_idx, metrics):
        assert trainer.merged is not None and "merge_rank" in metrics
        self.events.append(f"after_merge {round_idx}")

    def on_evaluate(self, trainer, round_idx, metrics):
        self.events.append(f"evaluate {round_idx} {sorted(metrics)}")

    def on_round_end(self, trainer, round_idx, metrics):
        self.events.append(f"round_end {round_idx}")
        trainer.should_stop = round_idx == 1  # stop after round 1 of 2

    def on_train_end(self, trainer, rounds):
        self.events.append(f"train_end {len(rounds)}")


class CountBranches(TrainerCallback):
    def __init__(self):
        self.run_names = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.run_names.append(args.run_name)


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_hooks_callbacks_tensorboard_and_round_accuracy(qwen3_dir, tokenizer, tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    recorder, counter = Recorder(), CountBranches()
    held_out = make_teacher(0, n=4, seed=9).map(lambda r: {"answer": r["completion"].split("#### ")[1]})
    trainer = MoTTrainer(
        qwen3_dir,
        args=quick_config(tmp_path, num_rounds=2, max_steps=2, report_to=["tensorboard"], eval_accuracy_samples=3,
                          eval_max_new_tokens=4, per_device_eval_batch_size=2),
        teachers={"a": make_teacher(0, n=8), "b": make_teacher(1, n=8)},
        processing_class=tokenizer,
        peft_config=quick_lora(),
        eval_dataset=held_out,
        callbacks=[recorder, counter],  # one list: sorted by type
    )
    rounds = trainer.train()

    metrics = "['eval_accuracy', 'eval_loss', 'eval_skipped']"
    assert recorder.events == [
        "train_begin", f"evaluate 0 {metrics}",
        "round_begin 1", "branch_begin 1 a", "branch_end 1 a", "branch_begin 1 b", "branch_end 1 b",
        "after_merge 1", f"evaluate 1 {metrics}", "round_end 1", "train_end 1",
    ]
    assert counter.run_names == ["round1/a", "round1/b"]  # the TrainerCallback reached every branch's trainer
    assert len(rounds) == 1 and 0 <= rounds[0]["eval_accuracy"] <= 1 and len(trainer.last_eval_records) == 3
    round0 = trainer.metrics.read()[0]
    assert round0["round"] == 0 and set(round0) == {"type", "round", "eval_loss", "eval_accuracy", "eval_skipped"}

    runs = tmp_path / "runs"
    for teacher, steps in (("a", [1, 2]), ("b", [3, 4])):  # each branch in its own folder, at the run's global step
        branch = scalars(runs / "round-001" / teacher)
        assert [step for step, _ in branch["train/loss"]] == steps  # b's curve goes on where a's ended
    mot = scalars(runs / "mot")
    assert [step for step, _ in mot["eval/loss"]] == [0, 1] and [s for s, _ in mot["eval/accuracy"]] == [0, 1]
    assert mot["eval/loss"][1][1] == pytest.approx(rounds[0]["eval_loss"], rel=1e-6)
    assert [step for step, _ in mot["train/a/train_loss"]] == [1] and "train/merge_rank" in mot
