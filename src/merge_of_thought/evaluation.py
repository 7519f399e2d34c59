"""Generation-based accuracy on reasoning data: final-answer extraction, answer matching and batched greedy decoding.

Used by :class:`~merge_of_thought.MoTTrainer` after every round (``MoTConfig.eval_accuracy_samples``) and usable on
its own::

    result = generation_accuracy(model, tokenizer, ["Q: 2+3=?\\n"], ["5"], max_new_tokens=64)
    result.accuracy, result.records[0]["completion"]
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .quantization import keep_4bit_layout

Prompt = str | list[dict[str, Any]]  # plain text, or chat messages rendered with the tokenizer's chat template

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES = re.compile(r"####\s*([^\n]*)")
_NUMBER_NOISE = re.compile(r"[\s,$€£%]|\\[$%!,;]|\\text\{[^}]*\}")


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``, braces nested inside it included; ``None`` if there is none."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i]
    return None


def extract_final_answer(text: str, pattern: str | re.Pattern | None = None) -> str | None:
    """The final answer in a reasoning trace, or ``None`` when it states none.

    With ``pattern`` (a regex), the last match is used: its first group if it has one, else the whole match.
    Otherwise the last ``\\boxed{...}`` (nested braces allowed) wins, then the text after the last ``####``.
    """
    if pattern is not None:
        matches = list(re.finditer(pattern, text))
        if not matches:
            return None
        last = matches[-1]
        return (last.group(1) if last.re.groups else last.group(0)).strip()
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    hashes = _HASHES.findall(text)
    return hashes[-1].strip() if hashes else None


def _as_number(text: str) -> float | None:
    """``"1,234"``, ``"$5"``, ``"-3.50"``, ``"12%"``, ``"3/4"`` and ``"\\frac{3}{4}"`` as numbers; else ``None``."""
    s = _NUMBER_NOISE.sub("", text).rstrip(".")
    frac = re.fullmatch(r"(-?)\\d?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", s) or re.fullmatch(r"(-?)([\d.]+)/([\d.]+)", s)
    try:
        if frac:
            sign = -1.0 if frac.group(1) else 1.0
            return sign * float(frac.group(2)) / float(frac.group(3))
        return float(s)
    except (ValueError, ZeroDivisionError):
        return None


def _normalized(text: str) -> str:
    return " ".join(text.strip().strip("$").rstrip(".").split())


def answers_match(predicted: str | None, gold: str | None, numeric: bool = True) -> bool:
    """Whether a predicted final answer equals the reference.

    ``numeric=True`` compares as numbers when both parse as one (``"1,000" == "1000.0"``, ``"\\frac{1}{2}" == "0.5"``,
    relative tolerance 1e-6), and falls back to the exact comparison otherwise. The exact comparison ignores
    surrounding whitespace, ``$`` signs, a trailing period and repeated spaces.
    """
    if predicted is None or gold is None:
        return False
    if numeric:
        a, b = _as_number(predicted), _as_number(gold)
        if a is not None and b is not None:
            return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return _normalized(predicted) == _normalized(gold)


@dataclass
class AccuracyResult:
    """Accuracy over the scored samples and, per sample, the prompt, completion, extracted and reference answers."""

    accuracy: float
    records: list[dict[str, Any]] = field(default_factory=list)


def _render(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate_completions(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    batch_size: int = 8,
    max_new_tokens: int = 256,
    disable_tqdm: bool = False,
    **generate_kwargs: Any,
) -> list[str]:
    """Greedy completions of every prompt (text, or chat messages rendered with ``add_generation_prompt=True``),
    decoded in left-padded batches with a progress bar; ``generate_kwargs`` go to ``model.generate``."""
    keep_4bit_layout(model)  # an eval-mode forward would repack 4-bit weights on some CPUs (quantization.py)
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generated tokens must follow every prompt directly
    generate_kwargs = {"do_sample": False, "max_new_tokens": max_new_tokens, **generate_kwargs}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generate_kwargs.setdefault("pad_token_id", pad_id)
    completions: list[str] = []
    try:
        bar = tqdm(total=len(prompts), desc="Generation", unit="sample", leave=False, disable=disable_tqdm)
        with bar:
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start : start + batch_size]
                texts = [_render(tokenizer, p) for p in batch]
                # A chat template writes its own special tokens; a plain prompt gets the tokenizer's usual ones.
                ids = [tokenizer(t, add_special_tokens=isinstance(p, str))["input_ids"] for t, p in zip(texts, batch)]
                inputs = tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(model.device)
                output = model.generate(**inputs, **generate_kwargs)
                generated = output[:, inputs["input_ids"].shape[1] :]
                completions += tokenizer.batch_decode(generated, skip_special_tokens=True)
                bar.update(len(batch))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return completions


def generation_accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    answers: Sequence[str],
    batch_size: int = 8,
    max_new_tokens: int = 256,
    pattern: str | re.Pattern | None = None,
    numeric: bool = True,
    disable_tqdm: bool = False,
    **generate_kwargs: Any,
) -> AccuracyResult:
    """Greedy-decode every prompt in left-padded batches and score the extracted final answer against ``answers``.

    Args:
        prompts: plain-text prompts, or chat messages (rendered with ``add_generation_prompt=True``).
        answers: the reference final answers (already extracted, e.g. ``"42"``).
        pattern: a regex for the final answer in the completions (see :func:`extract_final_answer`).
        numeric: compare as numbers when both sides parse as one (see :func:`answers_match`).
        generate_kwargs: passed to ``model.generate`` (greedy by default).
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers.")
    completions = generate_completions(
        model, tokenizer, prompts, batch_size, max_new_tokens, disable_tqdm, **generate_kwargs
    )
    records = []
    for prompt, completion, gold in zip(prompts, completions, answers):
        predicted = extract_final_answer(completion, pattern)
        records.append(
            {
                "prompt": _render(tokenizer, prompt),
                "completion": completion,
                "predicted": predicted,
                "answer": gold,
                "correct": answers_match(predicted, gold, numeric),
            }
        )
    accuracy = sum(r["correct"] for r in records) / len(records) if records else float("nan")
    return AccuracyResult(accuracy, records)


