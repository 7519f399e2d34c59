"""The teachers' data sets: loading one branch per data set spec, and checks made before any model is loaded."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

from datasets import Dataset, IterableDataset


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
            "MoTConfig(allow_single_teacher=True) if that is what you want."
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
    template = getattr(tokenizer, "chat_template", None)
    if chat_template_path is not None:
        if not str(chat_template_path).endswith((".jinja", ".j2")):
            return  # TRL clones the template of another tokenizer into the model: known only once it is loaded
        template = Path(chat_template_path).read_text(encoding="utf-8")
    name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
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


def teacher_name(spec: Any) -> str:
    """A readable teacher name for a TRL ``DatasetConfig``: its ``teacher`` field if set, else the data file's stem
    (``path: json, data_files: traces/r1.jsonl`` -> ``r1``) or the Hub id's last part and config name."""
    explicit = getattr(spec, "teacher", None)
    if explicit:
        return explicit
    files = spec.data_files
    if isinstance(files, dict):
        files = next(iter(files.values()), None)
    if isinstance(files, (list, tuple)):
        files = files[0] if len(files) == 1 else None
    if isinstance(files, str):
        return PurePath(files).name.split(".")[0]
    name = str(spec.path).rstrip("/").split("/")[-1]
    return f"{name}-{spec.name}" if spec.name else name


def load_spec(spec: Any, streaming: bool = False) -> Dataset:
    """One TRL ``DatasetConfig`` (path, name, data_files, split, columns) through TRL's own loader, alone."""
    from trl import DatasetMixtureConfig, get_dataset

    return get_dataset(DatasetMixtureConfig(datasets=[spec], streaming=streaming))["train"]


def load_teachers(specs: Any) -> dict[str, Dataset]:
    """Load each data set spec as its own teacher (never concatenated), through TRL's loader.

    ``specs``: TRL's ``DatasetMixtureConfig`` (its ``datasets:`` entries, as TRL's scripts take them) or a list of
    ``DatasetConfig``. Names come from :func:`teacher_name`; repeated names get ``-2``, ``-3``, ...
    """
    streaming = getattr(specs, "streaming", False)
    specs = list(getattr(specs, "datasets", specs))
    if not specs:
        raise ValueError("No teacher data sets: give one `datasets:`/`teachers:` entry per teacher.")
    teachers: dict[str, Dataset] = {}
    for spec in specs:
        name, n = teacher_name(spec), 1
        while name in teachers:
            n += 1
            name = f"{teacher_name(spec)}-{n}"
        try:
            teachers[name] = load_spec(spec, streaming)
        except StopIteration:  # datasets' JSON and CSV builders read the first rows of a file that has none
            raise ValueError(f"teacher {name!r}: its data set is empty ({_where(spec)} has no rows).") from None
    return teachers


def _where(spec: Any) -> str:
    return f"data_files={spec.data_files!r}" if spec.data_files else f"path={spec.path!r}"
