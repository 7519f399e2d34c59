"""bitsandbytes' CPU repacking of 4-bit weights (quantization.py): MoT trains, evaluates and merges as if it never ran.

The tests that take the ``cpu_4bit_repacking`` fixture put every 4-bit layer on bitsandbytes' AVX512-BF16 path (native
on such a CPU, switched on elsewhere), so each of them fails without the guard on any CPU.
"""

from __future__ import annotations

import logging

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import dequantize_4bit
from datasets import Dataset
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from merge_of_thought.adapters import lora_layers
from merge_of_thought.quantization import is_packed, keep_4bit_layout

from conftest import make_teacher
from helpers import dense_adapter, quick_trainer

NF4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def load_nf4(folder: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=NF4)


def linear4bit_layers(model: torch.nn.Module) -> list[bnb.nn.Linear4bit]:
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def eval_forward(model: torch.nn.Module, vocab_size: int) -> None:
    """What generate() and Trainer.evaluate() do to a layer: a forward in eval mode without gradients."""
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.randint(0, vocab_size, (2, 8)))
    model.train()


def held_out(n: int = 4) -> Dataset:
    rows = make_teacher(0, n=n, seed=99).to_list()
    return Dataset.from_list([{**row, "answer": row["completion"].split("#### ")[-1]} for row in rows])


@pytest.mark.parametrize("double_quant", [False, True])
def test_a_packed_layer_comes_back_with_its_codes_and_gradients(cpu_4bit_repacking, double_quant):
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=double_quant)  # fmt: skip
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128) / 8, requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant, module=layer).to("cpu")  # fmt: skip
    codes, weight = layer.weight.data.clone(), dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    x = torch.randn(3, 128, requires_grad=True)
    layer(x).sum().backward()
    grad = x.grad.clone()

    layer.eval()
    with torch.no_grad():
        layer(torch.randn(3, 128))
    assert is_packed(layer.weight), "bitsandbytes no longer repacks in eval mode: the guard may be obsolete"
    misread = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    assert not torch.allclose(misread, weight, atol=1e-2)  # what the merge checks would read without the guard

    assert keep_4bit_layout(layer) == 1 and not is_packed(layer.weight)
    assert torch.equal(layer.weight.data, codes)  # the 4-bit codes bit for bit
    restored = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert ((restored - weight).norm() / weight.norm()).item() < 4e-3  # scales kept in bf16 by the repack
    layer.train()
    x.grad = None
    layer(x).sum().backward()
    assert ((x.grad - grad).norm() / grad.norm()).item() < 4e-3
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(3, 128))
    assert not is_packed(layer.weight)  # the fast path is off for good: evaluating again changes nothing


def test_branches_trained_after_evaluations_equal_branches_trained_without(
    cpu_4bit_repacking, qwen3_dir, tokenizer, teachers, tmp_path
):
    """Round-0 and per-round generation evals (eval-mode forwards) leave every branch adapter bit for bit the same."""
    two = dict(list(teachers.items())[:2])
    plain = quick_trainer(load_nf4(qwen3_dir), two, tmp_path / "plain", tokenizer)
    plain.train()
    evaluated = quick_trainer(load_nf4(qwen3_dir), two, tmp_path / "evaluated", tokenizer, eval_accuracy_samples=2,
                              eval_max_new_tokens=4)  # fmt: skip
    evaluated.eval_dataset = held_out()
    records = evaluated.train()
    assert all("eval_accuracy" in r for r in records)
    for round_dir in ("round-001", "round-002"):
        for teacher in two:
            a = dense_adapter(tmp_path / "plain" / round_dir / f"branch-{teacher}")
            b = dense_adapter(tmp_path / "evaluated" / round_dir / f"branch-{teacher}")
            assert all(a[n].norm() > 0 for n in a)
            assert all(torch.equal(a[n], b[n]) for n in a), f"{round_dir}/{teacher} differs after an evaluation"
    assert not any(is_packed(m.weight) for m in linear4bit_layers(evaluated.model))


def test_a_model_the_user_generated_with_is_unpacked_before_training(
    cpu_4bit_repacking, qwen3_dir, tokenizer, teachers, tmp_path, caplog
):
    two = dict(list(teachers.items())[:2])
    reference = quick_trainer(load_nf4(qwen3_dir), two, tmp_path / "reference", tokenizer, num_rounds=1)
    reference.train()
    model = load_nf4(qwen3_dir)
    eval_forward(model, len(tokenizer))  # the user tried the model before handing it over
    assert all(is_packed(m.weight) for m in linear4bit_layers(model))
    with caplog.at_level(logging.WARNING, logger="merge_of_thought.quantization"):
        trainer = quick_trainer(model, two, tmp_path / "used", tokenizer, num_rounds=1)
    assert "14 4-bit layers had been repacked" in caplog.text
    trainer.train()
    # The same branches up to the bf16 rounding of the scales that the repack made: measured 0.05-0.06 after two
    # steps at lr 5e-3, against 1.4 without the guard.
    for teacher in two:
        a = dense_adapter(tmp_path / "reference" / "round-001" / f"branch-{teacher}")
        b = dense_adapter(tmp_path / "used" / "round-001" / f"branch-{teacher}")
        error = sum((a[n] - b[n]).norm() ** 2 for n in a) ** 0.5 / sum(a[n].norm() ** 2 for n in a) ** 0.5
        assert error < 0.2, f"{teacher}: relative difference {error:.3f}"


def test_student_evaluated_between_rounds_is_base_plus_the_exact_merge(
    cpu_4bit_repacking, qwen3_dir, tokenizer, teachers, tmp_path
):
    """Logits of the 4-bit student after evaluations before and between two rounds, against an fp32 model built
    independently from the dequantized base and the saved merged delta, relative to what the merge changed."""
    trainer = quick_trainer(load_nf4(qwen3_dir), dict(list(teachers.items())[:2]), tmp_path, tokenizer,
                            eval_accuracy_samples=2, eval_max_new_tokens=4)  # fmt: skip
    trainer.eval_dataset = held_out()
    trainer.train()
    assert not any(is_packed(m.weight) for m in linear4bit_layers(trainer.model))

    fresh = load_nf4(qwen3_dir)  # never evaluated: its 4-bit weights as loaded
    dequantized = {name: dequantize_4bit(m.weight.data, m.weight.quant_state).float()
                   for name, m in fresh.named_modules() if isinstance(m, bnb.nn.Linear4bit)}  # fmt: skip
    merged = dense_adapter(tmp_path / "round-002" / "merged")
    assert set(merged) == set(dequantized)
    reference = AutoModelForCausalLM.from_pretrained(qwen3_dir, dtype=torch.float32)
    inputs = torch.randint(0, len(tokenizer), (2, 12))

    def logits_with(deltas: dict[str, torch.Tensor] | None) -> torch.Tensor:
        with torch.no_grad():
            for name, weight in dequantized.items():
                delta = deltas[name].float() if deltas else 0
                reference.get_submodule(name).weight.copy_(weight + delta)
            return reference(input_ids=inputs).logits

    base_logits, expected = logits_with(None), logits_with(merged)
    trainer.model.eval()
    with torch.no_grad():
        student = trainer.model(input_ids=inputs).logits
    effect = (expected - base_logits).norm()
    assert effect > 0
    assert ((student - expected).norm() / effect).item() <= 1e-3
    assert len(lora_layers(trainer.model)) == len(dequantized)