def _text_of(value: Any) -> str:
    """A completion as text: a string, or the content of the last message of a conversational completion."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return str(value[-1].get("content", ""))
    return str(value)


def prompts_and_answers(
    dataset: Dataset, limit: int | None = None, pattern: str | re.Pattern | None = None
) -> tuple[list[Prompt], list[str]]:
    """Prompts and reference final answers from a held-out set, for :func:`generation_accuracy`.

    Reads, per row:
        - the prompt: the ``prompt`` column (text or messages), else the ``messages`` up to the last assistant turn;
        - the reference: the ``answer`` column, else the ``completion`` column, else that last assistant turn; its
          final answer is extracted (``\\boxed{}``, ``####`` or ``pattern``) and the whole text is used when it
          states none (an ``answer`` column holding just ``"42"``).
    """
    columns = set(dataset.column_names)
    if "prompt" not in columns and "messages" not in columns:
        raise ValueError(
            f"eval data needs a 'prompt' or 'messages' column for generation accuracy, got {sorted(columns)}."
        )
    rows = dataset.select(range(min(limit, len(dataset)))) if limit else dataset
    prompts, answers = [], []
    for index, row in enumerate(rows):
        reference = row.get("answer", row.get("completion"))
        if "prompt" in columns:
            prompt = row["prompt"]
        else:
            messages = row["messages"]
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
            if last is None:
                raise ValueError(f"eval row {index}: 'messages' has no assistant turn to take the answer from.")
            prompt = messages[:last]
            reference = reference if reference is not None else messages[last]["content"]
        if reference is None:
            raise ValueError(f"eval row {index}: no 'answer' or 'completion' to score against.")
        text = _text_of(reference)
        prompts.append(prompt)
        answers.append(extract_final_answer(text, pattern) or text.strip())
    return prompts, answers
