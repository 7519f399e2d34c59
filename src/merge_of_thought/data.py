"""The teachers' data sets as SFT will read them, checked before any model is loaded.

:func:`prepare_teachers` is what :class:`~merge_of_thought.MoTTrainer` runs on them: every row is checked (a bad
row is named by teacher and index, with the columns it has), reasoning is rendered the way the student's chat
template expects (reasoning.py), traces whose ``<think>`` never closes are left out and counted, and each teacher's
token lengths are reported against ``max_length``, which TRL would otherwise cut silently.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, IterableDataset

from . import reasoning

logger = logging.getLogger(__name__)


def usable_format(column_names: Sequence[str], text_field: str = "text") -> str | None:
    """The SFT format TRL will read from these columns, or ``None`` if there is none."""
    columns = set(column_names)
    if "input_ids" in columns:
        return "tokenized"
    if "messages" in columns or "conversations" in columns:
        return "conversational"
    if {"prompt", "completion"} <= columns:
        return "prompt-completion"
    if text_field in columns:
        return "language-modeling"
    return None


def validate_teachers(
    teachers: Mapping[str, Dataset] | None,
    text_field: str = "text",
    formatting_func: Callable | None = None,
    allow_single_teacher: bool = False,
) -> None:
    """Raise a ValueError naming the teacher and the problem for anything SFT on it would trip over later."""
    if not isinstance(teachers, Mapping):
        raise TypeError(
            f"teachers must be a dict mapping a teacher name to its datasets.Dataset, got {type(teachers).__name__}."
        )
    if len(teachers) == 0:
        raise ValueError("teachers is empty: MoT needs one data set of reasoning traces per teacher.")
    if len(teachers) == 1 and not allow_single_teacher:
        name = next(iter(teachers))
        raise ValueError(
            f"Only one teacher ({name!r}) was given. MoT averages branches trained on different teachers; with one "
            "teacher every round is plain SFT with restarts. Pass at least 2 teachers, or set "
            "allow_single_teacher: true in the YAML (MoTConfig(allow_single_teacher=True) in Python) if that is what "
            "you want."
        )
    for name, dataset in teachers.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"teacher names must be non-empty strings, got {name!r}.")
        if isinstance(dataset, IterableDataset):
            raise TypeError(
                f"teacher {name!r}: IterableDataset is not supported; MoT re-reads each teacher's data every round. "
                "Materialise it with Dataset.from_generator or load it without streaming."
            )
        if not isinstance(dataset, Dataset):
            raise TypeError(f"teacher {name!r}: expected a datasets.Dataset, got {type(dataset).__name__}.")
        if len(dataset) == 0:
            raise ValueError(f"teacher {name!r}: its data set is empty.")
        if formatting_func is None and usable_format(dataset.column_names, text_field) is None:
            raise ValueError(
                f"teacher {name!r}: no usable column among {dataset.column_names}. Expected 'messages' "
                f"(conversational), 'prompt' and 'completion', or {text_field!r} (plain text), or pass a "
                "formatting_func."
            )


def check_chat_format(
    teachers: Mapping[str, Dataset],
    tokenizer: Any,
    assistant_only_loss: bool = False,
    chat_template_path: str | None = None,
    formatting_func: Callable | None = None,
) -> None:
    """Fail before the model loads where TRL's SFTTrainer would fail in the first branch or evaluation.

    Conversational teachers need a chat template; ``assistant_only_loss`` needs conversational teachers and a
    template with ``{% generation %}`` markers, or one TRL knows a training version of
    (``trl.chat_template_utils.get_training_chat_template``).
    """
    if formatting_func is not None:  # TRL formats the rows first; what comes out is not known before it runs
        return
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers
    from trl.data_utils import is_conversational

    chat = [name for name, dataset in teachers.items() if is_conversational(dataset[0])]
    if assistant_only_loss and len(chat) < len(teachers):
        other = next(name for name in teachers if name not in chat)
        raise ValueError(
            f"assistant_only_loss=True needs conversational data ('messages'), but teacher {other!r} has the columns "
            f"{teachers[other].column_names}. For prompt/completion data use completion_only_loss instead."
        )
    if not chat:
        return
    if chat_template_path is not None and not _is_template_file(chat_template_path):
        return  # TRL clones the template of another tokenizer into the model: known only once it is loaded
    template = chat_template_of(tokenizer, chat_template_path)
    name = tokenizer_name(tokenizer)
    if template is None:
        raise ValueError(
            f"teacher {chat[0]!r} is conversational ('messages'), but the tokenizer of {name!r} has no chat "
            "template. Set chat_template_path (a .jinja file, or a tokenizer to copy the template from) or pass a "
            "processing_class that has one."
        )
    if not assistant_only_loss or has_generation_markers(template):
        return
    patched = copy.copy(tokenizer)  # TRL reads the template off the tokenizer; the user's stays as it is
    patched.chat_template = template
    try:
        get_training_chat_template(patched)
    except ValueError:
        raise ValueError(
            f"assistant_only_loss=True: the chat template of {name!r} has no {{% generation %}} markers, and TRL "
            "has no training version of it, so TRL could not tell the assistant's tokens from the rest. Mark the "
            "assistant's content with {% generation %}...{% endgeneration %} in a copy of the template and pass it "
            "as chat_template_path (see https://huggingface.co/docs/trl/chat_templates), or set "
            "assistant_only_loss=False."
        ) from None


def _is_template_file(path: str | os.PathLike) -> bool:
    return str(path).endswith((".jinja", ".j2"))


def chat_template_of(tokenizer: Any, chat_template_path: str | None = None) -> str | None:
    """The chat template TRL will render conversations with: ``chat_template_path`` (a .jinja file, or a tokenizer
    whose template TRL copies) over the tokenizer's own."""
    if chat_template_path is None:
        return getattr(tokenizer, "chat_template", None)
    if _is_template_file(chat_template_path):
        return Path(chat_template_path).read_text(encoding="utf-8")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chat_template_path).chat_template


