"""GPU fit: does a Qwen3-8B-shaped student train with MoT in 16 GB, and how fast against plain SFTTrainer?

A Qwen3-8B-shaped model with random weights (built from its config on the GPU, no download) is quantized to 4-bit
nf4 in place, LoRA r=16 on all linear layers, sequences of 2048 tokens, batch 1, gradient checkpointing. One
process runs two MoT branches and their merge, another a plain SFTTrainer QLoRA run of the same number of steps;
each reports peak GPU memory (torch.cuda.max_memory_allocated) and tokens per second.

    python benchmarks/gpu_fit.py                # on a GPU: both runs, about 5 minutes on an H100
    python benchmarks/gpu_fit.py --tiny         # the same code path on the CPU with a tiny model (a smoke test)

Writes benchmarks/results/gpu_fit.json and gpu_fit.md with the card's name.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bitsandbytes as bnb
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, Qwen3Config, TrainerCallback
from trl import SFTConfig, SFTTrainer

from merge_of_thought import MoTConfig, MoTTrainer
from merge_of_thought.demo.tokenizer import build_char_tokenizer

RESULTS = Path(__file__).resolve().parent / "results"
QWEN3_8B = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=4096,
                tie_word_embeddings=False)
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, vocab_size=512, max_position_embeddings=512, tie_word_embeddings=False)


def quantized_student(shape: dict, device: str):
    """Random bf16 weights made on the device, then every decoder linear layer swapped for an nf4 Linear4bit."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(Qwen3Config(**shape), dtype=dtype)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if isinstance(linear, torch.nn.Linear):
                    quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                                  compute_dtype=dtype, quant_type="nf4", device="meta")
                    quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
                    setattr(parent, name, quantized.to(device))
    model.is_loaded_in_4bit = True
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return model


def random_tokens(rows: int, length: int, vocab: int, seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({"input_ids": torch.randint(4, vocab, (rows, length), generator=g).tolist()})


class Clock(TrainerCallback):
    def __init__(self):
        self.seconds, self.steps = 0.0, 0

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - self.start
        self.steps += 1


def worker(mode: str, tiny: bool, steps: int) -> dict:
    device = "cpu" if tiny else "cuda"
    shape, length = (TINY, 128) if tiny else (QWEN3_8B, 2048)
    model = quantized_student(shape, device)
    tokenizer = build_char_tokenizer()
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=1, gradient_checkpointing=True,
                  bf16=not tiny, learning_rate=1e-4, report_to=[], logging_steps=1, save_strategy="no",
                  disable_tqdm=True, max_length=length, use_cpu=tiny, dataloader_pin_memory=False)
    clock = Clock()
    if mode == "mot":
        teachers = {f"teacher{k}": random_tokens(64, length, shape["vocab_size"], k) for k in range(2)}
        trainer = MoTTrainer(model, args=MoTConfig(num_rounds=1, max_steps=steps, **common), teachers=teachers,
                             processing_class=tokenizer, peft_config=lora, callbacks=[clock])
    else:
        data = random_tokens(128, length, shape["vocab_size"], 0)
        trainer = SFTTrainer(model, args=SFTConfig(max_steps=2 * steps, **common), train_dataset=data,
                             processing_class=tokenizer, peft_config=lora, callbacks=[clock])
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    timed_steps = max(clock.steps, 1)
    return {
        "mode": mode, "steps": clock.steps, "wall_seconds": wall,
        "tokens_per_second": length * timed_steps / clock.seconds,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=5, help="steps per MoT branch (the plain run trains twice that)")
    parser.add_argument("--worker", choices=["mot", "plain"])
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.tiny, args.steps)))
        return
    runs = {}
    for mode in ("mot", "plain"):
        cmd = [sys.executable, __file__, "--worker", mode, "--steps", str(args.steps)]
        cmd += ["--tiny"] if args.tiny else []
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        runs[mode] = json.loads(out.strip().splitlines()[-1])
        print(runs[mode], flush=True)
    name = "gpu_fit_tiny_cpu" if args.tiny else "gpu_fit"
    record = {"command": "python benchmarks/" + " ".join([Path(__file__).name, *sys.argv[1:]]), "runs": runs,
              "target_peak_gb": 16, "tokens_per_second_ratio": runs["mot"]["tokens_per_second"]
              / runs["plain"]["tokens_per_second"]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    peak = {m: "n/a" if r["peak_gpu_gb"] is None else f"{r['peak_gpu_gb']:.2f}" for m, r in runs.items()}
    (RESULTS / f"{name}.md").write_text(
        f"# GPU fit ({runs['mot']['device']})\n\nCommand: `{record['command']}`\n\n"
        "| run | peak GPU GB (target <= 16) | tokens/s |\n|---|---|---|\n"
        + "".join(f"| {m} | {peak[m]} | {r['tokens_per_second']:.0f} |\n" for m, r in runs.items())
        + f"\nMoT/plain tokens per second: {record['tokens_per_second_ratio']:.3f}\n"
    )


if __name__ == "__main__":
    main()
