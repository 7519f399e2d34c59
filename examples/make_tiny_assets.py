"""Write the files examples/configs/demo_tiny.yaml points at: a tiny random Qwen3 student and three toy teachers.

Everything is made locally (no Hub): a 2-layer Qwen3 with the package's character-level tokenizer, and three
teachers that solve the same small sums but write their reasoning differently (prompt-completion JSON lines, the
final answer after ``####``), plus a held-out set with an ``answer`` column for per-round accuracy::

    python examples/make_tiny_assets.py            # writes ./mot-tiny-data
    mot train --config examples/configs/demo_tiny.yaml
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from merge_of_thought.demo.tokenizer import build_char_tokenizer

STYLES = {
    "left-to-right": "{a}+{b}",
    "commuted": "{b}+{a}",
    "verbal": "add {a} and {b}",
}


def rows(style: str, n: int, rng: random.Random) -> list[dict[str, str]]:
    out = []
    for _ in range(n):
        a, b = rng.randrange(50), rng.randrange(50)
        out.append({"prompt": f"Q: {a}+{b}=?\n", "completion": f"think: {style.format(a=a, b=b)}\n#### {a + b}"})
    return out


def write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def main(folder: str = "mot-tiny-data", n: int = 32, seed: int = 0) -> Path:
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = build_char_tokenizer()
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rng = random.Random(seed)
    for name, style in STYLES.items():
        write_jsonl(root / f"teacher_{name}.jsonl", rows(style, n, rng))
    held_out = rows(STYLES["left-to-right"], 16, rng)
    for row in held_out:
        row["answer"] = row["completion"].rsplit("#### ", 1)[1]
    write_jsonl(root / "eval.jsonl", held_out)
    return root


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="mot-tiny-data")
    print(f"Wrote {main(parser.parse_args().folder)}")
