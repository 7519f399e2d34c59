"""The demo student: a tiny Qwen3 causal LM pre-trained on primitive arithmetic facts and copying.

A randomly initialised tiny student distilled with LoRA learns almost nothing; what matters is its prior. The shipped
student (``merge_of_thought/demo/student/``) was therefore pre-trained, full-parameter in fp32, on a generic corpus of
single-digit addition facts, carry facts, round-tens facts and copying. It has never seen multi-digit addition, the
teachers' chain-of-thought layout, nor the ``"####"`` answer format.

Regenerate the shipped checkpoint (deterministic on CPU) with::

    python -m merge_of_thought.demo.student --rebuild
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase, Qwen3Config

from ..evaluation import generate_completions
from ..quantization import keep_4bit_layout
from .tokenizer import build_char_tokenizer


DEMO_STUDENT_DIR = Path(__file__).resolve().parent / "student"


def demo_student_config(tokenizer: PreTrainedTokenizerBase) -> Qwen3Config:
    """Config of the tiny student (every linear dimension a multiple of 64, as bitsandbytes 4-bit wants)."""
    return Qwen3Config(
        vocab_size=128,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=128,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def pretraining_corpus(rng: random.Random) -> str:
    """One random line of the generic pre-training corpus (no multi-digit addition, no chain-of-thought)."""
    kind = rng.random()
    if kind < 0.25:  # single-digit facts: 7+5=12
        a, b = rng.randrange(10), rng.randrange(10)
        return f"{a}+{b}={a + b}"
    if kind < 0.45:  # carry facts: 4+2+1=7
        a, b = rng.randrange(10), rng.randrange(10)
        return f"{a}+{b}+1={a + b + 1}"
    if kind < 0.6:  # round tens: 40+20=60
        a, b = rng.randrange(1, 10), rng.randrange(1, 10)
        return f"{a}0+{b}0={(a + b) * 10}"
    if kind < 0.75:  # round tens plus a small number: 60+12=72
        a, k = rng.randrange(1, 19), rng.randrange(19)
        return f"{a}0+{k}={a * 10 + k}"
    # copying: "copy 47+25: 47+25"
    alphabet = "0123456789" * 3 + "+ "
    text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(2, 9))).strip() or "0"
    return f"copy {text}: {text}"


def pretraining_probes(n: int = 200, seed: int = 4321) -> list[tuple[str, str]]:
    """``n`` distinct (prompt, expected continuation) pairs cut from corpus lines: ``("7+5=", "12")``,
    ``("copy 4+1: ", "4+1")``. Scoring the student on them measures what it keeps of its pre-training."""
    rng = random.Random(seed)
    probes: dict[str, str] = {}
    while len(probes) < n:
        line = pretraining_corpus(rng)
        cut = line.index(": ") + 2 if line.startswith("copy ") else line.rindex("=") + 1
        probes.setdefault(line[:cut], line[cut:])
    return list(probes.items())


def pretraining_accuracy(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, probes=None) -> float:
    """Fraction of [`pretraining_probes`] whose greedy continuation's first line is exactly the expected text."""
    probes = probes or pretraining_probes()
    prompts = [prompt for prompt, _ in probes]
    completions = generate_completions(model, tokenizer, prompts, batch_size=256, max_new_tokens=12, disable_tqdm=True)
    return sum(c.split("\n")[0] == expected for c, (_, expected) in zip(completions, probes)) / len(probes)


def _pretraining_batch(tokenizer, rng: random.Random, batch_size: int, seq_len: int) -> torch.Tensor:
    rows = []
    for _ in range(batch_size):
        ids: list[int] = [tokenizer.bos_token_id]
        while len(ids) < seq_len:
            ids += tokenizer(pretraining_corpus(rng) + "\n", add_special_tokens=False).input_ids
        rows.append(ids[:seq_len])
    return torch.tensor(rows)


def pretrain_student(
    output_dir: str | Path | None = None,
    steps: int = 1500,
    batch_size: int = 32,
    seq_len: int = 48,
    learning_rate: float = 3e-3,
    seed: int = 0,
    num_threads: int = 1,
    log_every: int = 100,
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Pre-train the tiny student from scratch (full-parameter, fp32, plain torch loop) on [`pretraining_corpus`].

    Args:
        output_dir: If given, save the model (bf16 safetensors) and tokenizer there.
        steps: Optimisation steps.
        batch_size: Sequences per step.
        seq_len: Tokens per sequence (random corpus lines packed back to back).
        learning_rate: Peak AdamW learning rate (linear warm-up, cosine decay).
        seed: Seed for initialisation and data; the result is deterministic for a given seed and thread count.
        num_threads: Torch CPU threads.
        log_every: Print the loss every this many steps (0 to disable).

    Returns:
        The fp32 model (eval mode) and its tokenizer.
    """
    torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = build_char_tokenizer()
    model = AutoModelForCausalLM.from_config(demo_student_config(tokenizer), dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def lr_lambda(step: int) -> float:
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    model.train()
    start = time.time()
    for step in range(steps):
        input_ids = _pretraining_batch(tokenizer, rng, batch_size, seq_len)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
    model.eval()
    if output_dir is not None:
        save_student(model, tokenizer, output_dir)
    return model, tokenizer


def save_student(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, output_dir: str | Path) -> None:
    """Save ``model`` in bf16 safetensors plus its tokenizer to ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(output_dir, safe_serialization=True)
    model.to(torch.float32)
    tokenizer.save_pretrained(output_dir)


def load_demo_student(
    path: str | Path | None = None, load_in_4bit: bool = True, compute_dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Load the demo student through the regular ``from_pretrained`` code path on a local folder.

    Args:
        path: Checkpoint folder; defaults to the student shipped inside the package.
        load_in_4bit: Quantize the linear layers to bitsandbytes nf4; otherwise load in fp32.
        compute_dtype: The nf4 layers' compute dtype: fp32, or bf16 for a bf16-autocast run.

    Returns:
        The model and its tokenizer.
    """
    path = str(path or DEMO_STUDENT_DIR)
    kwargs = {}
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    keep_4bit_layout(model)  # the demo and benchmarks evaluate between rounds (quantization.py)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description="Rebuild the shipped demo student.")
    parser.add_argument("--rebuild", action="store_true", help="Pre-train and overwrite the shipped checkpoint.")
    parser.add_argument("--output-dir", default=str(DEMO_STUDENT_DIR))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.rebuild:
        parser.error("pass --rebuild to regenerate the student")
    pretrain_student(args.output_dir, steps=args.steps, seed=args.seed)
    print(f"Saved demo student to {args.output_dir}")


if __name__ == "__main__":
    main()
