"""GPU fit: what a MoT round-5 step costs on one consumer card, against plain QLoRA, for a Qwen3-8B-shaped student.

Both runs train the same student: a Qwen3-8B-shaped model with random weights (no download) whose decoder linear
layers are made one at a time and quantized to nf4 as they are made, so the model never exists in bf16 (16 GB) on the
card; bf16 compute, gradient checkpointing, 4096-token rows, batch 1 with gradient accumulation, LoRA r=16 on every
linear layer, all under a 24 GB cap (``torch.cuda.set_per_process_memory_fraction``).

- ``plain``: TRL's SFTTrainer with that LoRA (what QLoRA costs).
- ``mot``: a MoTTrainer round whose student already holds the frozen merged adapter of rounds 1-4 of the paper's
  setting (K=4 teachers, r=16, T=5: rank K*r*(T-1) = 256, in bf16 as MoT stores it under bf16 autocast), so every
  branch step runs the one-pass LoRA (fused.py) at round 5's rank; then the round's merge and install, and one
  eval-loss pass (MoT's default eval batch, capped at the train batch: devices.eval_loss_batch_size).

Each run is a separate process (fresh CUDA memory) and reports its step time (the median over steps after each
trainer's first), peak *reserved* memory (what the card must hold, torch.cuda.max_memory_reserved) and the card's
used memory from ``torch.cuda.mem_get_info``. The goal (issue 35): MoT's step within 1.10x of plain QLoRA's time
and peak reserved memory, both within 24 GB, and the eval pass within the same 24 GB.

    python benchmarks/gpu_fit.py                       # on a GPU: both runs, ~3 minutes on an H100
    python benchmarks/gpu_fit.py --tiny                # the same code path on the CPU with a tiny model
    python benchmarks/gpu_fit.py --out /tmp/fit        # results elsewhere than benchmarks/results

Writes ``gpu_fit.json`` and ``gpu_fit.md`` (``gpu_fit_tiny_cpu.*`` with --tiny) naming the card. A worker that fails
prints its traceback (its output is not captured) and the record keeps it too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import bitsandbytes as bnb
import torch
from accelerate import init_empty_weights
from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, Qwen3Config, TrainerCallback
from trl import SFTConfig, SFTTrainer

from merge_of_thought import MoTConfig, MoTTrainer, adapters, devices
from merge_of_thought.demo.tokenizer import build_char_tokenizer
from merge_of_thought.fused import FrozenDeltaPass
from merge_of_thought.merging import LowRankDelta

RESULTS = Path(__file__).resolve().parent / "results"
QWEN3_8B = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                tie_word_embeddings=False)  # fmt: skip
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, vocab_size=512, max_position_embeddings=512, tie_word_embeddings=False)


@dataclass
class Settings:
    """One measurement's shape: the paper's MoT setting at round 5, and the card's budget."""

    length: int = 4096  # tokens per row
    steps: int = 4  # optimizer steps per MoT branch; the plain run trains teachers x steps
    accumulation: int = 2  # rows per optimizer step (batch 1 each)
    teachers: int = 2  # branches this MoT round trains (time); the frozen rank below assumes the paper's K=4
    lora_r: int = 16
    frozen_rank: int = 256  # K*r*(T-1) at round 5 of K=4, r=16
    cap_gb: float = 24.0  # per-process GPU memory cap
    eval_rows: int = 4

    @classmethod
    def tiny(cls) -> Settings:
        return cls(length=64, steps=2, accumulation=2, teachers=2, lora_r=4, frozen_rank=64, eval_rows=2)


