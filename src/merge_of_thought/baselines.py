"""Equal-compute baselines for a MoT run, trained by MoTTrainer itself: the union of the teachers (MTD) and one
teacher alone (STD).

A baseline is a one-branch, one-round MoT run of the same student, LoRA, optimizer, learning rate and batch, so it
writes the same run folder (``round-001/merged`` is its adapter), metrics and model card, and ``mot export`` reads
it. What differs is the data and the number of steps:

- ``mtd``: the teachers' data sets concatenated and shuffled once (seeded), trained for ``num_rounds * K * max_steps``
  steps, MoT's total compute (``steps="mot"``), or for ``num_rounds * max_steps``, one branch path (``"path"``).
- ``std``: one teacher's data set for ``num_rounds * max_steps`` steps (one branch path without restarts) or, with
  ``steps="mot"``, MoT's total.
- ``steps="parallel"`` (MTD): the data-parallel control. ``num_rounds * max_steps`` steps, MoT's sequential steps,
  each with a K-fold batch (``gradient_accumulation_steps * K``), MoT's compute: what K GPUs would run in MoT's wall
  time as plain data-parallel SFT on the union, and what averaging K branches approximates to first order, so what
  MoT gains over it is what branching per teacher and averaging buy.

The learning-rate schedule spans the whole baseline run (MoT restarts it every round), as in a plain SFT run.
Its one branch IS the student of its one round, so it is evaluated once (after the merge), not once as a branch too.
The config carries :func:`baseline_record` (``args.baseline``): ``mot_run.json`` says ``kind: mtd`` or ``std`` with
the run it stands in for, and the model card and ``mot compare`` name it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from datasets import Dataset, concatenate_datasets

from . import reasoning
from .mot_config import MoTConfig

BASELINES = ("mtd", "std")
BASELINE_STEPS = ("mot", "path", "parallel")
UNION = "union"


def baseline_steps(args: MoTConfig, n_teachers: int, steps: str) -> int:
    """SFT steps of a baseline: MoT's total compute (``"mot"``) or one branch path (``"path"``, and ``"parallel"``,
    whose steps carry a K-fold batch)."""
    if steps not in BASELINE_STEPS:
        raise ValueError(f"baseline steps must be one of {BASELINE_STEPS}, got {steps!r}.")
    path = args.num_rounds * args.max_steps
    return path * n_teachers if steps == "mot" else path


def union(teachers: Mapping[str, Dataset]) -> Dataset:
    """Every teacher's rows in one data set. Conversations get the same message keys first (a teacher mapped from
    columns carries ``reasoning_content``, one with inline ``<think>`` does not); formats that cannot share one data
    set (``messages`` beside ``prompt``/``completion``) are named."""
    parts = [reasoning.with_reasoning_keys(dataset) for dataset in teachers.values()]
    try:
        return concatenate_datasets(parts)
    except ValueError as error:
        columns = {name: dataset.column_names for name, dataset in teachers.items()}
        raise ValueError(
            f"baseline 'mtd' concatenates the teachers' data sets, but their formats differ: {columns} ({error}). "
            "Bring them to one format (e.g. all 'messages') first."
        ) from None


def baseline_run(
    kind: str,
    teachers: Mapping[str, Dataset],
    args: MoTConfig,
    teacher: str | None = None,
    steps: str | None = None,
) -> tuple[dict[str, Dataset], MoTConfig]:
    """The one-branch teachers and the config that make ``args``'s run into a baseline (see the module doc).

    ``steps`` defaults to ``"mot"`` for MTD and ``"path"`` for STD. ``teacher`` (STD only) names the teacher; a run
    with one teacher needs no name.
    """
    if kind not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {kind!r}.")
    if kind == "mtd":
        if teacher is not None:
            raise ValueError("baseline 'mtd' trains on every teacher's data; baseline_teacher is for 'std'.")
        data = {UNION: union(teachers).shuffle(seed=args.seed)}
    else:
        if teacher is None and len(teachers) == 1:
            teacher = next(iter(teachers))
        if teacher not in teachers:
            raise ValueError(
                f"baseline 'std' needs baseline_teacher, one of {', '.join(teachers)}; got {teacher!r}."
            )
        data = {teacher: teachers[teacher]}
    steps = steps or ("mot" if kind == "mtd" else "path")
    if steps == "parallel" and kind != "mtd":
        raise ValueError("baseline_steps 'parallel' is the data-parallel control on the union: use it with 'mtd'.")
    total = baseline_steps(args, len(teachers), steps)
    accumulation = args.gradient_accumulation_steps * (len(teachers) if steps == "parallel" else 1)
    config = dataclasses.replace(
        args, num_rounds=1, max_steps=total, allow_single_teacher=True, teacher_weights=None, branch_state="fresh",
        teacher_weighting="fixed", eval_branches=False,  # the branch is the round's student: one eval, not two
        gradient_accumulation_steps=accumulation,
    )
    config.baseline = baseline_record(kind, list(teachers), args, steps, teacher)
    return data, config


def baseline_record(
    kind: str, teachers: list[str], args: MoTConfig, steps: str, teacher: str | None = None
) -> dict[str, Any]:
    """What ``mot_run.json`` says of a baseline: its kind, its data, and the MoT run whose compute it matches."""
    return {
        "kind": kind,
        "steps": steps,
        "teacher": teacher,
        "teachers": teachers,  # the teachers of the MoT run it stands in for (MTD trains on their union)
        "mot_num_rounds": args.num_rounds,
        "mot_steps_per_branch": args.max_steps,
    }


def describe(record: Mapping[str, Any]) -> str:
    """A baseline in words: ``MTD baseline (the union of a, b, c; MoT's total compute)``."""
    data = (
        f"the union of {', '.join(record['teachers'])}" if record["kind"] == "mtd" else f"teacher {record['teacher']}"
    )
    compute = {"mot": "MoT's total compute", "path": "one MoT branch path",
               "parallel": "MoT's sequential steps with a K-fold batch: the data-parallel control"}[record["steps"]]
    return f"{record['kind'].upper()} baseline ({data}; {compute})"
