"""Judging reasoning completions and measuring a student's pass@1 on held-out problems.

:func:`is_correct` is the one place a completion is judged (the trainer's per-round evals, the demo and the
benchmarks all call it). :func:`generation_accuracy` decodes every prompt ``num_samples`` times and averages it over
the samples, as open-r1 and lighteval report pass@1::

    result = generation_accuracy(model, tokenizer, ["Q: 2+3=?\\n"], ["5"], max_new_tokens=64)
    result.accuracy, result.records[0]["completion"]
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .checkpointing import write_text_atomic
from .quantization import keep_4bit_layout

logger = logging.getLogger(__name__)

Prompt = str | list[dict[str, Any]]  # plain text, or chat messages rendered with the tokenizer's chat template

ANSWER_MATCHES = ("math", "numeric", "exact")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

# A completion's answer as lighteval's math metrics (math-g-pass@k; open-r1 evaluates with lighteval) extract it:
# \boxed{} first (boxed_match_priority=0, as TRL's accuracy rewards also do), then LaTeX after an anchor such as
# "final answer is", then plain expressions and numbers (ExprExtractionConfig: "#### 72", "The answer is 0.5"). The
# first match is used (extraction_mode="first_match", as in TRL's rewards).
PREDICTION_CONFIG = (ExprExtractionConfig(), LatexExtractionConfig(boxed_match_priority=0))
_LATEX_DELIMITED = re.compile(r"\$|\\\(|\\\[|\\boxed|\\fbox")
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


@dataclass(frozen=True)
class Judgement:
    """How one completion was judged: ``correct`` (``None``: the gold answer cannot be parsed, so it is skipped)
    and the answer extracted from the completion (``None``: it states none, or its reasoning never closed)."""

    correct: bool | None
    extracted: str | None = None


def ends_in_think(prompt: str) -> bool:
    """Whether a rendered prompt ends inside an open ``<think>`` block (templates whose generation prompt opens one,
    e.g. ``"<|im_start|>assistant\\n<think>\\n"``): its completion then starts in the reasoning."""
    return prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)


def final_text(completion: str, in_think: bool = False) -> str | None:
    """The part of a completion that is scored, by TRL's reasoning convention (``reasoning_accuracy_reward``): the
    text after the last ``</think>``; ``None`` when the reasoning opened (in the completion, or in the prompt:
    ``in_think``) and never closed; the whole completion when it has no think tags."""
    if THINK_CLOSE in completion:
        return completion.rsplit(THINK_CLOSE, 1)[1]
    return None if in_think or THINK_OPEN in completion else completion


def _timeout(seconds: int) -> int | None:
    """math-verify times out through signal.alarm, which works in the main thread only: none elsewhere (as TRL)."""
    return seconds if threading.current_thread() is threading.main_thread() else None


def _parsed(result: list) -> bool:
    """math-verify found an expression (not only the raw string it falls back to)."""
    return any(not isinstance(item, str) for item in result)


def parse_answer(answer: str) -> list:
    """A reference (or regex-extracted) answer as math-verify reads it; empty when it cannot.

    Text with LaTeX delimiters or a ``\\boxed{}`` (a whole solution, as TRL's and lighteval's references are) is
    parsed as it is; a bare answer (MATH-500's ``answer`` column: ``\\frac{14}{3}``, ``(3, \\frac{\\pi}{2})``, or the
    number after ``####``) is parsed as one LaTeX expression, ``$answer$``: parsed raw, math-verify would read
    ``6 - 5i`` as ``5``.
    """
    if not _LATEX_DELIMITED.search(answer):
        answer = f"${(extract_final_answer(answer) or answer).strip()}$"
    result = parse(answer, parsing_timeout=_timeout(10))
    return result if _parsed(result) else []


def _math_answer(text: str, pattern: str | re.Pattern | None) -> tuple[list, str | None]:
    """The answer in a completion's final text as math-verify reads it, and the text it was read from."""
    if pattern is not None:
        extracted = extract_final_answer(text, pattern)
        return (parse_answer(extracted) if extracted is not None else []), extracted
    answer = parse(text, PREDICTION_CONFIG, extraction_mode="first_match", parsing_timeout=_timeout(10))
    return answer, next((item for item in reversed(answer) if isinstance(item, str)), None)


def judge(
    completion: str,
    gold: str,
    answer_match: str = "math",
    answer_pattern: str | re.Pattern | None = None,
    in_think: bool = False,
) -> Judgement:
    """Judge one completion against its reference answer; :func:`is_correct` returns the verdict alone.

    Only the text after the reasoning is scored (:func:`final_text`); a reasoning that never closes scores 0.
    ``answer_match="math"``: ``verify(parse_answer(gold), answer)``, gold first as math-verify requires, with the
    answer extracted by lighteval's configuration (:data:`PREDICTION_CONFIG`) or, with ``answer_pattern``, by that
    regex and then read by :func:`parse_answer`; a gold that math-verify cannot parse gives ``correct=None``.
    ``"numeric"`` / ``"exact"``: the answer from :func:`extract_final_answer`, compared by :func:`answers_match`.
    """
    if answer_match not in ANSWER_MATCHES:
        raise ValueError(f"answer_match must be one of {ANSWER_MATCHES}, got {answer_match!r}.")
    text = final_text(completion, in_think)
    if answer_match != "math":
        extracted = None if text is None else extract_final_answer(text, answer_pattern)
        return Judgement(answers_match(extracted, gold, numeric=answer_match == "numeric"), extracted)
    answer, extracted = ([], None) if text is None else _math_answer(text, answer_pattern)
    reference = parse_answer(gold)
    if not reference:
        return Judgement(None, extracted)
    return Judgement(bool(answer) and bool(verify(reference, answer, timeout_seconds=_timeout(5))), extracted)


def is_correct(
    completion: str,
    gold: str,
    answer_match: str = "math",
    answer_pattern: str | re.Pattern | None = None,
    in_think: bool = False,
) -> bool | None:
    """Whether ``completion`` answers ``gold``: ``True``/``False``, or ``None`` when the gold answer cannot be parsed
    by math-verify (skipped, as TRL's accuracy rewards skip it). The single place a completion is judged.

    Args:
        completion: the generated text (what follows the prompt).
        gold: the reference final answer (``"42"``, ``"\\frac{1}{2}"``) or a solution with ``\\boxed{}``.
        answer_match: ``"math"`` (math-verify), ``"numeric"`` or ``"exact"``; see :func:`judge`.
        answer_pattern: a regex for the final answer (its first group if it has one).
        in_think: the prompt ends inside an open ``<think>`` (:func:`ends_in_think`), so the completion starts in
            the reasoning and scores 0 unless it closes it.
    """
    return judge(completion, gold, answer_match, answer_pattern, in_think).correct


@dataclass
class AccuracyResult:
    """pass@1 over the scored samples, the number of problems skipped (gold not parseable), and per sample its
    problem index, sample index, prompt, completion, extracted answer, gold answer and verdict."""

    accuracy: float
    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0


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


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Sample from ``seed`` without moving the caller's random state (the branches' data order and LoRA inits)."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def generation_accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    answers: Sequence[str],
    batch_size: int = 8,
    max_new_tokens: int = 256,
    pattern: str | re.Pattern | None = None,
    answer_match: str = "math",
    num_samples: int = 1,
    temperature: float = 0.6,
    top_p: float = 0.95,
    seed: int = 0,
    disable_tqdm: bool = False,
    **generate_kwargs: Any,
) -> AccuracyResult:
    """pass@1 of the model on ``prompts``: the mean over ``num_samples`` completions per prompt of
    :func:`is_correct`, over the samples whose gold answer math-verify can parse (the others are counted in
    ``skipped`` and left out, as TRL's accuracy rewards skip them).

    One sample is a greedy decode; more are sampled at ``temperature`` / ``top_p`` (0.6 / 0.95, what open-r1 and
    lighteval use for pass@1 over samples) from ``seed``, so the same seed gives the same completions.

    Args:
        prompts: plain-text prompts, or chat messages (rendered with ``add_generation_prompt=True``).
        answers: the reference final answers (``"42"``, ``"\\frac{1}{2}"``), one per prompt.
        pattern: a regex for the final answer in the completions (see :func:`extract_final_answer`).
        answer_match: ``"math"``, ``"numeric"`` or ``"exact"`` (see :func:`judge`).
        generate_kwargs: passed to ``model.generate``.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers.")
    if num_samples > 1:
        generate_kwargs = {"do_sample": True, "temperature": temperature, "top_p": top_p, **generate_kwargs}
    repeated = [prompt for prompt in prompts for _ in range(num_samples)]  # a problem's samples side by side
    with _seeded(seed, model.device):
        completions = generate_completions(
            model, tokenizer, repeated, batch_size, max_new_tokens, disable_tqdm, **generate_kwargs
        )
    rendered = [_render(tokenizer, prompt) for prompt in prompts]
    records = []
    for i, completion in enumerate(completions):
        index, sample = divmod(i, num_samples)
        verdict = judge(completion, answers[index], answer_match, pattern, ends_in_think(rendered[index]))
        records.append({"index": index, "sample": sample, "prompt": rendered[index], "completion": completion,
                        "extracted": verdict.extracted, "gold": answers[index],
                        "correct": verdict.correct})  # fmt: skip
    scored = [r["correct"] for r in records if r["correct"] is not None]
    skipped = len({r["index"] for r in records if r["correct"] is None})
    return AccuracyResult(sum(scored) / len(scored) if scored else float("nan"), records, skipped)


def write_generations(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """The records of an accuracy evaluation as JSON lines, written atomically (``round-XXX/eval.jsonl``)."""
    write_text_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


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
    """Prompts and reference final answers of the first ``limit`` rows of a held-out set (all when unset), for
    :func:`generation_accuracy`.

    Reads, per row:
        - the prompt: the ``prompt`` column (text or messages), else the ``messages`` up to the last assistant turn
          (all of them when there is none and the row has an ``answer``);
        - the reference: the ``answer`` column, else the ``completion`` column, else that last assistant turn; its
          final answer is extracted (``\\boxed{}``, ``####`` or ``pattern``) and the whole text is used when it
          states none (an ``answer`` column holding just ``"42"``).

    A row without a reference raises a ``ValueError`` naming the row and its columns.
    """
    columns = sorted(dataset.column_names)
    if "prompt" not in columns and "messages" not in columns:
        raise ValueError(f"eval data needs a 'prompt' or 'messages' column for generation accuracy, got {columns}.")
    rows = dataset.select(range(min(limit, len(dataset)))) if limit else dataset
    prompts, answers = [], []
    for index, row in enumerate(rows):
        reference = row.get("answer") if row.get("answer") is not None else row.get("completion")
        if "prompt" in row:
            prompt = row["prompt"]
        else:
            messages = row["messages"]
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
            prompt = messages if last is None else messages[:last]
            if reference is None and last is not None:
                reference = messages[last]["content"]
        text = None if reference is None else _text_of(reference).strip()
        if not text:
            raise ValueError(
                f"eval row {index} has no answer to score against (columns: {columns}): give every row an 'answer' "
                "(or a 'completion', or an assistant turn in 'messages')."
            )
        prompts.append(prompt)
        answers.append(extract_final_answer(text, pattern) or text)
    return prompts, answers


def check_eval_dataset(
    dataset: Dataset, limit: int, pattern: str | re.Pattern | None = None, answer_match: str = "math"
) -> int:
    """Check the rows an accuracy eval will score, before any model is loaded; return how many it will skip.

    A row without an answer raises (:func:`prompts_and_answers`). With ``answer_match="math"``, gold answers that
    math-verify cannot parse are counted and logged once as a warning, with the first of them: each eval leaves
    them out of ``eval_accuracy`` and reports their number as ``eval_skipped``.
    """
    _, answers = prompts_and_answers(dataset, limit, pattern)
    if answer_match != "math":
        return 0
    unparsed = [(i, gold) for i, gold in enumerate(answers) if not parse_answer(gold)]
    if unparsed:
        logger.warning(
            "%d of %d eval answers cannot be parsed by math-verify (first: row %d, %r); every eval skips them in "
            "eval_accuracy and counts them in eval_skipped (answer_match='numeric' or 'exact' compares text).",
            len(unparsed), len(answers), *unparsed[0],
        )  # fmt: skip
    return len(unparsed)


def loss_rows(dataset: Dataset, text_field: str = "text", formatting_func: Any = None) -> Dataset | None:
    """The eval rows TRL's SFTTrainer can compute a loss on, or ``None`` when no row has a target to score.

    SFT reads ``messages`` with an assistant turn, ``prompt`` + ``completion``, a ``text_field`` column, tokenized
    ``input_ids``, or any row through a ``formatting_func``; ``prompt`` + ``answer`` rows (an accuracy-only eval
    set) have no completion.
    """
    columns = set(dataset.column_names)
    if formatting_func is not None or {text_field, "input_ids"} & columns or {"prompt", "completion"} <= columns:
        return dataset  # text, tokenized rows, or prompt + completion: SFT scores every row
    chat = next((c for c in ("messages", "conversations") if c in columns), None)
    if chat is not None:
        rows = dataset.filter(lambda row: any(m["role"] == "assistant" for m in row[chat]))
        return rows if len(rows) else None
    return None