def nf4_student(shape: dict, device: str | torch.device, compute_dtype: torch.dtype) -> torch.nn.Module:
    """A random Qwen3 model whose decoder linear layers are nf4 ``Linear4bit`` layers, built without ever holding
    the model in ``compute_dtype``: every parameter starts on the meta device, each linear weight is drawn on
    ``device`` and quantized alone (one layer's full-precision weight at a time, 100 MB for an 8B MLP), and the
    rest (embeddings, norms, output layer) is drawn in place. Buffers (rotary frequencies) are made on ``device``.
    The layers are what ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)`` loads."""
    device = torch.device(device)
    generator = torch.Generator(device).manual_seed(0)
    with torch.device(device), init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(Qwen3Config(**shape), dtype=compute_dtype)
    std = model.config.initializer_range
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if not isinstance(linear, torch.nn.Linear):
                    continue
                quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                              compute_dtype=compute_dtype, quant_type="nf4", device="meta")  # fmt: skip
                weight = torch.empty(linear.out_features, linear.in_features, device=device, dtype=compute_dtype)
                weight.normal_(0.0, std, generator=generator)
                quantized.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", module=quantized)
                quantized.weight = quantized.weight.to(device)  # quantizes; the full-precision weight is freed here
                setattr(parent, name, quantized)
    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                value = torch.empty(param.shape, device=device, dtype=compute_dtype)
                if "norm" in module_name:
                    value.fill_(1.0)
                else:
                    value.normal_(0.0, std, generator=generator)
                setattr(module, name, torch.nn.Parameter(value, requires_grad=param.requires_grad))
    model.is_loaded_in_4bit = True  # what TRL and PEFT read to treat it as a QLoRA student
    return model


def frozen_round_delta(model: torch.nn.Module, rank: int, seed: int = 0) -> dict[str, LowRankDelta]:
    """A merged delta of ``rank`` on every linear layer (fp32 on the CPU, as a MoT run holds its merged factors):
    the frozen adapter that rounds 1-4 leave a round-5 branch."""
    targets = adapters.check_targets(model, LoraConfig(target_modules="all-linear"))
    generator = torch.Generator().manual_seed(seed)
    return {name: LowRankDelta(torch.randn(fan_out, rank, generator=generator) * 1e-3,
                               torch.randn(rank, fan_in, generator=generator) * 1e-3)
            for name, (fan_in, fan_out) in zip(targets, adapters.layer_dims(model, targets))}  # fmt: skip


def random_tokens(rows: int, length: int, vocab: int, seed: int) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({"input_ids": torch.randint(4, vocab, (rows, length), generator=generator).tolist()})


class StepClock(TrainerCallback):
    """Each optimizer step's wall time (CUDA synchronized) and whether it was its trainer's first; the reserved
    memory peak at the last step's end."""

    def __init__(self):
        self.seconds: list[float] = []
        self.first: list[bool] = []
        self.steps_peak_reserved = 0
        self.one_pass_layers: int | None = None  # layers whose branch ran the one-pass LoRA (fused.py), first step

    def on_train_begin(self, args, state, control, **kwargs):
        self._new_trainer = True

    def on_step_begin(self, args, state, control, **kwargs):
        synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        synchronize()
        self.seconds.append(time.perf_counter() - self._start)
        self.first.append(self._new_trainer)
        self._new_trainer = False
        if self.one_pass_layers is None and isinstance(model, PeftModel):
            variants = [v for layer in adapters.lora_layers(model).values() for v in layer.lora_variant.values()]
            self.one_pass_layers = sum(isinstance(v, FrozenDeltaPass) for v in variants)
        if torch.cuda.is_available():
            self.steps_peak_reserved = max(self.steps_peak_reserved, torch.cuda.max_memory_reserved())

    def median_warm_step(self) -> float:
        """The median step time over the steps after each trainer's first (allocations and compilation)."""
        warm = [s for s, first in zip(self.seconds, self.first) if not first] or self.seconds
        return statistics.median(warm)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cap_memory(cap_gb: float) -> dict:
    """Limit this process to ``cap_gb`` of the card (what a 24 GB consumer card leaves it, roughly)."""
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = min(cap_gb * 2**30 / total, 1.0)
    torch.cuda.set_per_process_memory_fraction(fraction)
    return {"card_gb": total / 2**30, "cap_gb": cap_gb, "fraction": fraction}


def memory_record(prefix: str) -> dict:
    """Peak reserved and allocated memory since the last reset, and the card's used memory now (mem_get_info)."""
    if not torch.cuda.is_available():
        return {}
    free, total = torch.cuda.mem_get_info()
    return {f"{prefix}peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30,
            f"{prefix}peak_allocated_gb": torch.cuda.max_memory_allocated() / 2**30,
            f"{prefix}card_used_gb": (total - free) / 2**30}  # fmt: skip


