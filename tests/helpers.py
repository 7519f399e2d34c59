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


S1K = "simplescaling/s1K-1.1"
OMR = "nvidia/OpenMathReasoning"
MATH500 = "HuggingFaceH4/MATH-500"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_hub_copies(root: Path) -> None:
    """Small local copies of simplescaling/s1K-1.1, nvidia/OpenMathReasoning (cot split) and HuggingFaceH4/MATH-500
    under ``root``, in folders named like the Hub ids and with their columns, so that ``load_dataset(id)`` run in
    ``root`` reads them (a local folder of that name comes first) and a config written for the Hub runs unchanged."""
    write_jsonl(root / S1K / "train.jsonl", [
        {"solution": str(a + 7), "question": f"What is {a}+7?", "cot_type": "math", "source_type": "fixture",
         "metadata": "{}", "deepseek_thinking_trajectory": f"Okay, {a} plus 7. " * (1 + a) + f"So {a + 7}.",
         "deepseek_attempt": f"The answer is $\\boxed{{{a + 7}}}$.",
         "gemini_thinking_trajectory": f"{a}+7={a + 7}", "gemini_attempt": f"**Answer** \\boxed{{{a + 7}}}"}
        for a in range(10)])  # fmt: skip
    models = ["DeepSeek-R1", "QwQ-32B", "DeepSeek-R1"]
    write_jsonl(root / OMR / "data" / "cot-00000-of-00001.jsonl", [
        {"problem": f"What is {a}*3?", "generated_solution": f"<think>\n{a} times 3 is {3 * a}.\n</think>\n\n"
         f"\\boxed{{{3 * a}}}", "expected_answer": str(3 * a), "generation_model": models[a % 3],
         "problem_type": "has_answer_extracted", "problem_source": "fixture"} for a in range(9)])  # fmt: skip
    write_jsonl(root / MATH500 / "test.jsonl", [
        {"problem": f"What is {a}+{a}?", "solution": "...", "answer": str(2 * a), "subject": "Algebra", "level": 1,
         "unique_id": f"test/{a}.json"} for a in range(4)])  # fmt: skip
