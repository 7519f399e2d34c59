"""MoTTrainer end to end on tiny Qwen3 and Llama students: exact merges, fidelity per precision, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback
from trl import SFTTrainer

import merge_of_thought.mot_trainer as mot_trainer_module
from merge_of_thought.adapters import MERGED_ADAPTER, base_weight, lora_layers

from helpers import dense_adapter, quick_trainer

PRECISIONS = {
    "fp32": dict(dtype=torch.float32),
    "bf16": dict(dtype=torch.bfloat16),
    "int8": dict(quantization_config=BitsAndBytesConfig(load_in_8bit=True)),
    "nf4": dict(
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    ),
}


def effective_weights(model: PeftModel) -> dict[str, torch.Tensor]:
    """What the next round trains from: the (dequantized) base plus the merged adapter's delta, in float64."""
    out = {}
    for name, layer in lora_layers(model).items():
        W = base_weight(layer).double()
        if MERGED_ADAPTER in layer.lora_A:
            A = layer.lora_A[MERGED_ADAPTER].weight.double()
            B = layer.lora_B[MERGED_ADAPTER].weight.double()
            W = W + B @ A * layer.scaling[MERGED_ADAPTER]
        out[name] = W
    return out


@pytest.mark.parametrize("step_size", [1.0, 2.5])
def test_round_equals_exact_weighted_average_of_saved_branches(model_dir, teachers, tmp_path, step_size):
    """Recompute round 2 from disk alone: merged_2 = merged_1 + step * sum_k w_k * branch_k (non-uniform weights;
    step = merge_step_size, 1 in the paper)."""
    weights = {"teacher0": 0.5, "teacher1": 0.3, "teacher2": 0.2}
    trainer = quick_trainer(model_dir, teachers, tmp_path, teacher_weights=weights, merge_step_size=step_size,
                            frozen_delta="adapter")  # the adapter home on every precision (weights: test_frozen.py)
    trainer.train()
    run = Path(tmp_path)
    previous = dense_adapter(run / "round-001" / "merged")
    expected = {name: d.clone() for name, d in previous.items()}
    round_record = json.loads((run / "round-002" / "round.json").read_text())
    assert round_record["start_state"] == "../round-001/merged"
    for teacher, info in round_record["teachers"].items():
        assert info["weight"] == pytest.approx(weights[teacher])
        for name, delta in dense_adapter(run / "round-002" / info["adapter"]).items():
            expected[name] += step_size * weights[teacher] * delta
    saved = dense_adapter(run / "round-002" / "merged")
    live = effective_weights(trainer.model)
    base = {name: base_weight(layer).double() for name, layer in lora_layers(trainer.model).items()}
    assert set(saved) == set(expected) == set(live)
    allowed = trainer.args.merge_tolerance + 1e-5  # what recompression may drop, plus fp32 rounding
    for name in expected:
        update_norm = (expected[name] - previous[name]).norm()
        assert update_norm > 0, "the branches must have learned something"
        assert (saved[name] - expected[name]).norm() / update_norm <= allowed
        assert (live[name] - base[name] - expected[name]).norm() / update_norm <= allowed


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_merge_fidelity_and_no_requantization(precision, qwen3_dir, teachers, tmp_path):
    """Effective weights after a merge equal student + sum_k w_k dW_k within 1e-3 of the update, per layer."""
    model = AutoModelForCausalLM.from_pretrained(qwen3_dir, **PRECISIONS[precision])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = {}

    class Snapshot(TrainerCallback):
        """Effective weights at the start of every branch: the state each round trains from."""

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen.setdefault(args.run_name.split("/")[0], effective_weights(model))

    trainer = quick_trainer(model, dict(list(teachers.items())[:2]), tmp_path, frozen_delta="adapter")
    trainer.callbacks.append(Snapshot())
    trainer.train()
    before, after = seen["round2"], effective_weights(trainer.model)
    round1_start = seen["round1"]
    branches = [dense_adapter(tmp_path / "round-002" / f"branch-teacher{k}") for k in range(2)]
    for name in after:
        update = 0.5 * branches[0][name] + 0.5 * branches[1][name]
        assert update.norm() > 0
        error = (after[name] - (before[name] + update)).norm() / update.norm()
        assert error <= 1e-3, f"{precision} {name}: relative error {error:.2e}"
        assert not torch.equal(before[name], round1_start[name])
    # The base weights (packed 4-bit, int8, bf16 or fp32) are bit-for-bit those loaded: nothing re-quantized.
    base = trainer.model.get_base_model()
    for name, param in base.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param.detach(), frozen[name.replace(".base_layer", "")]), name
    for layer in lora_layers(trainer.model).values():  # fp32 factors where the layer computes (none left on meta)
        device = layer.get_base_layer().weight.device
        for factor in (layer.lora_A[MERGED_ADAPTER].weight, layer.lora_B[MERGED_ADAPTER].weight):
            assert factor.dtype == torch.float32 and factor.device == device


class InitProbe(TrainerCallback):
    """The trainable LoRA A of each branch as its training begins."""

    def __init__(self):
        self.first_a = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        trainable = [p for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n]
        self.first_a.append(torch.cat([p.detach().flatten() for p in trainable]).clone())


