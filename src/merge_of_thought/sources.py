"""Teachers and held-out problems from the data sets people have, as TRL's data set specs describe them.

Three shapes of teacher data exist on the Hub, and a ``teachers:`` entry (:class:`TeacherConfig`) reads each:

* one data set per teacher, in a format SFTTrainer reads (``messages``, ``prompt`` + ``completion``, text);
* several teachers in ONE data set, told apart by a column (``nvidia/OpenMathReasoning``'s ``generation_model``):
  ``where: {generation_model: QwQ-32B}`` takes one teacher's rows, ``split_by: generation_model`` makes one teacher
  per distinct value;
* teachers in columns of the same rows (``simplescaling/s1K-1.1``: ``question``, then
  ``deepseek_thinking_trajectory`` + ``deepseek_attempt`` and ``gemini_thinking_trajectory`` + ``gemini_attempt``):
  ``prompt_column``, ``reasoning_column`` and ``completion_column`` build one conversation per row (user = the
  question, assistant = the answer with its reasoning in ``reasoning_content``), rendered later through the
  student's chat template the way that template expects (reasoning.py).

Held-out problems (:class:`EvalSetConfig`) become ``prompt`` + ``answer`` rows the same way (MATH-500:
``prompt_column: problem``, ``answer_column: answer``). Every mistake is named before the model loads: a column
that does not exist (with the columns there are), a value that selects no rows (with the values there are), a row
that breaks the mapping (with its index and the columns it has).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from datasets import Dataset, Features, List, Value
from trl.scripts.utils import DatasetConfig

from .reasoning import REASONING_KEYS

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
MESSAGES = List({"role": Value("string"), "content": Value("string"), **dict.fromkeys(REASONING_KEYS, Value("string"))})
"""The schema of the conversations MoT builds: a message's reasoning keys are strings, None where absent."""


@dataclass
class TeacherConfig(DatasetConfig):
    """One ``teachers:`` entry: a data set spec as in TRL's ``datasets:``, plus the teacher's name, merge weight,
    which rows are this teacher's (``where``, ``split_by``) and which columns hold its traces."""

    teacher: str | None = None
    weight: float | None = None
    where: dict[str, Any] | None = None
    split_by: str | None = None
    prompt_column: str | None = None
    reasoning_column: str | None = None
    completion_column: str | None = None


@dataclass
class EvalSetConfig(DatasetConfig):
    """The ``eval_dataset:`` spec: held-out problems, optionally mapped from a question and an answer column."""

    where: dict[str, Any] | None = None
    prompt_column: str | None = None
    answer_column: str | None = None


def teacher_name(spec: Any) -> str:
    """A readable teacher name for a data set spec: its ``teacher`` field if set, else the data file's stem
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
    """One data set spec (path, name, data_files, split, columns) through TRL's own loader, alone."""
    from trl import DatasetMixtureConfig, get_dataset

    plain = DatasetConfig(**{key: getattr(spec, key) for key in DatasetConfig.__dataclass_fields__})
    return get_dataset(DatasetMixtureConfig(datasets=[plain], streaming=streaming))["train"]


def load_teachers(specs: Any, spec_of: dict[str, Any] | None = None) -> dict[str, Dataset]:
    """Load each data set spec as one teacher, or as one per distinct value of its ``split_by`` column.

    ``specs``: TRL's ``DatasetMixtureConfig`` (its ``datasets:`` entries) or a list of ``DatasetConfig`` /
    :class:`TeacherConfig`. Data sets are never concatenated. Names come from :func:`teacher_name` (``split_by``:
    the column's values); repeated names get ``-2``, ``-3``, ... ``spec_of``, if given, receives each teacher's spec.
    """
    streaming = getattr(specs, "streaming", False)
    specs = list(getattr(specs, "datasets", specs))
    if not specs:
        raise ValueError("No teacher data sets: give one `datasets:`/`teachers:` entry per teacher.")
    teachers: dict[str, Dataset] = {}
    for spec in specs:
        label = teacher_name(spec)
        try:
            dataset = load_spec(spec, streaming)
            if spec.data_files or spec.path in ("json", "csv", "text"):  # raw text files; Arrow-written data is UTF-8
                check_text_encoding(dataset)
        except StopIteration:  # datasets' JSON and CSV builders read the first rows of a file that has none
            raise ValueError(f"teacher {label!r}: its data set is empty ({_where(spec)} has no rows).") from None
        except Exception as error:
            if not _is_encoding_error(error):
                raise
            raise ValueError(
                f"teacher {label!r}: {_where(spec)} is not UTF-8 text ({_root(error)}); convert it, e.g. "
                "`iconv -f latin1 -t utf-8 in.jsonl > out.jsonl`."
            ) from None
        for name, part in teacher_parts(dataset, spec, label).items():
            unique, n = name, 1
            while unique in teachers:
                n += 1
                unique = f"{name}-{n}"
            teachers[unique] = part
            if spec_of is not None:
                spec_of[unique] = spec
    return teachers


