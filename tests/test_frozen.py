"""frozen.py: the merged delta added into an fp32 student's weights trains the same student as the frozen adapter,
with no adapter pass left per step; quantized and bf16 students keep the adapter."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback

from merge_of_thought import MoTTrainer, checkpointing, frozen, merging
from merge_of_thought.adapters import MERGED_ADAPTER, check_targets, lora_layers, save_merged
from merge_of_thought.checkpointing import SavedDelta
from merge_of_thought.frozen import FrozenDelta, resolve
from merge_of_thought.merging import LowRankDelta, merge_round

from helpers import quick_config, quick_lora, quick_trainer


class ActiveAdapters(TrainerCallback):
    """The adapters active in the first adapted layer as each branch starts: what every step computes."""

    def __init__(self):
        self.seen = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        layer = next(iter(lora_layers(model).values()))
        self.seen.append((args.run_name, sorted(layer.active_adapters)))


def run(qwen3_dir, teachers, folder, home, **config) -> tuple[MoTTrainer, ActiveAdapters]:
    model = AutoModelForCausalLM.from_pretrained(qwen3_dir, dtype=torch.float32)
    trainer = quick_trainer(model, teachers, folder, frozen_delta=home, **config)
    probe = ActiveAdapters()
    trainer.callbacks.append(probe)
    trainer.train()
    return trainer, probe


@pytest.mark.parametrize("branch_state", ["fresh", "persistent"])
def test_weights_hold_the_delta_the_adapter_held(qwen3_dir, tokenizer, teachers, tmp_path, branch_state, monkeypatch):
    two = dict(list(teachers.items())[:2])
    changes = []  # (old rank, new rank, rank added to the weights) of every install after the first

    def difference(new, old):
        changes.append((old.rank, new.rank, merging.difference(new, old).rank))
        return merging.difference(new, old)

    monkeypatch.setattr(frozen, "difference", difference)
    in_weights, probe = run(qwen3_dir, two, tmp_path / "weights", "auto", branch_state=branch_state, num_rounds=3)
    if branch_state == "fresh":  # append merges: rounds 2 and 3 add only their own 2 x 4 columns to each layer
        assert len(changes) == 2 * len(in_weights.merged)
        assert all(added == new - old == 8 for old, new, added in changes)
    in_adapter, _ = run(qwen3_dir, two, tmp_path / "adapter", "adapter", branch_state=branch_state, num_rounds=3)

    assert json.loads((tmp_path / "weights" / "mot_run.json").read_text())["frozen_delta"] == "weights"
    # The adapter's factors are the merged delta in memory; with the weights holding it, it stays in its checkpoint.
    assert isinstance(in_weights.merged, SavedDelta) and not isinstance(in_adapter.merged, SavedDelta)
    assert in_weights.merged.path == tmp_path / "weights" / "round-003" / "merged" / "adapter_model.safetensors"
    for name, delta in in_adapter.merged.items():  # the same student, up to fp32 rounding
        expected = delta.dense()
        error = (in_weights.merged[name].dense() - expected).norm() / expected.norm()
        assert error < 1e-4, f"{name}: {error:.2e}"
    # No adapter is left on the student, and no branch ever ran beside a frozen one.
    assert not isinstance(in_weights.model, PeftModel)
    assert all(active == ["mot_branch"] for _, active in probe.seen)
    base = AutoModelForCausalLM.from_pretrained(qwen3_dir, dtype=torch.float32)
    for name, delta in in_weights.merged.items():  # the weights are the base plus the merged delta
        weight = in_weights.model.get_submodule(name).weight.double()
        loaded = base.get_submodule(name).weight.double()
        change = delta.dense().double()
        assert ((weight - loaded) - change).norm() / change.norm() < 1e-4
    batch = tokenizer(["Q: 12+30=?\n"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(in_weights.model(**batch).logits, in_adapter.model(**batch).logits,
                                   rtol=1e-4, atol=1e-4)  # fmt: skip


def test_quantized_and_bf16_students_keep_the_adapter(qwen3_dir, teachers, tmp_path):
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    for kwargs in ({"quantization_config": nf4}, {"dtype": torch.bfloat16}):
        model = AutoModelForCausalLM.from_pretrained(qwen3_dir, **kwargs)
        targets = check_targets(model, quick_lora())
        assert resolve("auto", model, targets) == "adapter"
        with pytest.raises(ValueError, match="frozen_delta='weights' needs fp32 nn.Linear"):
            quick_trainer(model, teachers, tmp_path / "refused", frozen_delta="weights")
        assert not (tmp_path / "refused" / "mot_run.json").exists()  # refused before anything was written


def test_a_student_whose_weights_hold_a_delta_is_not_taken_for_a_base(qwen3_dir, teachers, tmp_path):
    two = dict(list(teachers.items())[:2])
    trainer = quick_trainer(qwen3_dir, two, tmp_path / "first", num_rounds=1, max_steps=1)
    trainer.train()
    with pytest.raises(TypeError, match="already hold the merged delta"):
        MoTTrainer(trainer.model, args=quick_config(tmp_path / "second"), teachers=two,
                   processing_class=trainer.processing_class, peft_config=quick_lora())  # fmt: skip


@pytest.mark.parametrize("append", [False, True])
def test_weights_take_each_round_change_to_fp32_rounding(append):
    """Five merges of four rank-16 branches, each update 1e-3 of |W|, installed into fp32 weights: the weights stay
    the base plus the merged delta to fp32 rounding (frozen.py: about 6e-8 of |W| a round), far inside the 1e-3
    fidelity bound on each round's update; after an append merge (fresh branches) from the round's columns alone."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(256, 512, bias=False)})
    weight = model["proj"].weight
    base = weight.detach().double().clone()
    home, merged = FrozenDelta("weights", None, None), None
    for round_idx in range(1, 6):
        branches = [{"proj": LowRankDelta(torch.randn(512, 16), torch.randn(16, 256))} for _ in range(4)]
        scale = 1e-3 * base.norm().item() / branches[0]["proj"].dense().norm().item()
        before = 0 if merged is None else merged["proj"].dense().double()
        scaled = [{"proj": b["proj"].scaled(scale)} for b in branches]
        merged, _ = merge_round(merged, scaled, [0.25] * 4, append=append)
        assert home.install(model, merged) is model
        total = merged["proj"].B.double() @ merged["proj"].A.double()
        error = (weight.detach().double() - base - total).norm()
        assert error / (total - before).norm() < 1e-3, round_idx
        assert error / base.norm() < 6e-8 * round_idx, round_idx


