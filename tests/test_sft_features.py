"""SFTTrainer features inside every MoT branch: chat data with assistant-only loss, prompt-completion with
completion-only loss, packing, gradient checkpointing and a held-out eval set.

Each run is 1 round x 2 teachers x 1 step; a TrainerCallback (which MoTTrainer hands to every branch's SFTTrainer)
captures the first collated batch of each branch, so the label masking TRL applied can be read back exactly.
(Liger kernels, ``use_liger_kernel=True``, pass through the same way but are not installed here.)
"""

from __future__ import annotations

import math

from datasets import Dataset
from transformers import TrainerCallback

from conftest import make_teacher
from helpers import quick_trainer

IGNORE = -100


class FirstBatches(TrainerCallback):
    """Records each branch's first collated batch and whether gradient checkpointing was on."""

    def __init__(self):
        self.batches, self.checkpointing = [], []

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self.batches.append(next(iter(train_dataloader)))
        self.checkpointing.append(model.get_base_model().is_gradient_checkpointing)


def conversational(style: int, n: int = 8) -> Dataset:
    rows = make_teacher(style, n=n, seed=style)
    return Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": r["prompt"].strip()},
                    {"role": "assistant", "content": r["completion"]},
                ]
            }
            for r in rows
        ]
    )


def trained_tokens(batch, tokenizer) -> list[str]:
    """Per row, the text of the tokens that carry a loss (labels != -100)."""
    return [tokenizer.decode(row[row != IGNORE]) for row in batch["labels"]]


def test_conversational_assistant_only_loss_checkpointing_and_eval(qwen3_dir, tokenizer, tmp_path):
    teachers = {f"t{k}": conversational(k) for k in range(2)}
    spy = FirstBatches()
    trainer = quick_trainer(
        qwen3_dir, teachers, tmp_path, tokenizer=tokenizer, num_rounds=1, max_steps=1,
        assistant_only_loss=True, gradient_checkpointing=True,
    )
    trainer.callbacks.append(spy)
    trainer.eval_dataset = conversational(3, n=4)
    rounds = trainer.train()

    assert len(spy.batches) == 2 and spy.checkpointing == [True, True]  # both branches, checkpointing on
    for k, batch in enumerate(spy.batches):
        answers = {m[1]["content"] + tokenizer.eos_token for m in teachers[f"t{k}"]["messages"]}
        for row_text in trained_tokens(batch, tokenizer):
            assert row_text in answers  # exactly the assistant turn: "user: ..." and "assistant: " are masked
    records = trainer.metrics.read()
    evals = [r for r in records if r["type"] == "round"]
    assert [r["round"] for r in evals] == [0, 1]  # the starting student, then the merged one
    assert all(math.isfinite(r["eval_loss"]) for r in evals) and rounds[0]["eval_loss"] == evals[1]["eval_loss"]
    assert all(math.isfinite(r["train_loss"]) for r in records if r["type"] == "branch")


def test_prompt_completion_completion_only_loss_with_packing(qwen3_dir, tokenizer, tmp_path):
    teachers = {f"t{k}": make_teacher(k, n=8, seed=k) for k in range(2)}
    spy = FirstBatches()
    trainer = quick_trainer(
        qwen3_dir, teachers, tmp_path, tokenizer=tokenizer, num_rounds=1, max_steps=1,
        completion_only_loss=True, packing=True, max_length=128, per_device_train_batch_size=2,
    )
    trainer.callbacks.append(spy)
    trainer.train()

    assert len(spy.batches) == 2
    for k, batch in enumerate(spy.batches):
        assert len(trainer.datasets[f"t{k}"]) < 8  # packed: several examples per row
        # Padding-free packing: one row per batch, position ids restart at every packed example.
        starts = int((batch["position_ids"] == 0).sum())
        assert starts >= 3
        completions = {r["completion"] + tokenizer.eos_token for r in teachers[f"t{k}"]}
        trained = trained_tokens(batch, tokenizer)[0]
        pieces = [p + tokenizer.eos_token for p in trained.split(tokenizer.eos_token)[:-1]]
        assert len(pieces) == starts and all(p in completions for p in pieces)  # prompts carry no loss