def worker(mode: str, settings: Settings, tiny: bool) -> dict:
    """One run in this process: ``"plain"`` QLoRA or a ``"mot"`` round above a round-5 frozen adapter."""
    cuda = not tiny
    device = "cuda" if cuda else "cpu"
    record = {"mode": mode, "settings": asdict(settings), "device": torch.cuda.get_device_name() if cuda else "cpu"}
    if cuda:
        record["memory_cap"] = cap_memory(settings.cap_gb)
    shape = TINY if tiny else QWEN3_8B
    start = time.perf_counter()
    model = nf4_student(shape, device, torch.bfloat16 if cuda else torch.float32)
    record["build_seconds"] = time.perf_counter() - start
    record.update(memory_record("model_"))
    lora = LoraConfig(r=settings.lora_r, lora_alpha=2 * settings.lora_r, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")  # fmt: skip
    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=1,
                  gradient_accumulation_steps=settings.accumulation, gradient_checkpointing=True, bf16=cuda,
                  learning_rate=1e-4, report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True,
                  max_length=settings.length, use_cpu=tiny, dataloader_pin_memory=False)  # fmt: skip
    rows = settings.steps * settings.accumulation
    clock = StepClock()
    if mode == "mot":
        teachers = {f"teacher{k}": random_tokens(rows, settings.length, shape["vocab_size"], k)
                    for k in range(settings.teachers)}  # fmt: skip
        config = MoTConfig(num_rounds=1, max_steps=settings.steps, eval_branches=False, save_branch_adapters=False,
                           **common)  # fmt: skip
        trainer = MoTTrainer(model, args=config, teachers=teachers, processing_class=build_char_tokenizer(),
                             peft_config=lora, callbacks=[clock])  # fmt: skip
        trainer.merged = frozen_round_delta(model, settings.frozen_rank)  # D_4, as rounds 1-4 leave it
        trainer.model = trainer.frozen_delta.install(trainer.model, trainer.merged)
        record["frozen_adapter"] = {"rank": settings.frozen_rank, "dtype": str(trainer.frozen_delta.adapter_dtype),
                                    "home": trainer.frozen_delta.home}  # fmt: skip
    else:
        data = random_tokens(rows * settings.teachers, settings.length, shape["vocab_size"], 0)
        trainer = SFTTrainer(model, args=SFTConfig(max_steps=settings.steps * settings.teachers, **common),
                             train_dataset=data, processing_class=build_char_tokenizer(), peft_config=lora,
                             callbacks=[clock])  # fmt: skip
    devices.release_cached_memory()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    record["train_seconds"] = time.perf_counter() - start
    record.update(steps=len(clock.seconds), step_seconds=clock.seconds, median_step_seconds=clock.median_warm_step(),
                  tokens_per_second=settings.length * settings.accumulation / clock.median_warm_step(),
                  steps_peak_reserved_gb=clock.steps_peak_reserved / 2**30 if cuda else None,
                  one_pass_layers=clock.one_pass_layers)  # fmt: skip
    record.update(memory_record("run_"))  # MoT: its steps, then the merge and the install of rank 256 + K*r
    if mode == "mot":
        trainer.eval_dataset = random_tokens(settings.eval_rows, settings.length, shape["vocab_size"], 99)
        devices.release_cached_memory()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        eval_loss = trainer.evaluate()["eval_loss"]
        synchronize()
        record.update(eval_seconds=time.perf_counter() - start, eval_loss=eval_loss,
                      eval_batch=devices.eval_loss_batch_size(trainer.args),
                      eval_batch_asked=trainer.args.per_device_eval_batch_size)  # fmt: skip
        record.update(memory_record("eval_"))
    return record


def run_worker(mode: str, args: argparse.Namespace, folder: Path) -> dict:
    """Run ``worker(mode)`` in a fresh process whose output goes straight to this one's (a failure's traceback is
    shown as it happens); return its record, or the failure with the traceback it wrote."""
    result = folder / f"{mode}.json"
    cmd = [sys.executable, __file__, "--worker", mode, "--result", str(result), *worker_flags(args)]
    process = subprocess.run(cmd, timeout=args.timeout)
    if result.exists():
        return json.loads(result.read_text())
    return {"mode": mode, "error": f"worker exited with status {process.returncode} and wrote no record"}


