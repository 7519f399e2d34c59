"""Where a MoT run's curves go: one TensorBoard folder per branch, and per-round metrics through ``report_to``.

Every branch is a separate SFT run of ``max_steps`` steps, so left alone all branches would write the same step
numbers into the same TensorBoard folder. Instead (``<root>`` is ``$TENSORBOARD_LOGGING_DIR`` or
``<output_dir>/runs``)::

    <root>/round-001/<teacher>/   the branch's per-step curves (loss, learning_rate, ...), from transformers, at
                                  the run's global SFT step (the steps of every branch before it plus its own), so
                                  the branches' loss curves follow each other through the whole run
    <root>/mot/                   one point per round: eval/loss, eval/accuracy, merge statistics,
                                  <teacher>/train_loss of each branch and <teacher>/merge_weight (round 0 is
                                  the starting student)

Other integrations (W&B, MLflow, trackio, ...) get the same calls from transformers' own callbacks: each branch
runs under ``run_name = "round<t>/<teacher>"`` and the per-round metrics are logged with ``step = round``.
``metrics.jsonl`` stays the machine-readable record of everything; :func:`rounds_table` prints its rounds for a
person (``mot train`` ends with it; ``mot demo`` prints its rows with the same :class:`Table`).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments
from transformers.integrations import TensorBoardCallback, get_reporting_integration_callbacks

from .callbacks import MoTCallback

if TYPE_CHECKING:
    from .mot_trainer import MoTTrainer


def logging_root(args: TrainingArguments) -> Path:
    """The TensorBoard root of the run: ``$TENSORBOARD_LOGGING_DIR`` (as transformers reads it) or output_dir/runs."""
    env = os.getenv("TENSORBOARD_LOGGING_DIR")
    return Path(env).expanduser() if env else Path(args.output_dir) / "runs"


class GlobalStepTensorBoard(TensorBoardCallback):
    """transformers' TensorBoard callback, logging a branch's step ``s`` at ``steps_before + s``."""

    def __init__(self, steps_before: int = 0):
        super().__init__()
        self.steps_before = steps_before

    def on_log(self, args, state, control, logs=None, **kwargs):
        state = copy.copy(state)
        state.global_step += self.steps_before
        super().on_log(args, state, control, logs=logs, **kwargs)


def route_branch_logs(trainer: Trainer, folder: Path, steps_before: int = 0) -> None:
    """Point the branch trainer's TensorBoard callbacks (made from report_to or passed by the user without a writer)
    at ``folder``, logging at the run's global step: ``steps_before`` (every earlier branch's) plus the branch's."""
    callbacks = trainer.callback_handler.callbacks
    for i, callback in enumerate(callbacks):
        if isinstance(callback, TensorBoardCallback) and callback.tb_writer is None:
            callbacks[i] = GlobalStepTensorBoard(steps_before)  # a new one per branch: the user's stays as given
            callbacks[i].logging_dir = str(folder)


def _numbers(metrics: Mapping[str, Any], skip: tuple[str, ...] = ()) -> dict[str, float]:
    return {
        k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in skip
    }


class RoundReporter(MoTCallback):
    """Logs one point per round to the ``report_to`` integrations, through transformers' own callbacks."""

    def __init__(self, args: TrainingArguments, folder: Path, is_main: bool = True):
        self.args, self.folder = args, folder
        self.integrations: list = []
        self.state = TrainerState(is_world_process_zero=is_main)
        self.control = TrainerControl()
        self.branch_metrics: dict[str, float] = {}

    def on_train_begin(self, trainer: MoTTrainer) -> None:
        self.integrations = [cls() for cls in get_reporting_integration_callbacks(self.args.report_to)]
        for callback in self.integrations:
            if isinstance(callback, TensorBoardCallback):
                callback.logging_dir = str(self.folder)
            callback.on_train_begin(self.args, self.state, self.control, model=trainer.model)

    def on_branch_end(self, trainer: MoTTrainer, round_idx: int, teacher: str, metrics: Mapping[str, Any]) -> None:
        numbers = _numbers(metrics, skip=("round", "steps"))
        self.branch_metrics.update({f"{teacher}/{key}": value for key, value in numbers.items()})

    def on_evaluate(self, trainer: MoTTrainer, round_idx: int, metrics: Mapping[str, Any]) -> None:
        self._log(round_idx, _numbers(metrics))

    def on_round_end(self, trainer: MoTTrainer, round_idx: int, metrics: Mapping[str, Any]) -> None:
        logs = _numbers(metrics, skip=("round",) + tuple(k for k in metrics if k.startswith("eval_")))
        weights = {f"{teacher}/merge_weight": w for teacher, w in metrics.get("merge_weights", {}).items()}
        self._log(round_idx, {**logs, **self.branch_metrics, **weights})
        self.branch_metrics = {}

    def on_train_end(self, trainer: MoTTrainer, rounds: list[dict[str, Any]]) -> None:
        for callback in self.integrations:
            callback.on_train_end(self.args, self.state, self.control, model=trainer.model)
        self.integrations = []

    def _log(self, round_idx: int, logs: dict[str, float]) -> None:
        if not logs:
            return
        self.state.global_step = round_idx
        self.state.log_history.append({**logs, "step": round_idx})
        for callback in self.integrations:
            callback.on_log(self.args, self.state, self.control, logs=dict(logs))


@dataclass(frozen=True)
class Column:
    """A table column: its title, the record key it shows, and the format of a value."""

    title: str
    key: str
    format: str = "{}"


class Table:
    """A fixed-width text table, printed row by row (``mot demo``) or at once (:func:`rounds_table`)."""

    def __init__(self, columns: Sequence[Column]):
        self.columns = list(columns)

    def header(self) -> str:
        return "  " + "  ".join(column.title for column in self.columns)

    def row(self, record: Mapping[str, Any]) -> str:
        """One line; a value the record lacks (or a NaN) shows as ``-``."""
        cells = []
        for column in self.columns:
            value = record.get(column.key)
            missing = value is None or (isinstance(value, float) and math.isnan(value))
            cells.append(("-" if missing else column.format.format(value)).rjust(len(column.title)))
        return "  " + "  ".join(cells)

    def render(self, records: Iterable[Mapping[str, Any]]) -> str:
        return "\n".join([self.header(), *(self.row(record) for record in records)])


ROUND_COLUMNS = (
    Column("round", "round", "{:d}"),
    Column("eval loss", "eval_loss", "{:.4f}"),
    Column("accuracy", "eval_accuracy", "{:.3f}"),
    Column("skipped", "eval_skipped", "{:d}"),
    Column("merge rank", "merge_rank", "{:d}"),
    Column("merge s", "merge_seconds", "{:.1f}"),
)


def rounds_table(records: Iterable[Mapping[str, Any]]) -> str:
    """The run's rounds (metrics.jsonl's ``round`` records; round 0 is the starting student) as a table, with the
    columns some round has; a round recorded twice (a resumed run) shows its last record."""
    rounds = {r["round"]: r for r in records if r.get("type", "round") == "round"}
    ordered = [rounds[k] for k in sorted(rounds)]
    return Table([c for c in ROUND_COLUMNS if any(c.key in r for r in ordered)]).render(ordered)
