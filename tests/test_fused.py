"""fused.py: the frozen merged adapter and the branch in one low-rank pass compute what PEFT's two passes compute,
outputs and gradients, on fp32, bf16 and 4-bit students, with LoRA dropout and under bf16 autocast."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from merge_of_thought import adapters
from merge_of_thought.fused import FrozenDeltaPass
from merge_of_thought.merging import LowRankDelta

from helpers import quick_lora

NF4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
STUDENTS = {"fp32": dict(dtype=torch.float32), "bf16": dict(dtype=torch.bfloat16), "nf4": dict(quantization_config=NF4)}


def student_with_merged(qwen3_dir, load: dict, rank: int = 6):
    """The student as MoT holds it between rounds: the base plus a frozen merged adapter of random factors."""
    model = AutoModelForCausalLM.from_pretrained(qwen3_dir, **load)
    targets = adapters.check_targets(model, quick_lora())
    generator = torch.Generator().manual_seed(0)
    merged = {}
    for name, (fan_in, fan_out) in zip(targets, adapters.layer_dims(model, targets)):
        merged[name] = LowRankDelta(torch.randn(fan_out, rank, generator=generator) * 0.05,
                                    torch.randn(rank, fan_in, generator=generator) * 0.05)  # fmt: skip
    return adapters.install_merged(model, merged, None, "CAUSAL_LM")


def branch_step(model, one_pass: bool, dropout: float, autocast: bool = False, checkpointing: dict | None = None):
    """Attach a branch (B nonzero, so it matters), run one forward and backward; return the logits, the branch's
    gradients and the adapters each layer had active. ``checkpointing``: gradient checkpointing's kwargs, if on."""
    model = adapters.add_branch_adapter(model, "branch", quick_lora(lora_dropout=dropout, task_type="CAUSAL_LM"),
                                        seed=0, one_pass=one_pass)  # fmt: skip
    if checkpointing is not None:  # as the Trainer sets it up for a PEFT model (TRL's default: on)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        model.enable_input_require_grads()
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B.branch" in name:
            param.data = torch.randn(param.shape, generator=generator).to(param.dtype) * 0.05
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=generator)
    torch.manual_seed(2)  # the same dropout masks in both runs
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    active = {tuple(layer.active_adapters) for layer in adapters.lora_layers(model).values()}
    logits = out.logits.detach().float()
    if checkpointing is not None:
        model.gradient_checkpointing_disable()
        model.disable_input_require_grads()
    adapters.remove_adapter(model, "branch")
    return logits, grads, active


@pytest.mark.parametrize("precision", list(STUDENTS))
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_one_pass_computes_what_two_passes_compute(qwen3_dir, precision, dropout):
    model = student_with_merged(qwen3_dir, STUDENTS[precision])
    two_logits, two_grads, two_active = branch_step(model, one_pass=False, dropout=dropout)
    one_logits, one_grads, one_active = branch_step(model, one_pass=True, dropout=dropout)

    assert two_active == {(adapters.MERGED_ADAPTER, "branch")} and one_active == {("branch",)}
    assert sorted(one_grads) == sorted(two_grads)  # gradients reach the branch's factors only
    assert one_grads and all("branch" in name for name in one_grads)
    tolerance = 1e-2 if precision == "bf16" else 1e-5  # float summation order; bf16 outputs round to 3 digits
    error = (one_logits - two_logits).norm() / two_logits.norm()
    assert error < tolerance, f"logits: {error:.2e}"
    for name, grad in two_grads.items():
        error = (one_grads[name] - grad).norm() / grad.norm()
        assert error < tolerance, f"{name}: {error:.2e}"
    # And the merged adapter counts: without it the logits are another model's.
    merged_off = student_with_merged(qwen3_dir, STUDENTS[precision], rank=6)
    for layer in adapters.lora_layers(merged_off).values():
        layer.lora_B[adapters.MERGED_ADAPTER].weight.data.zero_()
    off_logits, _, _ = branch_step(merged_off, one_pass=True, dropout=dropout)
    assert (off_logits - one_logits).norm() / one_logits.norm() > 10 * tolerance


def test_one_pass_under_bf16_autocast_is_as_close_to_fp32_as_two_passes(qwen3_dir):
    model = student_with_merged(qwen3_dir, STUDENTS["fp32"])
    exact_logits, exact_grads, _ = branch_step(model, one_pass=False, dropout=0.0)
    results = {one_pass: branch_step(model, one_pass=one_pass, dropout=0.0, autocast=True) for one_pass in (0, 1)}

    def error(one_pass: bool) -> float:
        logits, grads, _ = results[one_pass]
        worst = max((grads[n] - g).norm() / g.norm() for n, g in exact_grads.items())
        return max(((logits - exact_logits).norm() / exact_logits.norm()).item(), worst.item())

    assert 0 < error(True) <= 2 * error(False), (error(True), error(False))