@pytest.mark.parametrize("shared", [False, True])
def test_branch_inits_differ_unless_shared(qwen3_dir, teachers, tmp_path, shared):
    probe = InitProbe()
    trainer = quick_trainer(qwen3_dir, teachers, tmp_path, shared_branch_init=shared)
    trainer.callbacks.append(probe)
    trainer.train()
    round1, round2 = probe.first_a[:3], probe.first_a[3:]
    assert all(torch.equal(a, round1[0]) == shared for a in round1[1:])  # one draw per round when shared
    assert all(torch.equal(a, round2[0]) == shared for a in round2[1:])
    assert not torch.equal(round1[0], round2[0])  # every round draws afresh


def test_fresh_adapter_and_optimizer_per_branch(qwen3_dir, teachers, tmp_path):
    starts = []

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
            trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
            starts.append(
                dict(
                    run=args.run_name,
                    b_zero=all(p.abs().max() == 0 for n, p in trainable.items() if "lora_B" in n),
                    merged_frozen=all(MERGED_ADAPTER not in n for n in trainable),
                    n_trainable=len(trainable),
                    optimizer=optimizer,  # the object: kept alive, its id cannot be reused by a later one
                    optimizer_state=len(optimizer.state),
                    lr_step=lr_scheduler.last_epoch,
                    step=state.global_step,
                )
            )

    trainer = quick_trainer(qwen3_dir, teachers, tmp_path)
    trainer.callbacks.append(Probe())
    trainer.train()
    assert [s["run"] for s in starts] == [f"round{r}/teacher{k}" for r in (1, 2) for k in range(3)]
    assert all(s["b_zero"] and s["merged_frozen"] for s in starts)
    assert len({s["n_trainable"] for s in starts}) == 1 and starts[0]["n_trainable"] == 2 * 7 * 2
    assert len({id(s["optimizer"]) for s in starts}) == len(starts)  # a new optimizer per branch
    assert all(s["optimizer_state"] == 0 and s["lr_step"] == 0 and s["step"] == 0 for s in starts)


def test_same_seed_same_student_other_seed_other_student(qwen3_dir, teachers, tmp_path):
    def run(seed, folder):
        trainer = quick_trainer(qwen3_dir, teachers, tmp_path / folder, seed=seed, num_rounds=1)
        trainer.train()
        return dense_adapter(tmp_path / folder / "round-001" / "merged")

    a, b, c = run(0, "a"), run(0, "b"), run(1, "c")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.allclose(a[n], c[n]) for n in a)


def test_each_teacher_is_tokenized_once(qwen3_dir, teachers, tmp_path, monkeypatch):
    received = []

    class RecordingSFTTrainer(SFTTrainer):
        def __init__(self, *args, train_dataset=None, **kwargs):
            received.append("input_ids" in train_dataset.column_names)
            super().__init__(*args, train_dataset=train_dataset, **kwargs)

    monkeypatch.setattr(mot_trainer_module, "SFTTrainer", RecordingSFTTrainer)
    quick_trainer(qwen3_dir, teachers, tmp_path, num_rounds=3, max_steps=1).train()
    assert len(received) == 9
    assert received.count(False) == 3  # the first branch of each teacher tokenizes it
    assert all(received[3:])  # every later branch gets the tokenized copy



def test_a_prepared_data_set_is_not_prepared_again_and_trains_the_same(qwen3_dir, teachers, tmp_path, monkeypatch):
    """TRL maps an already tokenized data set through its truncation and fully-masked filter again in every branch;
    MoT skips that for the data sets it prepared, which leaves the rows, and so the student, as they were."""
    prepared, prepare = [], SFTTrainer._prepare_dataset
    monkeypatch.setattr(SFTTrainer, "_prepare_dataset",
                        lambda self, dataset, *args: prepared.append(dataset) or prepare(self, dataset, *args))
    quick_trainer(qwen3_dir, teachers, tmp_path / "skipped", num_rounds=2).train()
    assert len(prepared) == 3  # each teacher's, in its first branch
    sft_trainer = mot_trainer_module.MoTTrainer._sft_trainer
    monkeypatch.setattr(mot_trainer_module.MoTTrainer, "_sft_trainer",
                        lambda self, *args, prepared=False, **kwargs: sft_trainer(self, *args, **kwargs))
    quick_trainer(qwen3_dir, teachers, tmp_path / "every", num_rounds=2).train()
    assert len(prepared) == 3 + 6  # as before: every branch
    skipped, every = (dense_adapter(tmp_path / run / "round-002" / "merged") for run in ("skipped", "every"))
    assert all(torch.equal(skipped[n], every[n]) for n in skipped)

def test_run_folder_rebuilds_the_student_without_the_trainer(qwen3_dir, teachers, tokenizer, tmp_path):
    trainer = quick_trainer(qwen3_dir, teachers, tmp_path)
    trainer.train()
    ids = tokenizer(["Q: 12+30=?\nthink:"], return_tensors="pt").input_ids
    with torch.no_grad():
        expected = trainer.model(ids).logits
        rebuilt = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(qwen3_dir), tmp_path / "round-002" / "merged"
        )
        got = rebuilt(ids).logits
    assert (got - expected).abs().max() < 1e-4
    config = json.loads((tmp_path / "round-002" / "merged" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == qwen3_dir
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["type"] for row in lines] == ["branch"] * 3 + ["round"] + ["branch"] * 3 + ["round"]
    for line in lines:
        if line["type"] == "branch":
            assert line["steps"] == 2 and line["seconds"] > 0 and line["train_loss"] > 0
        else:
            assert line["merge_seconds"] >= 0 and line["merge_rel_error_max"] < 1e-3
