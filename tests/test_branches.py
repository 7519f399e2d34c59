"""branch_state="persistent" (branches.py): a branch keeps its LoRA factors and optimizer state across rounds."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer
from transformers import AutoModelForCausalLM, TrainerCallback

from merge_of_thought import MoTConfig
from merge_of_thought.adapters import add_branch_adapter, detach_adapter
from merge_of_thought.checkpointing import RunFolder

from conftest import make_teacher
from crash_run import small_run
from helpers import dense_adapter, quick_lora, quick_trainer
from test_reliability import crash_run, max_abs_diff

CONSTANT = dict(lr_scheduler_type="constant", learning_rate=3e-3)


def one_batch_teacher() -> Dataset:
    """Four rows = one batch of four: every step sees the same batch whatever the data order."""
    return make_teacher(0, n=4, seed=0)


def test_one_persistent_branch_is_sft_without_restarts(qwen3_dir, tokenizer, tmp_path):
    """K = 1, s = 1: three rounds of two steps equal one SFT run of six steps (factors and AdamW carried)."""
    trainer = quick_trainer(qwen3_dir, {"only": one_batch_teacher()}, tmp_path / "mot", tokenizer, num_rounds=3,
                            branch_state="persistent", allow_single_teacher=True, **CONSTANT)  # fmt: skip
    records = trainer.train()
    model = AutoModelForCausalLM.from_pretrained(qwen3_dir, dtype=torch.float32)
    sft_args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=6, per_device_train_batch_size=4, report_to=[],
                         disable_tqdm=True, seed=0, save_strategy="no", bf16=False, **CONSTANT)  # fmt: skip
    model = add_branch_adapter(model, "default", quick_lora(task_type="CAUSAL_LM"), seed=trainer._branch_seed(1, 0))
    sft = SFTTrainer(model, args=sft_args, train_dataset=one_batch_teacher(), processing_class=tokenizer)
    for param in sft.model.parameters():  # fp32 adapters, as MoT keeps them
        if param.requires_grad:
            param.data = param.data.float()
    sft.train()
    sft_delta = {n: d.dense().double() for n, d in detach_adapter(sft.model, "default").deltas().items()}
    student = dense_adapter(tmp_path / "mot" / "round-003" / "merged")
    for name, delta in sft_delta.items():
        assert delta.norm() > 0
        assert ((student[name] - delta).norm() / delta.norm()).item() < 1e-4, name
    # the student after every round is the branch itself: no restart, no rank growth
    for r in (1, 2, 3):
        branch = dense_adapter(tmp_path / "mot" / f"round-00{r}" / "branch-only")
        merged = dense_adapter(tmp_path / "mot" / f"round-00{r}" / "merged")
        assert all(((merged[n] - branch[n]).norm() / branch[n].norm()).item() < 1e-5 for n in branch)
    assert [rec["merge_rank"] for rec in records] == [4, 4, 4]
    assert all(rec["merge_kept_norm"] == pytest.approx(1.0) for rec in records)


def test_persistent_branches_start_each_round_at_the_student_and_keep_their_optimizer(
    qwen3_dir, tokenizer, teachers, tmp_path
):
    seen = []

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step == 0:
                steps = {int(s["step"]) for s in optimizer.state_dict()["state"].values()} or {0}
                seen.append((args.run_name, steps))

    trainer = quick_trainer(qwen3_dir, teachers, tmp_path, tokenizer, num_rounds=3, branch_state="persistent")
    trainer.callbacks.append(Probe())
    records = trainer.train()
    # AdamW's step count goes on from round to round (2 steps a round)
    assert [s for name, s in seen if name.endswith("teacher1")] == [{0}, {2}, {4}]
    # the merged delta after round 3 is the weighted mean of the branches' products (the merge telescopes) ...
    run = tmp_path
    expected = None
    for teacher in teachers:
        product = dense_adapter(run / "round-003" / f"branch-{teacher}")
        expected = {n: d / 3 for n, d in product.items()} if expected is None else {
            n: expected[n] + d / 3 for n, d in product.items()}  # fmt: skip
    merged = dense_adapter(run / "round-003" / "merged")
    assert all(((merged[n] - expected[n]).norm() / expected[n].norm()).item() < 1e-4 for n in expected)
    # ... so its rank stays at K * r instead of growing every round
    assert [rec["merge_rank"] for rec in records] == [12, 12, 12]
    assert all(0 < rec["merge_kept_norm"] < 1 for rec in records)
    assert json.loads((run / "mot_run.json").read_text())["branch_state"] == "persistent"
    assert (run / "round-002" / "optimizer-teacher0" / "optimizer.pt").exists()


def test_fresh_branches_report_how_much_the_merge_keeps(qwen3_dir, tokenizer, teachers, tmp_path):
    records = quick_trainer(qwen3_dir, teachers, tmp_path, tokenizer).train()
    assert [rec["merge_rank"] for rec in records] == [12, 24]  # fresh branches: K*r more every round
    assert all(1 / 3**0.5 * 0.5 < rec["merge_kept_norm"] < 1 for rec in records)


def test_sigkill_then_resume_a_persistent_run_gives_the_same_student(qwen3_dir, tmp_path):
    reference = tmp_path / "reference"
    small_run(qwen3_dir, reference, num_rounds=3, branch_state="persistent").train()
    killed = tmp_path / "killed"
    crashed = crash_run(qwen3_dir, str(killed), "--kill-branch", "3", "teacher1", "2", "--rounds", "3",
                        "--branch-state", "persistent")  # fmt: skip
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    point = RunFolder(killed).resume_point(["teacher0", "teacher1"])
    assert (point.rounds_done, point.branches_done) == (2, ["teacher0"])
    resumed = crash_run(qwen3_dir, str(killed), "--resume", "--rounds", "3", "--branch-state", "persistent")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    from pathlib import Path

    assert max_abs_diff(reference, killed, Path("round-003") / "merged") <= 1e-6


def test_branch_state_is_validated():
    with pytest.raises(ValueError, match="branch_state must be 'fresh' or 'persistent'"):
        MoTConfig(output_dir="unused", branch_state="sticky")