def test_switching_back_to_two_passes_does_not_count_the_merged_delta_twice(qwen3_dir):
    model = student_with_merged(qwen3_dir, STUDENTS["fp32"])
    two_logits, _, _ = branch_step(model, one_pass=False, dropout=0.0)
    model = adapters.add_branch_adapter(model, "branch", quick_lora(task_type="CAUSAL_LM"), seed=0, one_pass=True)
    adapters.activate(model, "branch", one_pass=False)
    layers = adapters.lora_layers(model).values()
    assert all("branch" not in layer.lora_variant for layer in layers)
    assert {tuple(layer.active_adapters) for layer in layers} == {(adapters.MERGED_ADAPTER, "branch")}
    adapters.remove_adapter(model, "branch")
    again, _, _ = branch_step(model, one_pass=False, dropout=0.0)
    torch.testing.assert_close(again, two_logits)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "nf4"])
def test_one_pass_under_gradient_checkpointing_computes_what_two_passes_compute(
    qwen3_dir, precision, use_reentrant, monkeypatch
):
    """Checkpointing re-runs each layer's forward (the one-pass Function included) inside the backward: the
    branch's gradients must still be the two-pass reference's, with dropout masks replayed as they were drawn."""
    model = student_with_merged(qwen3_dir, STUDENTS[precision])
    plain_logits, plain_grads, _ = branch_step(model, one_pass=False, dropout=0.2)
    checkpointing = {"use_reentrant": use_reentrant}
    two_logits, two_grads, _ = branch_step(model, one_pass=False, dropout=0.2, checkpointing=checkpointing)
    calls, forward = [], FrozenDeltaPass.forward
    monkeypatch.setattr(FrozenDeltaPass, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    one_logits, one_grads, _ = branch_step(model, one_pass=True, dropout=0.2, checkpointing=checkpointing)
    layers = len(adapters.lora_layers(model))
    assert len(calls) == 2 * layers  # each layer's one pass ran again in the backward: checkpointing was on
    assert model.base_model.model.model.gradient_checkpointing is False  # switched off again after each step
    assert sorted(one_grads) == sorted(two_grads) == sorted(plain_grads)
    assert all("branch" in name for name in one_grads)
    for reference in (two_grads, plain_grads):  # and checkpointing itself changes nothing
        for name, grad in reference.items():
            error = (one_grads[name] - grad).norm() / grad.norm()
            assert error < 1e-5, f"{name}: {error:.2e}"
    assert (one_logits - two_logits).norm() / two_logits.norm() < 1e-5
    assert (one_logits - plain_logits).norm() / plain_logits.norm() < 1e-5


def test_a_reused_branch_adapter_starts_as_a_new_one_and_silenced_changes_nothing(qwen3_dir):
    """Every branch of a round re-initialises one attached adapter (PEFT's add_adapter is slow): from the same
    seed it starts where a newly added adapter starts (A drawn from the seed alone, B = 0), and once silenced the
    student computes what it computes without it."""
    model = student_with_merged(qwen3_dir, STUDENTS["fp32"])
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        student = model(input_ids=ids).logits
    lora = quick_lora(task_type="CAUSAL_LM")
    model = adapters.add_branch_adapter(model, adapters.BRANCH_ADAPTER, lora, seed=7)
    new = {n: p.detach().clone() for n, p in model.named_parameters() if adapters.BRANCH_ADAPTER in n}
    for name, param in model.named_parameters():  # a trained branch: both factors moved
        if adapters.BRANCH_ADAPTER in name:
            param.data += 0.1
    torch.manual_seed(123)  # the random state the reuse finds does not matter
    model = adapters.add_branch_adapter(model, adapters.BRANCH_ADAPTER, lora, seed=7)
    reused = {n: p.detach() for n, p in model.named_parameters() if adapters.BRANCH_ADAPTER in n}
    assert reused.keys() == new.keys() and all(torch.equal(reused[n], new[n]) for n in new)
    assert all(p.abs().sum() > 0 for n, p in new.items() if "lora_A" in n)
    assert all(p.abs().sum() == 0 for n, p in new.items() if "lora_B" in n)
    for name, param in model.named_parameters():
        if adapters.BRANCH_ADAPTER in name:
            param.data += 0.1
    adapters.silence_adapter(model, adapters.BRANCH_ADAPTER)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, student)