def tokenizer_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def normalized_weights(
    teacher_names: Sequence[str], weights: Mapping[str, float] | Sequence[float] | None
) -> list[float]:
    """Per-teacher merge weights in teacher order: uniform by default, else exactly the user's (summing to 1)."""
    if weights is None:
        return [1.0 / len(teacher_names)] * len(teacher_names)
    if isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(teacher_names))
        missing = sorted(set(teacher_names) - set(weights))
        if unknown or missing:
            raise ValueError(
                f"teacher_weights must name exactly the teachers {list(teacher_names)}; "
                f"unknown: {unknown}, missing: {missing}."
            )
        values = [float(weights[name]) for name in teacher_names]
    else:
        values = [float(w) for w in weights]
        if len(values) != len(teacher_names):
            raise ValueError(
                f"teacher_weights has {len(values)} values for {len(teacher_names)} teachers {list(teacher_names)}."
            )
    if any(not math.isfinite(w) or w < 0 for w in values):
        raise ValueError(f"teacher_weights must be finite and non-negative, got {values}.")
    if not math.isclose(sum(values), 1.0, rel_tol=0, abs_tol=1e-6):
        raise ValueError(f"teacher_weights must sum to 1, got {values} (sum {sum(values):.6g}).")
    return values


def conversation_column(dataset: Dataset, text_field: str = "text") -> str | None:
    """The column of chat messages TRL renders with the chat template: ``messages``/``conversations``, or a
    conversational ``completion`` (a list of messages); ``None`` for plain-text data."""
    columns = dataset.column_names
    for column in ("messages", "conversations"):
        if column in columns:
            return column
    if usable_format(columns, text_field) == "prompt-completion":
        first = next((c for c in dataset["completion"] if c is not None), None)
        return "completion" if isinstance(first, list) else None
    return None


def check_rows(name: str, dataset: Dataset, text_field: str = "text") -> None:
    """Every row holds what its data set's SFT format needs; else a ValueError naming the teacher, the row and the
    columns it has (TRL would fail on it mid-run, after the model loaded and earlier branches trained)."""
    kind = usable_format(dataset.column_names, text_field)
    needed = {
        "tokenized": ["input_ids"],
        "conversational": [conversation_column(dataset, text_field)],
        "prompt-completion": ["prompt", "completion"],
        "language-modeling": [text_field],
    }[kind]
    for column in needed:
        for index, value in enumerate(dataset[column]):
            problem = _value_problem(column, value, conversational=kind == "conversational")
            if problem:
                present = [c for c, v in dataset[index].items() if v not in (None, "", [])]
                raise ValueError(
                    f"teacher {name!r}, row {index}: {problem} (this data set is {kind}); the row has the columns "
                    f"{present}."
                )