def check_text_encoding(dataset: Dataset) -> None:
    """Raise where a loaded file's text is not valid UTF-8: Arrow's JSON reader keeps such bytes, and reading the
    rows would fail later, in the middle of a check or a branch, without naming the file."""
    import pyarrow as pa

    table = getattr(dataset.data, "table", None)
    if isinstance(table, pa.Table):
        try:
            table.validate(full=True)
        except pa.ArrowInvalid as error:
            if "UTF8" not in str(error):
                raise
            raise UnicodeDecodeError("utf-8", b"", 0, 1, str(error)) from None


def _is_encoding_error(error: BaseException | None) -> bool:
    while error is not None:
        if isinstance(error, UnicodeDecodeError) or "Invalid UTF8" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _root(error: BaseException) -> str:
    while error.__cause__ or error.__context__:
        error = error.__cause__ or error.__context__
    return str(error)


def teacher_parts(dataset: Dataset, spec: Any, label: str) -> dict[str, Dataset]:
    """The teacher(s) one spec holds: its rows (``where``), one part per ``split_by`` value, each mapped to
    conversations when the spec names its columns."""
    dataset = select_rows(dataset, getattr(spec, "where", None), f"teacher {label!r}")
    split_by = getattr(spec, "split_by", None)
    if split_by:
        parts = {safe_name(value): part for value, part in split_rows(dataset, split_by, f"teacher {label!r}").items()}
    else:
        parts = {label: dataset}
    columns = {key: getattr(spec, key, None) for key in ("prompt_column", "reasoning_column", "completion_column")}
    if not any(columns.values()):
        return parts
    return {name: conversations_from_columns(part, **columns, label=f"teacher {name!r}")
            for name, part in parts.items()}  # fmt: skip


def load_eval_set(spec: Any) -> Dataset:
    """The held-out problems of an ``eval_dataset:`` spec, as ``prompt`` + ``answer`` rows when it maps columns."""
    dataset = select_rows(load_spec(spec), getattr(spec, "where", None), "eval_dataset")
    prompt_column, answer_column = getattr(spec, "prompt_column", None), getattr(spec, "answer_column", None)
    if prompt_column is None and answer_column is None:
        return dataset
    return eval_rows(dataset, prompt_column or "prompt", answer_column or "answer")


def require_columns(dataset: Dataset, columns: Iterable[str | None], label: str) -> None:
    """A ValueError naming the columns that do not exist and the ones that do."""
    missing = [c for c in columns if c is not None and c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{label}: no column {', '.join(map(repr, missing))} in its data set; its columns are "
            f"{dataset.column_names}."
        )


def select_rows(dataset: Dataset, where: Mapping[str, Any] | None, label: str) -> Dataset:
    """The rows whose columns hold the given values (``{column: value or [values]}``), all of them when unset."""
    if not where:
        return dataset
    if not isinstance(where, Mapping):
        raise ValueError(f"{label}: 'where' must map a column to a value or a list of values, got {where!r}.")
    require_columns(dataset, where, label)
    wanted = {column: set(v) if isinstance(v, (list, tuple, set)) else {v} for column, v in where.items()}
    kept = dataset.filter(
        lambda *values: [all(v in wanted[c] for c, v in zip(wanted, row)) for row in zip(*values)],
        input_columns=list(wanted),
        batched=True,
        desc=f"Selecting the rows of {label}",
    )
    if len(kept) == 0:
        present = {column: _common_values(dataset, column) for column in wanted}
        raise ValueError(
            f"{label}: no row has {dict(where)}; the values there are "
            + "; ".join(f"{column}: {values}" for column, values in present.items())
            + "."
        )
    return kept


