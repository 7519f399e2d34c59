"""Side by side: MoT runs and their baselines read back from their folders, as one table and one plot.

"Did MoT help on my data" is a question about several run folders: a MoT run and the MTD/STD baselines trained
with ``mot train --baseline``. :func:`read_run` reads one folder (``mot_run.json`` and ``metrics.jsonl``, nothing
else, and writes nothing); :func:`comparison_table` and :func:`plot_runs` put several side by side. Curves are drawn
against the SFT steps trained so far, so a baseline's one round sits at the compute it stands for.
"""

from __future__ import annotations

import os
from itertools import accumulate
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import plots
from .checkpointing import RUN_FILE, RunFolder
from .hub import table
from .metrics import MetricsLog


@dataclass
class RunSummary:
    """One run folder as ``mot compare`` shows it: what ran, how much, and its evaluation after every round."""

    name: str
    kind: str  # "mot", "mtd" or "std"
    teachers: str
    rounds: list[dict[str, Any]] = field(default_factory=list)  # the round records, round 0 first
    sft_steps: int = 0  # trained in the completed rounds
    steps_after: dict[int, int] = field(default_factory=dict)  # round -> SFT steps trained by its end

    @property
    def last(self) -> dict[str, Any]:
        return self.rounds[-1] if self.rounds else {}

    def best_round(self) -> int | None:
        """The round with the highest eval accuracy, or without accuracy the lowest eval loss (None: no evals)."""
        key = "eval_accuracy" if any("eval_accuracy" in r for r in self.rounds) else "eval_loss"
        scored = [r for r in self.rounds if r.get(key) is not None]
        if not scored:
            return None
        sign = 1 if key == "eval_accuracy" else -1
        return max(scored, key=lambda r: (sign * r[key], -r["round"]))["round"]


def read_run(folder: str | os.PathLike) -> RunSummary:
    """A run folder's record and per-round evaluation; raises with the folder's name when it holds no MoT run."""
    run = RunFolder(folder)
    if not (run.root / RUN_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not a MoT run folder (no {RUN_FILE}): pass a `mot train` output_dir.")
    info = run.read_run()
    completed = run.completed_rounds()
    records = MetricsLog(run.metrics_path).read()
    evaluated = {r["round"]: r for r in records if r.get("type") == "round" and r["round"] in [0, *completed]}
    steps = [sum(b.get("steps", 0) for b in records if b.get("type") == "branch" and b.get("round") == k)
             for k in completed]  # fmt: skip
    return RunSummary(
        name=run.root.resolve().name,
        kind=info.get("kind", "mot"),
        teachers=_teachers(info),
        rounds=[evaluated[k] for k in sorted(evaluated)],
        sft_steps=sum(steps),
        steps_after=dict(zip([0, *completed], accumulate(steps, initial=0))),
    )


def _teachers(info: Mapping[str, Any]) -> str:
    baseline = info.get("baseline") or {}
    if baseline.get("kind") == "mtd":
        return "union of " + ", ".join(baseline["teachers"])
    return ", ".join(info.get("teachers", []))


COLUMNS = ("run", "kind", "teachers", "SFT steps", "eval loss", "eval accuracy", "best round", "last round")


def comparison_table(runs: Sequence[RunSummary]) -> str:
    """One Markdown row per run: the final eval loss and accuracy are the last completed round's."""
    rows = [
        [r.name, r.kind, r.teachers, r.sft_steps, r.last.get("eval_loss"), r.last.get("eval_accuracy"),
         r.best_round(), r.last.get("round")]
        for r in runs
    ]  # fmt: skip
    return table(COLUMNS, rows)


def plot_runs(runs: Sequence[RunSummary], path: Path) -> list[str]:
    """Eval loss (and accuracy, where measured) after every round of every run against SFT steps, one PNG each;
    the paths written (none when matplotlib is missing or no run was evaluated)."""
    written = []
    for key, label, suffix in (("eval_loss", "eval loss", ""), ("eval_accuracy", "eval accuracy", "-accuracy")):
        curves = {
            f"{r.name} ({r.kind})": [(r.steps_after[x["round"]], x[key]) for x in r.rounds if x.get(key) is not None]
            for r in runs
        }
        if not any(curves.values()):
            continue
        out = path.with_name(f"{path.stem}{suffix}{path.suffix}")
        if plots.plot_curves(curves, out, label, xlabel="SFT steps trained (each point: the end of a round)"):
            written.append(str(out))
    return written
