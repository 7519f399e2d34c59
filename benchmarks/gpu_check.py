"""The GPU checks of issue 35 in one script: run it once on a bare CUDA machine, at most 8 minutes, and read one JSON.

Each check runs in its own try/except and writes its result as soon as it ends (``OUT/gpu_check.json``), so a failing
or slow check never hides the others:

1. ``environment``: the card, torch/CUDA and every library's version as imported.
2. ``tf32_install``: with TF32 turned on the way ``tf32=True`` does it, the fp32 install of a merged delta into the
   weights (frozen.py) still equals the float64 sum to 1e-7; a plain ``addmm_`` under TF32 is measured beside it.
3. ``bnb_4bit``: a bitsandbytes nf4 ``Linear4bit`` forward and backward on the card against its dequantized weight.
4. ``one_pass_lora``: the one-pass LoRA (frozen merged adapter of rank 256 + branch, fused.py) against PEFT's two
   passes at Qwen3-8B's widths, with gradient checkpointing under bf16 autocast: logits, gradients and time.
5. ``mot_end_to_end``: a 2-round MoTTrainer run of a tiny nf4 student on the card, fresh and persistent branches,
   per-round eval (loss and generation accuracy), ``save_adapter`` read back against the run's merged delta.
6. ``fit_8b``: benchmarks/gpu_fit.py, the Qwen3-8B nf4 fit at 4096 tokens under a 24 GB cap (its own JSON and table
   land in OUT as well).

    python3 benchmarks/gpu_check.py OUT                # on a CUDA machine
    python3 benchmarks/gpu_check.py OUT --tiny         # the same checks on the CPU at tiny sizes (CI tests this)

``--tiny`` runs every check on the CPU at tiny sizes; what only a GPU can show (memory caps, reserved memory, the
rank padding of a bf16 adapter on the card) is skipped and named under ``skipped`` in that check's result.

The device machine (docs/gpu.md) has torch for CUDA, transformers, peft and accelerate, but not trl, datasets (nor
its dill and multiprocess) or bitsandbytes. Carry these wheels (46 MB; the versions the CPU suite runs with), made
once in the repository's root (``echo /.whl/ >> .git/info/exclude`` first)::

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \\
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \\
        trl==1.16.0 datasets==5.2.0 bitsandbytes==0.50.2 dill==0.4.1 multiprocess==0.70.19 peft==0.21.2 \\
        accelerate==1.16.0

and run, with ``.whl`` in the call's ``carry``::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 || exit; \\
        timeout 540 python3 benchmarks/gpu_check.py $OUT 2>&1 | tee $OUT/log

(transformers stays the machine's own, >= 5.0 as pyproject.toml asks; ``environment`` records which.)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))  # gpu_fit, beside this file

LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets", "safetensors",
             "huggingface_hub", "tokenizers")  # fmt: skip


class Skipped(Exception):
    """A whole check that cannot run here (raised with the reason)."""


@dataclass
class Context:
    """Where the checks run and what they may spend."""

    out: Path
    tiny: bool
    deadline: float  # time.monotonic() by which every check must have ended
    skipped: list[str] = field(default_factory=list)  # the current check's CUDA-only parts left out

    @property
    def device(self) -> torch.device:
        return torch.device("cpu" if self.tiny else "cuda")

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float32 if self.tiny else torch.bfloat16

    def skip_part(self, what: str) -> None:
        self.skipped.append(what)

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` in float64."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm()).item()


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------- the checks
def environment(ctx: Context) -> dict:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    info = {"python": platform.python_version(), "versions": versions, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", memory_gb=props.total_memory / 2**30,
                    torch_cuda=torch.version.cuda, bf16=torch.cuda.is_bf16_supported())  # fmt: skip
    elif not ctx.tiny:
        raise RuntimeError("no CUDA device: run with --tiny on a CPU")
    for name in ("trl", "datasets", "bitsandbytes", "peft", "transformers"):
        __import__(name)  # a missing wheel shows here first
    return info


def tf32_install(ctx: Context) -> dict:
    """The fp32 install of a merged delta stays fp32 whatever the user set (devices.exact_fp32_matmul)."""
    from merge_of_thought.frozen import FrozenDelta
    from merge_of_thought.merging import LowRankDelta, merge_round

    size, rank = (512, 64) if ctx.tiny else (4096, 64)
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(size, size, generator=generator)
    delta = {"proj": LowRankDelta(torch.randn(size, rank, generator=generator) * 3e-2,
                                  torch.randn(rank, size, generator=generator) * 3e-2)}  # fmt: skip
    merged, _ = merge_round(None, [delta], [1.0])
    reference = base.double() + merged["proj"].B.double() @ merged["proj"].A.double()
    backends = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    if ctx.tiny:  # on a CPU: bf16 matmuls where it has AVX512-BF16, as set_float32_matmul_precision("medium") asks
        legacy = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("medium")
    else:  # what transformers' tf32=True sets on torch >= 2.9, and the CUDA matmul setting itself
        before = [torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision]
        torch.backends.fp32_precision = torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        asked = [backend.fp32_precision for backend in backends]
        model = torch.nn.ModuleDict({"proj": torch.nn.Linear(size, size, bias=False)}).to(ctx.device)
        B, A = merged["proj"].B.to(ctx.device), merged["proj"].A.to(ctx.device)
        with torch.no_grad():
            model["proj"].weight.copy_(base)
            plain = model["proj"].weight.clone().addmm_(B, A)
        FrozenDelta("weights", None, None).install(model, merged)
        setting_kept = [backend.fp32_precision for backend in backends] == asked
    finally:
        if ctx.tiny:
            torch.set_float32_matmul_precision(legacy)
        else:
            torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision = before
    installed = relative(model["proj"].weight, reference)
    result = {"installed_relative_error": installed, "plain_addmm_relative_error": relative(plain, reference),
              "setting_kept": setting_kept}  # fmt: skip
    assert installed < 1e-7, f"the install ran below fp32: {installed:.2e}"
    if not ctx.tiny:  # the card ran the plain product in TF32, so the check above could fail
        assert result["plain_addmm_relative_error"] > 5 * installed, result
    assert result["setting_kept"], "the user's TF32 setting was not put back"
    return result


def bnb_4bit(ctx: Context) -> dict:
    """An nf4 Linear4bit's forward and backward against the same arithmetic on its dequantized weight."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional

    size, tokens = (256, 64) if ctx.tiny else (4096, 4096)
    dtype = ctx.compute_dtype
    layer = bnb.nn.Linear4bit(size, size, bias=False, compute_dtype=dtype, quant_type="nf4", device="meta")
    weight = torch.randn(size, size, generator=torch.Generator().manual_seed(0)) * 0.02
    layer.weight = bnb.nn.Params4bit(weight.to(dtype), requires_grad=False, quant_type="nf4", module=layer)
    layer.weight = layer.weight.to(ctx.device)
    dequantized = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
    x = torch.randn(tokens, size, generator=torch.Generator().manual_seed(1)).to(ctx.device, dtype).requires_grad_()
    y = layer(x)
    y.float().square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = x_ref @ dequantized.t()
    y_ref.float().square().sum().backward()
    synchronize()
    result = {"device": str(layer.weight.device), "quant_type": layer.weight.quant_state.quant_type,
              "output_relative_error": relative(y, y_ref), "input_grad_relative_error": relative(x.grad, x_ref.grad),
              "quantization_relative_error": relative(dequantized.float().cpu(), weight)}  # fmt: skip
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert layer.weight.device.type == ctx.device.type and layer.weight.dtype == torch.uint8
    assert result["output_relative_error"] < tolerance and result["input_grad_relative_error"] < tolerance, result
    assert 0 < result["quantization_relative_error"] < 0.2, result  # nf4 of a Gaussian: ~0.1
    return result