def worker_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--tiny"] if args.tiny else []
    for name in ("length", "steps", "accumulation", "teachers", "frozen_rank", "cap_gb"):
        value = getattr(args, name)
        if value is not None:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def settings_from(args: argparse.Namespace) -> Settings:
    settings = Settings.tiny() if args.tiny else Settings()
    for name in ("length", "steps", "accumulation", "teachers", "frozen_rank", "cap_gb"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    return settings


def compare(runs: dict[str, dict]) -> dict:
    """MoT over plain: step time and peak reserved memory (the goals: at most 1.10 each, and within the cap)."""
    mot, plain = runs.get("mot", {}), runs.get("plain", {})
    if "error" in mot or "error" in plain:
        return {"complete": False}
    out = {"complete": True, "step_time_ratio": mot["median_step_seconds"] / plain["median_step_seconds"]}
    if mot.get("steps_peak_reserved_gb"):  # on a GPU
        out["steps_peak_reserved_ratio"] = mot["steps_peak_reserved_gb"] / plain["steps_peak_reserved_gb"]
        peaks = [mot["run_peak_reserved_gb"], plain["run_peak_reserved_gb"], mot["eval_peak_reserved_gb"]]
        out["within_cap"] = max(peaks) <= mot["settings"]["cap_gb"]
        ratios = (out["step_time_ratio"], out["steps_peak_reserved_ratio"])
        out["meets_goals"] = out["within_cap"] and max(ratios) <= 1.10
    return out


def write_results(folder: Path, name: str, record: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    runs, ratios = record["runs"], record["comparison"]

    def cell(run: dict, key: str, digits: int = 2) -> str:
        value = run.get(key)
        return "n/a" if value is None else f"{value:.{digits}f}"

    lines = [f"# GPU fit ({runs.get('plain', {}).get('device', '?')})", "", f"Command: `{record['command']}`", "",
             "| run | step s (median) | tokens/s | steps peak reserved GB | run peak reserved GB | card used GB | "
             "eval peak reserved GB | error |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for mode, run in runs.items():
        error = run.get("error", "").strip().splitlines()[-1:] or [""]
        cells = [cell(run, "median_step_seconds", 3), cell(run, "tokens_per_second", 0)]
        cells += [cell(run, key) for key in ("steps_peak_reserved_gb", "run_peak_reserved_gb", "run_card_used_gb",
                                             "eval_peak_reserved_gb")]  # fmt: skip
        lines.append(f"| {mode} | " + " | ".join(cells) + f" | {error[0]} |")
    lines += ["", "MoT/plain: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in ratios.items())]  # fmt: skip
    (folder / f"{name}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny student on the CPU (tests the code path)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for gpu_fit.json and gpu_fit.md")
    parser.add_argument("--length", type=int, help="tokens per row (default 4096)")
    parser.add_argument("--steps", type=int, help="optimizer steps per MoT branch (default 4)")
    parser.add_argument("--accumulation", type=int, help="gradient accumulation steps (default 2)")
    parser.add_argument("--teachers", type=int, help="branches the MoT round trains (default 2)")
    parser.add_argument("--frozen-rank", type=int, help="rank of the frozen merged adapter (default 256)")
    parser.add_argument("--cap-gb", type=float, help="per-process GPU memory cap in GiB (default 24)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds each worker may run")
    parser.add_argument("--worker", choices=["mot", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        try:
            record = worker(args.worker, settings_from(args), args.tiny)
        except BaseException:
            args.result.write_text(json.dumps({"mode": args.worker, "error": traceback.format_exc()}))
            raise  # the traceback is printed here as well
        args.result.write_text(json.dumps(record))
        return record
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        for mode in ("plain", "mot"):
            runs[mode] = run_worker(mode, args, Path(folder))
            print(json.dumps({k: v for k, v in runs[mode].items() if k != "step_seconds"}), flush=True)
    name = "gpu_fit_tiny_cpu" if args.tiny else "gpu_fit"
    command = "python benchmarks/" + " ".join([Path(__file__).name, *(argv if argv is not None else sys.argv[1:])])
    record = {"command": command, "runs": runs, "comparison": compare(runs)}
    write_results(args.out, name, record)
    return record


if __name__ == "__main__":
    main()
