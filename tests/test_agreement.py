"""Agreement reported every round: each branch's own eval beside the merged student's (metrics, TensorBoard, card)."""

from __future__ import annotations

import pytest
import torch

from merge_of_thought import MoTTrainer

from conftest import make_teacher
from helpers import quick_config, quick_lora
from test_callbacks_logging import scalars


def held_out():
    return make_teacher(0, n=4, seed=9).map(lambda r: {"answer": r["completion"].split("#### ")[1]})


def run(qwen3_dir, tokenizer, folder, teachers, **config) -> MoTTrainer:
    config = {"eval_branches": "all", **config}  # a branch's generation accuracy too (the default is its loss)
    args = quick_config(folder, num_rounds=1, max_steps=3, eval_accuracy_samples=2, eval_max_new_tokens=4,
                        per_device_eval_batch_size=2, **config)  # fmt: skip
    trainer = MoTTrainer(qwen3_dir, args=args, teachers=teachers, processing_class=tokenizer,
                         peft_config=quick_lora(), eval_dataset=held_out())  # fmt: skip
    trainer.train()
    return trainer


def branch_records(trainer: MoTTrainer) -> dict[str, dict]:
    return {r["teacher"]: r for r in trainer.metrics.read() if r["type"] == "branch"}


def test_a_lone_branch_scores_what_the_student_it_becomes_scores(qwen3_dir, tokenizer, tmp_path):
    """One teacher, one round: the merged student IS the branch, so the branch's eval must equal the round's eval
    (and differ from the starting student's: the branch eval sees the branch's update, not the student alone)."""
    trainer = run(qwen3_dir, tokenizer, tmp_path, {"a": make_teacher(0, n=8)}, allow_single_teacher=True)
    start, merged = (r for r in trainer.metrics.read() if r["type"] == "round")
    branch = branch_records(trainer)["a"]
    assert branch["eval_loss"] == pytest.approx(merged["eval_loss"], rel=1e-4)
    assert branch["eval_accuracy"] == merged["eval_accuracy"]
    assert abs(branch["eval_loss"] - start["eval_loss"]) > 1e-3


def test_branch_evals_reach_metrics_tensorboard_and_card_and_leave_training_alone(qwen3_dir, tokenizer, tmp_path,
                                                                                  monkeypatch):  # fmt: skip
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    teachers = {"a": make_teacher(0, n=8), "b": make_teacher(1, n=8)}
    with_evals = run(qwen3_dir, tokenizer, tmp_path / "on", teachers, report_to=["tensorboard"])
    without = run(qwen3_dir, tokenizer, tmp_path / "off", teachers, eval_branches=False)

    records = branch_records(with_evals)
    assert all({"eval_loss", "eval_accuracy"} <= set(r) for r in records.values())
    assert records["a"]["eval_loss"] != records["b"]["eval_loss"]  # each branch on its own update
    assert not any("eval_loss" in r for r in branch_records(without).values())
    for name, delta in with_evals.merged.items():  # evaluating a branch changes nothing it trains or merges
        torch.testing.assert_close(delta.dense(), without.merged[name].dense(), rtol=0, atol=1e-6)
    assert len(with_evals.last_eval_records) == 2  # still the merged student's generations

    mot = scalars(tmp_path / "on" / "runs" / "mot")
    assert mot["train/a/eval_loss"] == [(1, pytest.approx(records["a"]["eval_loss"], rel=1e-6))]

    with_evals.save_adapter(tmp_path / "adapter")
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "branches' eval loss (mean)" in card and "branches' eval accuracy (mean)" in card
    mean = (records["a"]["eval_loss"] + records["b"]["eval_loss"]) / 2
    assert f"{mean:.4g}" in card
    without.save_adapter(tmp_path / "adapter-off")
    assert "branches' eval" not in (tmp_path / "adapter-off" / "README.md").read_text()
