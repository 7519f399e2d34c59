"""Shared pieces of the performance benchmarks: a benchmark-sized student, its data, and result files."""

from __future__ import annotations

import json
import random
import resource
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, Qwen3Config

from merge_of_thought.demo.tokenizer import build_char_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hardware import cpu_name  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"

# ~70M parameters: the size the issue names (about 1 s/step in fp32 and 2.5 s/step in nf4 at batch 8 on 2 cores).
SIZES = {
    "70m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=10, num_attention_heads=12,
                num_key_value_heads=4, head_dim=64),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32),
}


def build_student(folder: Path, size: str, seed: int = 0) -> str:
    """Save a randomly initialised Qwen3 of the given size with the char tokenizer, like a Hub checkpoint."""
    if (folder / "config.json").exists():
        return str(folder)
    tokenizer = build_char_tokenizer()
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=False,
                         **SIZES[size])
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def teacher_data(k: int, n: int = 200, seed: int = 0) -> Dataset:
    """Prompt-completion arithmetic traces, ~60-80 characters each (short sequences, as the issue asks)."""
    rng = random.Random(seed * 100 + k)
    rows = []
    for _ in range(n):
        a, b, c = (rng.randint(10, 99) for _ in range(3))
        steps = [f"{a}+{b}={a + b}, {a + b}+{c}={a + b + c}", f"{b}+{c}={b + c}, {a}+{b + c}={a + b + c}",
                 f"add {a} and {b} to get {a + b}, then {c}", f"{c}+{a}={a + c}, plus {b}"][k % 4]
        rows.append({"prompt": f"Q: {a}+{b}+{c}=?\n", "completion": f"{steps}\n#### {a + b + c}"})
    return Dataset.from_list(rows)


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def machine() -> dict:
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def update_results(name: str, record: dict) -> None:
    """Store one benchmark's record under its name in perf.json, leaving the others as they are."""
    path = RESULTS / "perf.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = json.loads(path.read_text()) if path.exists() else {}
    results[name] = record
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