def one_pass_lora(ctx: Context) -> dict:
    """fused.py's one pass against PEFT's two at real widths, checkpointing on, under bf16 autocast."""
    import gpu_fit
    from peft import LoraConfig

    from merge_of_thought import adapters
    from merge_of_thought.frozen import FrozenDelta

    shape = dict(gpu_fit.TINY) if ctx.tiny else dict(gpu_fit.QWEN3_8B, num_hidden_layers=2, vocab_size=4096)
    length, frozen_rank = (32, 64) if ctx.tiny else (2048, 256)
    model = gpu_fit.nf4_student(shape, ctx.device, ctx.compute_dtype)
    merged = gpu_fit.frozen_round_delta(model, frozen_rank)
    model = FrozenDelta("adapter", None, "CAUSAL_LM", adapter_dtype=torch.bfloat16).install(model, merged)
    padded = {layer.lora_A[adapters.MERGED_ADAPTER].weight.shape[0] for layer in adapters.lora_layers(model).values()}
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    ids = torch.randint(4, shape["vocab_size"], (1, length), generator=torch.Generator().manual_seed(2))
    ids = ids.to(ctx.device)

    def step(one_pass: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
        nonlocal model
        model = adapters.add_branch_adapter(model, "branch", lora, seed=0, one_pass=one_pass)
        generator = torch.Generator().manual_seed(3)
        for name, param in model.named_parameters():
            if "lora_B.branch" in name:
                param.data = (torch.randn(param.shape, generator=generator) * 0.02).to(param.device, param.dtype)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model.train()
        times = []
        for _ in range(3):  # the last two timed
            model.zero_grad(set_to_none=True)
            torch.manual_seed(4)  # the same dropout masks in both passes
            synchronize()
            start = time.perf_counter()
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
                out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            synchronize()
            times.append(time.perf_counter() - start)
        grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
        logits = out.logits.detach().float().cpu()
        model.gradient_checkpointing_disable()
        model.disable_input_require_grads()
        adapters.remove_adapter(model, "branch")
        return logits, grads, min(times[1:])

    two_logits, two_grads, two_seconds = step(one_pass=False)
    one_logits, one_grads, one_seconds = step(one_pass=True)
    worst = max(relative(one_grads[n], g) for n, g in two_grads.items())
    result = {"widths": [shape["hidden_size"], shape["intermediate_size"]], "tokens": length,
              "frozen_rank": frozen_rank, "frozen_rank_as_installed": sorted(padded),
              "logits_relative_error": relative(one_logits, two_logits), "worst_grad_relative_error": worst,
              "one_pass_seconds": one_seconds, "two_pass_seconds": two_seconds,
              "one_over_two": one_seconds / two_seconds}  # fmt: skip
    assert sorted(one_grads) == sorted(two_grads) and all("branch" in n for n in one_grads)
    assert result["logits_relative_error"] < 2e-2 and worst < 5e-2, result  # bf16: ~3 significant digits
    if ctx.tiny:
        ctx.skip_part("one-pass speed on the card (CPU timings at tiny widths say nothing)")
    return result


def mot_end_to_end(ctx: Context) -> dict:
    """A real 2-round MoT run on the card: nf4 student loaded with a BitsAndBytesConfig, fresh and persistent
    branches, per-round eval, and the exported adapter equal to the run's merged delta."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Qwen3Config

    from merge_of_thought import MoTConfig, MoTTrainer, adapters
    from merge_of_thought.demo.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    folder = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         tie_word_embeddings=False)  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(folder / "student")
    tokenizer.save_pretrained(folder / "student")

    def sums(style: int, rows: int, seed: int) -> Dataset:
        generator = torch.Generator().manual_seed(seed)
        data = []
        for _ in range(rows):
            a, b = (int(v) for v in torch.randint(0, 50, (2,), generator=generator))
            how = [f"{a}+{b}", f"add {a} and {b}"][style % 2]
            data.append({"prompt": f"Q: {a}+{b}=?\n", "completion": f"think: {how}\n#### {a + b}"})
        return Dataset.from_list(data)

    teachers = {f"teacher{k}": sums(k, 16, k) for k in range(2)}
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=ctx.compute_dtype)  # fmt: skip
    result = {}
    for branch_state in ("fresh", "persistent"):
        args = MoTConfig(output_dir=str(folder / branch_state), num_rounds=2, max_steps=2 if ctx.tiny else 3,
                         learning_rate=5e-3, per_device_train_batch_size=4, per_device_eval_batch_size=16,
                         eval_accuracy_samples=2 if ctx.tiny else 4, eval_max_new_tokens=8 if ctx.tiny else 12,
                         branch_state=branch_state, bf16=not ctx.tiny, use_cpu=ctx.tiny,
                         report_to=[], disable_tqdm=True, logging_steps=1, seed=0)  # fmt: skip
        # r=3: merged ranks of 6 and 12, which only the padding makes multiples of 8 on the card
        lora = LoraConfig(r=3, lora_alpha=6, lora_dropout=0.0, target_modules="all-linear")
        trainer = MoTTrainer(str(folder / "student"), args=args, teachers=teachers, processing_class=tokenizer,
                             peft_config=lora, quantization_config=quantization,
                             eval_dataset=sums(0, 8, 9))  # fmt: skip
        rounds = trainer.train()
        exported = folder / f"adapter-{branch_state}"
        trainer.save_adapter(exported)
        saved = adapters.load_delta(exported)
        export_error = max(relative(saved[n].dense(), d.dense()) for n, d in trainer.merged.items())
        layers = adapters.lora_layers(trainer.model).values()
        installed = {layer.lora_A[adapters.MERGED_ADAPTER].weight.shape[0] for layer in layers}
        result[branch_state] = {
            "rounds": [{k: r.get(k) for k in ("round", "eval_loss", "eval_accuracy", "merge_rank", "merge_seconds")}
                       for r in rounds],  # fmt: skip
            "student_device": str(next(trainer.model.parameters()).device),
            "frozen_rank_installed": sorted(installed),
            "export_relative_error": export_error,
        }
        if torch.cuda.is_available() and not ctx.tiny:
            result[branch_state]["reserved_gb_after_run"] = torch.cuda.memory_reserved() / 2**30
        assert len(rounds) == 2 and all(math.isfinite(r["eval_loss"]) for r in rounds), rounds
        assert all(r.get("eval_accuracy") is not None for r in rounds), rounds
        assert export_error < 1e-6, export_error
        assert result[branch_state]["student_device"].startswith(ctx.device.type)
        if not ctx.tiny:  # a bf16 adapter on the card is padded to a multiple of 8 (devices.TENSOR_CORE_MULTIPLE)
            assert all(rank % 8 == 0 for rank in installed), installed
        del trainer
    if ctx.tiny:
        ctx.skip_part("rank padding of the bf16 adapter on the card; reserved memory after the run")
    return result


def fit_8b(ctx: Context) -> dict:
    """benchmarks/gpu_fit.py: the Qwen3-8B nf4 fit (on the CPU: its --tiny mode)."""
    import gpu_fit

    budget = ctx.seconds_left() - 20
    if budget < 60:
        raise Skipped(f"only {ctx.seconds_left():.0f} s left of the run's budget")
    argv = ["--out", str(ctx.out), "--timeout", str(budget / 2)] + (["--tiny"] if ctx.tiny else [])
    record = gpu_fit.main(argv)
    if ctx.tiny:
        ctx.skip_part("the 8B student, the 24 GB cap and reserved memory (--tiny: the code path on a tiny student)")
    errors = {mode: run["error"] for mode, run in record["runs"].items() if "error" in run}
    assert not errors, errors
    return record["comparison"] | {"runs": {mode: {k: v for k, v in run.items() if k != "step_seconds"}
                                            for mode, run in record["runs"].items()}}  # fmt: skip


CHECKS: list[Callable[[Context], dict]] = [environment, tf32_install, bnb_4bit, one_pass_lora, mot_end_to_end, fit_8b]


# ---------------------------------------------------------------- running them
def run_checks(ctx: Context, checks: list[Callable[[Context], dict]] = CHECKS) -> dict:
    """Run every check in order, each in its own try/except; write the results after each one."""
    report = {"mode": "tiny-cpu" if ctx.tiny else "cuda", "command": " ".join(sys.argv), "checks": {}}
    ctx.out.mkdir(parents=True, exist_ok=True)
    for check in checks:
        name, start = check.__name__, time.monotonic()
        ctx.skipped = []
        print(f"gpu_check: {name} ...", flush=True)
        try:
            if ctx.seconds_left() <= 0:
                raise Skipped("the run's time budget is spent")
            entry = {"status": "ok", "details": check(ctx)}
        except Skipped as reason:
            entry = {"status": "skipped", "reason": str(reason)}
        except Exception:  # noqa: BLE001 (each check's failure is recorded, and the next check runs)
            entry = {"status": "failed", "error": traceback.format_exc()}
            print(entry["error"], file=sys.stderr, flush=True)
        finally:
            release()
        entry["seconds"] = time.monotonic() - start
        if ctx.skipped:
            entry["skipped"] = list(ctx.skipped)
        report["checks"][name] = entry
        print(f"gpu_check: {name}: {entry['status']} ({entry['seconds']:.1f} s)", flush=True)
        report["owed"] = owed(report)
        (ctx.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def release() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def owed(report: dict) -> list[str]:
    """What this run could not show: everything CUDA-only after a --tiny run, and every check not ok."""
    out = []
    if report["mode"] == "tiny-cpu":
        out.append("the whole GPU run: this was --tiny on the CPU (python3 benchmarks/gpu_check.py OUT on a GPU)")
    out += [f"{name}: {entry['status']}" for name, entry in report["checks"].items() if entry["status"] != "ok"]
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for gpu_check.json (and gpu_fit's results)")
    parser.add_argument("--tiny", action="store_true", help="every check on the CPU at tiny sizes")
    parser.add_argument("--budget", type=float, default=450, help="seconds for all checks (default 450)")
    args = parser.parse_args(argv)
    ctx = Context(out=args.out, tiny=args.tiny, deadline=time.monotonic() + args.budget)
    report = run_checks(ctx)
    failed = [name for name, entry in report["checks"].items() if entry["status"] == "failed"]
    print(f"gpu_check: {len(report['checks']) - len(failed)} of {len(report['checks'])} checks without failure; "
          f"results in {args.out / 'gpu_check.json'}", flush=True)  # fmt: skip
    return report


if __name__ == "__main__":
    main()
