"""Shared fixtures: tiny Qwen3/Llama students built from configs, a local tokenizer, and teacher data sets.

Nothing comes from the Hub: models are saved to a temporary folder so the real ``from_pretrained`` path runs.
"""

from __future__ import annotations

import os

# before any Hugging Face library is imported: huggingface_hub reads HF_HUB_OFFLINE once, at import
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config  # noqa: E402

from merge_of_thought.demo.tokenizer import build_char_tokenizer  # noqa: E402
from merge_of_thought.quantization import cpu_repacks_4bit  # noqa: E402

torch.set_num_threads(1)  # tiny models: a second thread only adds synchronisation

LINEAR_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def pytest_report_header(config):
    how = "native on this CPU" if cpu_repacks_4bit() else "emulated (this CPU has no AVX512-BF16)"
    return f"bitsandbytes' AVX512-BF16 4-bit repacking in the tests that ask for it: {how}"


@pytest.fixture
def cpu_4bit_repacking(monkeypatch):
    """Every ``Linear4bit`` built in the test takes bitsandbytes' AVX512-BF16 CPU inference path, which repacks its
    weight in place on an eval-mode forward (quantization.py). On a CPU with AVX512-BF16 that is what bitsandbytes
    does anyway; elsewhere its own per-layer switch is set by making its capability check answer yes (the repack
    itself is plain torch code and runs on any CPU), so the tests of the guard can fail on every machine."""
    import bitsandbytes.nn.modules as bnb_modules

    if not cpu_repacks_4bit():
        monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)


def tiny_config(arch: str, vocab_size: int):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    if arch == "qwen3":
        return Qwen3Config(head_dim=16, **common)
    if arch == "llama":
        return LlamaConfig(**common)
    raise ValueError(arch)


@pytest.fixture(scope="session")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="session", params=["qwen3", "llama"])
def model_dir(request, tmp_path_factory, tokenizer):
    """A tiny random model of each architecture saved with its tokenizer, like a Hub checkpoint."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(request.param, len(tokenizer)))
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3", len(tokenizer)))
    folder = tmp_path_factory.mktemp("tiny-qwen3")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def make_teacher(style: int, n: int = 24, seed: int = 0) -> Dataset:
    """Prompt-completion traces for small sums; each style writes its reasoning differently."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        a, b = (int(x) for x in torch.randint(0, 50, (2,), generator=g))
        steps = [f"{a}+{b}", f"{b}+{a}", f"add {a} and {b}", f"{a} plus {b}"][style % 4]
        rows.append({"prompt": f"Q: {a}+{b}=?\n", "completion": f"think: {steps}\n#### {a + b}"})
    return Dataset.from_list(rows)


@pytest.fixture
def teachers():
    return {f"teacher{k}": make_teacher(k, seed=k) for k in range(3)}
