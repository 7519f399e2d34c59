"""Small helpers shared by the tests: a quick MoT run and an independent reading of saved adapters."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file

from merge_of_thought import MoTConfig, MoTTrainer

TWO_THREADS = "two-cpu-threads"
"""The pytest-xdist group of the test files that train on two CPU threads (the demo, the real student's smoke run):
two of them at once oversubscribe two cores (a fresh-clone suite took 15.7 min when they overlapped, 12.8 when not),
so they share one unit of work and run one after the other (conftest.py groups every other file by itself)."""


def quick_config(output_dir, **overrides) -> MoTConfig:
    values = dict(
        output_dir=str(output_dir),
        num_rounds=2,
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        logging_steps=1,
        report_to=[],
        gradient_checkpointing=False,
        disable_tqdm=True,
        seed=0,
    )
    values.update(overrides)
    return MoTConfig(**values)


def quick_lora(**overrides) -> LoraConfig:
    values = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    values.update(overrides)
    return LoraConfig(**values)


def quick_trainer(model, teachers, output_dir, tokenizer=None, lora=None, **config) -> MoTTrainer:
    return MoTTrainer(
        model,
        args=quick_config(output_dir, **config),
        teachers=teachers,
        processing_class=tokenizer,
        peft_config=lora or quick_lora(),
    )


def dense_adapter(folder: Path) -> dict[str, torch.Tensor]:
    """B @ A * alpha / r per module, read straight from a PEFT folder (independent of merge_of_thought)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    state = load_file(str(folder / "adapter_model.safetensors"))
    scaling = config["lora_alpha"] / config["r"]
    out = {}
    for key, A in state.items():
        if key.endswith("lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            out[module] = state[key.replace("lora_A", "lora_B")].double() @ A.double() * scaling
    return out


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(relative_path: str):
    """Import a benchmark script (benchmarks/ is not a package) so its functions can be tested."""
    path = BENCHMARKS / relative_path
    name = "benchmark_" + relative_path.removesuffix(".py").replace("/", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