def test_a_saved_delta_reads_each_layer_at_its_own_rank(tmp_path):
    """The checkpoint pads layers to one rank; the view gives each back at its rank, exactly, one layer per read."""
    torch.manual_seed(0)
    merged = {"a.q_proj": LowRankDelta(torch.randn(8, 3), torch.randn(3, 5)),
              "a.v_proj": LowRankDelta(torch.randn(4, 6), torch.randn(6, 5))}  # fmt: skip
    save_merged(merged, tmp_path, None)
    view = SavedDelta(tmp_path, {name: delta.rank for name, delta in merged.items()})
    assert sorted(view) == sorted(merged) and len(view) == 2 and "a.k_proj" not in view
    for name, delta in merged.items():
        assert view[name].rank == delta.rank
        assert torch.equal(view[name].B, delta.B) and torch.equal(view[name].A, delta.A)
    with view.reading():  # one open file for every read: the same tensors
        for name, delta in merged.items():
            assert torch.equal(view[name].B, delta.B) and torch.equal(view[name].A, delta.A)
    assert view._open_file is None  # closed again: nothing stays mapped
    padded = SavedDelta(tmp_path)  # without ranks: the saved (padded) factors, the same product
    torch.testing.assert_close(padded["a.q_proj"].dense(), merged["a.q_proj"].dense())
    with pytest.raises(KeyError):
        view["a.k_proj"]
    other = {"a.q_proj": LowRankDelta(torch.randn(8, 7), torch.randn(7, 5))}
    with view.reading():
        save_merged(other, tmp_path, None)  # the checkpoint overwritten by another delta, even while open
        with pytest.raises(RuntimeError, match="changed after this run saved it"):
            view["a.q_proj"]
    with pytest.raises(RuntimeError, match="changed after this run saved it"):
        view["a.q_proj"]


def test_reading_maps_the_checkpoint_a_few_layers_at_a_time(tmp_path, monkeypatch):
    """Pages a read touches stay mapped (and in RSS) while the file is open: reading() opens it again every
    LAYERS_PER_OPEN layers, so a merge never maps the whole checkpoint, and reads the same tensors."""
    torch.manual_seed(0)
    merged = {f"layers.{i}.q_proj": LowRankDelta(torch.randn(8, 2), torch.randn(2, 5)) for i in range(40)}
    save_merged(merged, tmp_path, None)
    view = SavedDelta(tmp_path, {name: 2 for name in merged})
    opened, safe_open = [], checkpointing.safe_open
    monkeypatch.setattr(checkpointing, "safe_open", lambda *a, **k: opened.append(a[0]) or safe_open(*a, **k))
    with view.reading():
        for name, delta in merged.items():
            read = view[name]
            assert torch.equal(read.B, delta.B) and torch.equal(read.A, delta.A)
    assert len(opened) == -(-len(merged) // SavedDelta.LAYERS_PER_OPEN) == 3
    assert view._open_file is None


def test_under_bf16_autocast_the_adapter_holds_the_bf16_copy_the_pass_computes_with(qwen3_dir, teachers, tmp_path):
    """bf16 mixed precision on an nf4 student: the frozen adapter stores the bf16 factors the branch's pass casts
    to at every step anyway, so training is the same as with fp32 storage, and the exact fp32 factors stay in the
    round checkpoint only."""
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    two, runs = dict(list(teachers.items())[:2]), {}
    for stored in (torch.bfloat16, torch.float32):
        model = AutoModelForCausalLM.from_pretrained(qwen3_dir, quantization_config=nf4)
        trainer = quick_trainer(model, two, tmp_path / str(stored), bf16=True, use_cpu=True, num_rounds=3)
        assert trainer.frozen_delta.adapter_dtype == torch.bfloat16  # what MoTTrainer chose under bf16 autocast
        trainer.frozen_delta.adapter_dtype = stored  # the fp32 storage MoT used before, for comparison
        trainer.train()
        runs[stored] = trainer
    in_bf16, in_fp32 = runs[torch.bfloat16], runs[torch.float32]
    assert isinstance(in_bf16.merged, SavedDelta) and not isinstance(in_fp32.merged, SavedDelta)
    for layer in lora_layers(in_bf16.model).values():
        assert layer.lora_A[MERGED_ADAPTER].weight.dtype == torch.bfloat16
    for name, delta in in_fp32.merged.items():  # three rounds trained on each: the same merged student
        torch.testing.assert_close(in_bf16.merged[name].dense(), delta.dense(), rtol=0, atol=0)