def _value_problem(column: str, value: Any, conversational: bool) -> str | None:
    if value is None or (isinstance(value, (str, list)) and len(value) == 0):
        return f"no {column!r}"
    if not conversational:
        return None
    if not isinstance(value, list) or not all(isinstance(m, dict) and m.get("role") for m in value):
        return f"{column!r} is not a list of messages with a 'role'"
    if not any(m["role"] == "assistant" and (m.get("content") or reasoning.message_reasoning(m)[0]) for m in value):
        return f"{column!r} has no assistant message with content"
    return None


def unclosed_think_rows(dataset: Dataset, text_field: str = "text") -> list[int]:
    """Rows whose trace opens ``<think>`` and never closes it (a teacher cut off mid-thought): no final answer."""
    column = conversation_column(dataset, text_field)
    if column is not None:
        return [i for i, messages in enumerate(dataset[column]) if any(
            m.get("role") == "assistant" and not reasoning.message_reasoning(m)[2] for m in messages)]  # fmt: skip
    kind = usable_format(dataset.column_names, text_field)
    if kind == "prompt-completion":
        texts = [f"{p}{c}" for p, c in zip(dataset["prompt"], dataset["completion"])]
    elif kind == "language-modeling":
        texts = dataset[text_field]
    else:
        return []
    return [i for i, text in enumerate(texts) if not reasoning.split_think(text)[2]]


def render_teacher_reasoning(
    name: str, dataset: Dataset, tokenizer: Any, template: str | None, text_field: str = "text"
) -> Dataset:
    """The teacher's conversations with their reasoning in the form the chat template renders; a ValueError if the
    template drops reasoning these traces carry."""
    column = conversation_column(dataset, text_field)
    if column is None:
        return dataset
    first = next((i for i, messages in enumerate(dataset[column]) if reasoning.has_reasoning(messages)), None)
    if first is None:
        return dataset
    style = reasoning.reasoning_style(tokenizer, template)
    if style is None:
        raise ValueError(
            f"teacher {name!r}: its traces carry reasoning (row {first}), but the chat template of "
            f"{tokenizer_name(tokenizer)!r} drops it (as DeepSeek-R1-Distill's does: it keeps only the text after "
            "</think>), so the student would be trained without its chain of thought. Set chat_template_path to a "
            "template that renders reasoning (in the content, or from 'reasoning_content'), e.g. a copy of this one "
            "without that split."
        )
    return reasoning.render_reasoning(dataset, column, style, f"teacher {name!r}")


@dataclass
class LengthStats:
    """One teacher's trace lengths in tokens of the student's tokenizer, and how many ``max_length`` cuts."""

    teacher: str
    rows: int
    median: int
    p95: int
    longest: int
    cut: int

    @property
    def cut_fraction(self) -> float:
        return self.cut / self.rows if self.rows else 0.0


def token_lengths(dataset: Dataset, tokenizer: Any, template: str | None, text_field: str = "text") -> list[int]:
    """Each row's length in tokens as SFT sees it: the conversation rendered through the chat template, or the
    prompt, completion or text plus the EOS token TRL appends."""
    kind = usable_format(dataset.column_names, text_field)
    if kind == "tokenized":
        return [len(ids) for ids in dataset["input_ids"]]
    column = conversation_column(dataset, text_field)
    if kind == "conversational":
        texts = [tokenizer.apply_chat_template(m, tokenize=False, chat_template=template) for m in dataset[column]]
    elif column == "completion":  # conversational prompt + completion
        texts = [tokenizer.apply_chat_template(p + c, tokenize=False, chat_template=template)
                 for p, c in zip(dataset["prompt"], dataset["completion"])]  # fmt: skip
    elif kind == "prompt-completion":
        texts = [f"{p}{c}" for p, c in zip(dataset["prompt"], dataset["completion"])]
    else:
        texts = dataset[text_field]
    rendered = column is not None  # a chat template writes its own special tokens
    lengths = []
    for start in range(0, len(texts), 256):
        ids = tokenizer(texts[start : start + 256], add_special_tokens=not rendered)["input_ids"]
        lengths += [len(i) + (0 if rendered else 1) for i in ids]
    return lengths


