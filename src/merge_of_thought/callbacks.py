"""Hooks into a Merge-of-Thought run, beside transformers' per-step callbacks.

:class:`MoTTrainer` takes one ``callbacks`` list and sorts it by type: every
:class:`~transformers.TrainerCallback` goes to the SFTTrainer of every branch (per-step events, as in TRL), and every
:class:`MoTCallback` receives the events of the MoT loop itself::

    on_train_begin
    on_evaluate(round_idx=0)               # the starting student, when evaluation is configured
    for each round:
        on_round_begin
        for each teacher: on_branch_begin, (SFT steps), on_branch_end
        after_merge                        # the student now includes this round's merged delta
        on_evaluate                        # when evaluation is configured
        on_round_end
    on_train_end

Example, stopping early once the merged student is good enough::

    class StopAtAccuracy(MoTCallback):
        def on_evaluate(self, trainer, round_idx, metrics):
            if metrics.get("eval_accuracy", 0) >= 0.9:
                trainer.should_stop = True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

if TYPE_CHECKING:
    from .mot_trainer import MoTTrainer


class MoTCallback:
    """Base class for MoT-level hooks; override the events you need. ``trainer`` is the running MoTTrainer.

    Setting ``trainer.should_stop = True`` in any event ends the run after the current round.
    """

    def on_train_begin(self, trainer: MoTTrainer) -> None:
        """Before round 1 (and before the starting student is evaluated)."""

    def on_round_begin(self, trainer: MoTTrainer, round_idx: int) -> None:
        """Before the first branch of round ``round_idx`` (1-based)."""

    def on_branch_begin(self, trainer: MoTTrainer, round_idx: int, teacher: str) -> None:
        """The fresh branch adapter is attached; its SFTTrainer is about to be built and trained."""

    def on_branch_end(self, trainer: MoTTrainer, round_idx: int, teacher: str, metrics: Mapping[str, Any]) -> None:
        """The branch trained; ``metrics`` is its ``metrics.jsonl`` record (train_loss, last_loss, steps, ...)."""

    def after_merge(self, trainer: MoTTrainer, round_idx: int, metrics: Mapping[str, Any]) -> None:
        """The round's merged delta is installed (``trainer.model`` is the new student) and saved."""

    def on_evaluate(self, trainer: MoTTrainer, round_idx: int, metrics: Mapping[str, Any]) -> None:
        """The student after ``round_idx`` rounds was evaluated (round 0: the starting model)."""

    def on_round_end(self, trainer: MoTTrainer, round_idx: int, metrics: Mapping[str, Any]) -> None:
        """The round's record (merge statistics and evaluation) was written to ``metrics.jsonl``."""

    def on_train_end(self, trainer: MoTTrainer, rounds: list[dict[str, Any]]) -> None:
        """After the last round; ``rounds`` are the per-round records ``train()`` returns."""


def split_callbacks(callbacks: Iterable[Any] | None) -> tuple[list[Any], list[MoTCallback]]:
    """Sort one user list into (transformers callbacks for every branch, MoT callbacks); classes are instantiated
    for MoTCallback and passed through for TrainerCallback, as transformers does."""
    step_level, mot_level = [], []
    for callback in callbacks or []:
        if isinstance(callback, type) and issubclass(callback, MoTCallback):
            callback = callback()
        if isinstance(callback, MoTCallback):
            mot_level.append(callback)
        elif isinstance(callback, TrainerCallback) or (
            isinstance(callback, type) and issubclass(callback, TrainerCallback)
        ):
            step_level.append(callback)
        else:
            raise TypeError(
                f"callbacks must be transformers TrainerCallback or merge_of_thought MoTCallback objects, got "
                f"{type(callback).__name__}."
            )
    return step_level, mot_level


class MoTCallbackHandler:
    """Calls one event on every MoT callback in order."""

    def __init__(self, callbacks: Iterable[MoTCallback]):
        self.callbacks = list(callbacks)

    def __call__(self, event: str, trainer: MoTTrainer, **kwargs: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(trainer, **kwargs)