def split_rows(dataset: Dataset, column: str, label: str) -> dict[Any, Dataset]:
    """One data set per distinct value of ``column``, in order of first appearance (``split_by``)."""
    require_columns(dataset, [column], label)
    values = list(dict.fromkeys(dataset[column]))
    if None in values:
        row = dataset[column].index(None)
        raise ValueError(f"{label}: row {row} has no {column!r} value, so split_by cannot name its teacher.")
    return {
        value: dataset.filter(lambda v, value=value: [x == value for x in v], input_columns=[column], batched=True,
                              desc=f"Selecting {column} = {value}")
        for value in values
    }  # fmt: skip


def safe_name(value: Any) -> str:
    """A teacher name from a column value, usable as a folder name (``Qwen/QwQ-32B`` -> ``Qwen-QwQ-32B``)."""
    return _UNSAFE_NAME.sub("-", str(value)).strip("-") or "teacher"


def conversations_from_columns(
    dataset: Dataset,
    prompt_column: str | None,
    reasoning_column: str | None,
    completion_column: str | None,
    label: str,
) -> Dataset:
    """One ``messages`` conversation per row: the user asks ``prompt_column``; the assistant answers with
    ``completion_column`` and, if given, its reasoning from ``reasoning_column`` (as ``reasoning_content``, which
    reasoning.py renders the way the student's chat template expects)."""
    if prompt_column is None or completion_column is None:
        named = "reasoning_column" if reasoning_column else "prompt_column or completion_column"
        raise ValueError(
            f"{label}: {named} needs both prompt_column (the question) and completion_column (the teacher's answer);"
            " reasoning_column is optional."
        )
    columns = [prompt_column, reasoning_column, completion_column]
    require_columns(dataset, columns, label)
    _require_text(dataset, [c for c in columns if c], label)

    def conversation(row: dict[str, Any]) -> dict[str, Any]:
        reasoning = row[reasoning_column] if reasoning_column else None
        return {"messages": [message("user", row[prompt_column]), message("assistant", row[completion_column],
                                                                          reasoning)]}  # fmt: skip

    return dataset.map(conversation, remove_columns=dataset.column_names, features=Features({"messages": MESSAGES}),
                       desc=f"Conversations of {label}")  # fmt: skip


def message(role: str, content: str, reasoning: str | None = None) -> dict[str, Any]:
    """One chat message with every reasoning key (None where absent), so all rows share the :data:`MESSAGES` schema."""
    return {"role": role, "content": content, **{key: None for key in REASONING_KEYS}, "reasoning_content": reasoning}


def eval_rows(dataset: Dataset, prompt_column: str, answer_column: str, label: str = "eval_dataset") -> Dataset:
    """``prompt`` (one user message) + ``answer`` rows from a question and a reference answer column."""
    require_columns(dataset, [prompt_column, answer_column], label)
    _require_text(dataset, [prompt_column, answer_column], label)
    return dataset.map(
        lambda row: {"prompt": [{"role": "user", "content": row[prompt_column]}], "answer": str(row[answer_column])},
        remove_columns=dataset.column_names,
        desc=f"Problems of {label}",
    )


def _require_text(dataset: Dataset, columns: list[str], label: str) -> None:
    """Every row holds a non-empty value in each column, else a ValueError naming the first row that does not."""
    for column in columns:
        for index, value in enumerate(dataset[column]):
            if value is None or (isinstance(value, str) and not value.strip()):
                row = dataset[index]
                present = [c for c, v in row.items() if v not in (None, "")]
                raise ValueError(
                    f"{label}, row {index}: {column!r} is {'empty' if value == '' else 'missing'}; the row has the "
                    f"columns {present}."
                )


def _common_values(dataset: Dataset, column: str, limit: int = 10) -> str:
    counts = Counter(map(str, dataset[column]))
    shown = ", ".join(f"{value!r} ({n})" for value, n in counts.most_common(limit))
    return shown + (f", ... ({len(counts) - limit} more)" if len(counts) > limit else "")


def _where(spec: Any) -> str:
    return f"data_files={spec.data_files!r}" if spec.data_files else f"path={spec.path!r}"