def length_stats(name: str, lengths: Sequence[int], max_length: int | None) -> LengthStats:
    ordered = sorted(lengths)
    at = lambda q: ordered[max(math.ceil(q * len(ordered)) - 1, 0)]  # noqa: E731 - the length keeping a share q
    cut = sum(n > max_length for n in ordered) if max_length is not None else 0
    return LengthStats(name, len(ordered), at(0.5), at(0.95), ordered[-1], cut)


def format_length_report(stats: Sequence[LengthStats], max_length: int | None) -> str:
    """A table of every teacher's lengths against ``max_length``, for the log and ``mot train --dry_run``."""
    limit = "no max_length" if max_length is None else f"max_length={max_length}"
    width = max([len("teacher"), *(len(s.teacher) for s in stats)])
    lines = [f"Trace lengths in tokens of the student's tokenizer ({limit}):",
             f"  {'teacher':<{width}}  {'rows':>6}  {'median':>7}  {'p95':>7}  {'longest':>7}  cut by max_length"]
    for s in stats:
        lines.append(f"  {s.teacher:<{width}}  {s.rows:>6}  {s.median:>7}  {s.p95:>7}  {s.longest:>7}  "
                     f"{s.cut} ({s.cut_fraction:.0%})")  # fmt: skip
    lines.append(f"  max_length that keeps 95% of every teacher's traces: {max(s.p95 for s in stats)}; "
                 f"all of them: {max(s.longest for s in stats)}")  # fmt: skip
    return "\n".join(lines)


def check_lengths(stats: Sequence[LengthStats], max_length: int | None, max_truncated_fraction: float) -> None:
    """Refuse a run in which ``max_length`` would cut more than ``max_truncated_fraction`` of a teacher's traces."""
    for s in stats:
        if max_length is not None and s.cut_fraction > max_truncated_fraction:
            raise ValueError(
                f"teacher {s.teacher!r}: {s.cut} of {s.rows} traces ({s.cut_fraction:.0%}) are longer than "
                f"max_length={max_length} tokens and TRL would cut them (median {s.median}, p95 {s.p95}, longest "
                f"{s.longest} tokens). Set max_length to {s.p95} (keeps 95%) or {s.longest} (keeps all), or allow "
                f"the cut with max_truncated_fraction={math.ceil(s.cut_fraction * 100) / 100:.2f} or more."
            )


def prepare_teachers(
    teachers: Mapping[str, Dataset],
    tokenizer: Any,
    args: Any,
    formatting_func: Callable | None = None,
) -> tuple[dict[str, Dataset], list[LengthStats]]:
    """The teachers' data sets as the branches will train on them, checked row by row, with their length report.

    ``args``: the run's MoTConfig (``dataset_text_field``, ``chat_template_path``, ``max_length``,
    ``max_truncated_fraction``). With a ``formatting_func`` the rows are only known once TRL formats them, so they
    are passed through unchecked.
    """
    if formatting_func is not None:
        return dict(teachers), []
    text_field, template = args.dataset_text_field, None
    prepared: dict[str, Dataset] = {}
    stats = []
    for name, dataset in teachers.items():
        check_rows(name, dataset, text_field)
        unclosed = unclosed_think_rows(dataset, text_field)
        if len(unclosed) == len(dataset):
            raise ValueError(
                f"teacher {name!r}: every trace opens <think> and never closes it (row 0 first), so none has a final "
                "answer to learn. Check that the traces were not cut off, or strip the tags."
            )
        if unclosed:
            logger.warning(
                "teacher %r: %d of %d traces open <think> and never close it (rows %s): left out of training (a trace "
                "cut off mid-thought has no answer to learn).", name, len(unclosed), len(dataset),
                ", ".join(map(str, unclosed[:5])) + (", ..." if len(unclosed) > 5 else ""),
            )  # fmt: skip
            dropped = set(unclosed)
            dataset = dataset.select([i for i in range(len(dataset)) if i not in dropped])
        if conversation_column(dataset, text_field) is not None and template is None:
            template = chat_template_of(tokenizer, args.chat_template_path)
        dataset = render_teacher_reasoning(name, dataset, tokenizer, template, text_field)
        stats.append(length_stats(name, token_lengths(dataset, tokenizer, template, text_field), args.max_length))
        prepared[name] = dataset
    logger.info("%s", format_length_report(stats, args.max_length))
    check_lengths(stats, args.max_length, args.max_truncated_fraction)
    return prepared, stats
