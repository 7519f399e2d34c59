"""The run folder: what a MoT run writes, where, and how it is read back.

```
output_dir/
  mot_run.json                 base model, teachers, weights, LoRA settings, completed rounds
  metrics.jsonl                one line per branch and per round
  round-000/
    eval.jsonl                 the starting student's eval generations, one line per sample (with eval accuracy)
  round-001/
    round.json                 the round's teachers, weights, start state, merge report
    branch-<teacher>/          that branch's LoRA adapter (PEFT format), trained on top of the start state, and
                               mot_branch.json, its metrics line (losses, its own eval scores)
    merged/                    the cumulative merged delta after this round: a PEFT LoRA adapter on the base model
    eval.jsonl                 the merged student's eval generations: prompt, completion, extracted answer, gold,
                               correct (null: gold not parseable), sample index
  round-002/ ...
```

The start state of round t is ``round-(t-1)/merged`` (round 1 starts from the base model), so
``round-t/merged == start + sum_k w_k * branch_k`` can be recomputed from disk, and the final student is
``PeftModel.from_pretrained(base_model, "round-T/merged")``.

Crash safety: every folder and file is written under a temporary name and renamed into place (:func:`atomic_dir`,
:func:`write_json_atomic`, :func:`write_text_atomic`), so what exists under its final name is complete. A branch
is done once ``branch-<teacher>/`` exists (or ``dropped-<teacher>.json``, when a diverged branch was left out); a
round is done once ``round.json`` exists, which is written after ``merged/``. :meth:`RunFolder.resume_point` reads
exactly that back.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft import LoraConfig
from safetensors import safe_open

from .adapters import ADAPTER_WEIGHTS, PEFT_KEY_PREFIX, adapter_scaling, load_delta
from .merging import LowRankDelta, MergeReport

logger = logging.getLogger(__name__)

RUN_FILE = "mot_run.json"
METRICS_FILE = "metrics.jsonl"
ROUND_FILE = "round.json"
BRANCH_RECORD = "mot_branch.json"  # in a branch's folder, written with its adapter: its line of metrics.jsonl
_TEMP_MARK = ".tmp-"  # in the names of folders and files still being written; never read as results

# The fields of mot_run.json that must match for a resumed run to continue the one on disk (anything else, such as
# the learning rate or num_rounds, may change on resume: e.g. a lower learning rate after a diverged branch).
IDENTITY_FIELDS = (
    "base_model", "teachers", "teacher_rows", "teacher_weights", "lora", "steps_per_branch", "seed", "merge_max_rank",
    "merge_step_size", "shared_branch_init", "branch_state", "teacher_weighting",
)


class CheckpointWriteError(OSError):
    """Writing the run folder failed (full disk, lost permission); what was completed before is intact."""


@contextlib.contextmanager
def writing(what: str, path: Path) -> Iterator[None]:
    """Turn an OSError while writing ``what`` into an error that says so and that the run can be resumed."""
    try:
        yield
    except CheckpointWriteError:
        raise
    except OSError as error:
        reason = "the disk is full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else (error.strerror or str(error))
        raise CheckpointWriteError(
            error.errno,
            f"Could not write {what} to {path}: {reason}. Every branch and round completed before it is intact; fix "
            "the cause, then resume with trainer.train(resume_from_checkpoint=True) or `mot train --resume`.",
        ) from error


def umask_mode(*paths: str | os.PathLike) -> None:
    """Give files and folders the mode an ordinary ``open``/``mkdir`` would: tempfile makes them 0600/0700 and
    safetensors writes its files 0600, which would leave a run's weights unreadable to the user's group. A folder's
    own files are included."""
    mask = os.umask(0)
    os.umask(mask)
    for path in paths:
        inside = [p for p in Path(path).iterdir() if p.is_file()] if os.path.isdir(path) else []
        for item in [Path(path), *inside]:
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: Path, what: str | None = None, last: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success its synced files appear under ``path`` atomically.

    A new ``path`` is the temporary folder renamed in one step. An existing one (a branch's trainer writes its logs
    there) receives the files one rename at a time with ``last`` renamed last, so ``path/last`` exists only once
    every other file is in place: readers take it as the completion mark. A crash or an error leaves no partial
    file under ``path``; an error also removes the temporary folder.
    """
    path = Path(path)
    with writing(what or path.name, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{_TEMP_MARK}", dir=path.parent))
        try:
            yield tmp
            umask_mode(tmp)
            files = sorted(tmp.iterdir(), key=lambda f: f.name == last)
            for file in files:
                with file.open("rb") as f:
                    os.fsync(f.fileno())
            if path.exists():
                for file in files:
                    os.replace(file, path / file.name)
                tmp.rmdir()
            else:
                os.replace(tmp, path)
            _fsync_dir(path)
            _fsync_dir(path.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _jsonable(value: Any) -> Any:
    """JSON for what configs hold besides plain types: sets (PEFT target_modules), enums and paths."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if hasattr(value, "value"):
        return value.value
    return str(value)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON under a temporary name and rename it, so a reader never sees half a file."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable))


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` under a temporary name, sync it and rename it into place: a reader never sees half a file."""
    with writing(path.name, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, prefix=f".{path.name}{_TEMP_MARK}") as f:
            try:
                umask_mode(f.name)
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            except BaseException:
                os.unlink(f.name)
                raise
        os.replace(f.name, path)


def teacher_slug(name: str) -> str:
    """A folder-safe form of a teacher name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "teacher"


class SavedDelta(Mapping[str, LowRankDelta]):
    """A merged delta that stays in its round checkpoint (``round-t/merged``) and is read one layer at a time.

    The saved adapter pads every layer to one rank with zeros; ``ranks`` (from ``round.json``) gives each layer's own.
    Layers are copied out of the file, so nothing stays mapped between reads, except inside :meth:`reading`, which
    keeps the file open while a merge or an install reads every layer (one open per layer took 0.12 s for SmolLM2's
    210 layers at rank 256, against 0.05 s). The file must stay as it was when the view was made (a run's own
    checkpoint does): a read after it changed raises instead of returning another delta.
    """

    LAYERS_PER_OPEN = 16
    """Inside :meth:`reading`, the file is opened again after this many layers: the pages a read touches stay
    mapped, and counted in the process's memory, until the file closes. Held open for all of SmolLM2's layers at
    rank 256, that was +309 MB of peak RSS (the whole file); re-opened every 16 layers, +38 MB, at the same 0.05 s."""

    def __init__(self, folder: Path, ranks: Mapping[str, int] | None = None):
        self.path = folder / ADAPTER_WEIGHTS
        self._open_file = None  # inside reading()
        self._reads_since_open = 0
        self._identity = self._file_identity()
        with safe_open(self.path, framework="pt") as file:
            keys = [key for key in file.keys() if key.endswith(".lora_A.weight")]
        names = [key[len(PEFT_KEY_PREFIX) : -len(".lora_A.weight")] for key in keys]
        config = LoraConfig.from_pretrained(str(folder))
        self._ranks = {name: (ranks or {}).get(name) for name in names}  # None: the whole saved rank
        self._scaling = {name: adapter_scaling(config, name) for name in names}

    def __getitem__(self, name: str) -> LowRankDelta:
        if name not in self._ranks:
            raise KeyError(name)
        rank = self._ranks[name]
        if self._file_identity() != self._identity:
            raise RuntimeError(f"{self.path} changed after this run saved it; the merged delta it held is gone.")
        if self._open_file is not None and self._reads_since_open == self.LAYERS_PER_OPEN:
            self._open_file = self._reopen()  # unmaps what the last reads touched
        with contextlib.nullcontext(self._open_file) if self._open_file else safe_open(self.path, "pt") as file:
            A = file.get_tensor(f"{PEFT_KEY_PREFIX}{name}.lora_A.weight")[:rank].float().clone()
            B = file.get_tensor(f"{PEFT_KEY_PREFIX}{name}.lora_B.weight")[:, :rank].float() * self._scaling[name]
        self._reads_since_open += 1
        return LowRankDelta(B.contiguous(), A.contiguous())

    @contextlib.contextmanager
    def reading(self) -> Iterator[SavedDelta]:
        """Keep the checkpoint open while the block reads its layers, :data:`LAYERS_PER_OPEN` at a time (closed, and
        unmapped, when it ends)."""
        with contextlib.ExitStack() as self._opened:
            self._open_file = self._reopen()
            try:
                yield self
            finally:
                self._open_file = None

    def _reopen(self):
        self._opened.close()
        self._reads_since_open = 0
        return self._opened.enter_context(safe_open(self.path, framework="pt"))

    def same_as(self, other: object) -> bool:
        """Whether ``other`` is a view of the same unchanged checkpoint at the same ranks (the same delta)."""
        return (isinstance(other, SavedDelta) and other.path == self.path and other._identity == self._identity
                and other._ranks == self._ranks)  # fmt: skip

    def _file_identity(self) -> tuple[int, int, int]:
        stat = self.path.stat()
        return stat.st_ino, stat.st_size, stat.st_mtime_ns

    def __contains__(self, name: object) -> bool:
        return name in self._ranks  # without reading the layer (Mapping's default would)

    def __iter__(self) -> Iterator[str]:
        return iter(self._ranks)

    def __len__(self) -> int:
        return len(self._ranks)


def reading(*deltas: Mapping[str, LowRankDelta] | None) -> contextlib.ExitStack:
    """Open every :class:`SavedDelta` among ``deltas`` for the block (:meth:`SavedDelta.reading`); others need not."""
    stack = contextlib.ExitStack()
    for delta in deltas:
        if isinstance(delta, SavedDelta):
            stack.enter_context(delta.reading())
    return stack


class RunFolder:
    """Paths and records of one MoT run's output folder."""

    def __init__(self, output_dir: str | os.PathLike):
        self.root = Path(output_dir)

    def round_dir(self, round_idx: int) -> Path:
        return self.root / f"round-{round_idx:03d}"

    def branch_dir(self, round_idx: int, teacher: str) -> Path:
        return self.round_dir(round_idx) / f"branch-{teacher_slug(teacher)}"

    def optimizer_dir(self, round_idx: int, teacher: str) -> Path:
        """A persistent branch's optimizer state after ``round_idx`` (written by the process that trains it)."""
        return self.round_dir(round_idx) / f"optimizer-{teacher_slug(teacher)}"

    def merged_dir(self, round_idx: int) -> Path:
        return self.round_dir(round_idx) / "merged"

    @property
    def metrics_path(self) -> Path:
        return self.root / METRICS_FILE

    def write_run(self, info: Mapping[str, Any]) -> None:
        write_json_atomic(self.root / RUN_FILE, dict(info))

    def read_run(self) -> dict[str, Any]:
        return json.loads((self.root / RUN_FILE).read_text())

    def write_round(
        self,
        round_idx: int,
        teachers: list[str],
        weights: list[float],
        reports: Mapping[str, MergeReport],
        merged: Mapping[str, LowRankDelta],
        dropped: Sequence[str] = (),
    ) -> None:
        """Record how ``round-t/merged`` was made; written after the adapters it names, so it marks completion.

        ``teachers`` and ``weights`` are the branches that were merged; ``dropped`` the diverged ones left out.
        """
        start = None if round_idx == 1 else os.path.relpath(self.merged_dir(round_idx - 1), self.round_dir(round_idx))
        record = {
            "round": round_idx,
            "start_state": start,
            "teachers": {
                name: {"weight": w, "adapter": self.branch_dir(round_idx, name).name}
                for name, w in zip(teachers, weights)
            },
            "dropped": list(dropped),
            "merged": "merged",
            "merged_rank": max(d.rank for d in merged.values()),
            "layers": {
                name: {
                    "rank_before": r.rank_before,
                    "rank_after": r.rank_after,
                    "relative_error": r.relative_error,
                }
                for name, r in reports.items()
            },
        }
        write_json_atomic(self.round_dir(round_idx) / ROUND_FILE, record)

    def completed_rounds(self) -> list[int]:
        """Rounds whose ``round.json`` exists (it is the last file a round writes)."""
        found = []
        for path in self.root.glob(f"round-*/{ROUND_FILE}"):
            found.append(int(path.parent.name.split("-")[1]))
        return sorted(found)

    # ------------------------------------------------------------------ resuming
    def dropped_path(self, round_idx: int, teacher: str) -> Path:
        return self.round_dir(round_idx) / f"dropped-{teacher_slug(teacher)}.json"

    def has_run(self) -> bool:
        """Whether a MoT run already wrote here."""
        return (self.root / RUN_FILE).exists() or any(self.root.glob("round-*"))

    def progress(self) -> tuple[int, int]:
        """``(completed rounds, finished or dropped branches)`` on disk, whatever the teachers are called."""
        rounds = len(self.completed_rounds())
        branches = len(list(self.root.glob(f"round-*/branch-*/{ADAPTER_WEIGHTS}")))
        return rounds, branches + len(list(self.root.glob("round-*/dropped-*.json")))

    def check_new_run(self) -> None:
        """Refuse to start a new run over one that completed a branch (unless overwrite_output_dir is set).

        A run that stopped before completing any branch (an error in its first branch or evaluation) has nothing to
        lose: the new run replaces it, so the corrected command works as it was typed.
        """
        if not self.has_run():
            return
        rounds, branches = self.progress()
        if rounds == branches == 0:
            return
        done = f"{plural(rounds, 'round')} completed" if rounds else f"{plural(branches, 'branch')} of round 1 done"
        raise ValueError(
            f"output_dir {str(self.root)!r} already holds a MoT run ({done}). Resume it with "
            "trainer.train(resume_from_checkpoint=True) (`mot train --resume`), choose another output_dir, or set "
            "overwrite_output_dir=True to replace it."
        )

    def resume_point(self, teachers: Sequence[str]) -> ResumePoint:
        """How far the run on disk got: its completed rounds, then the finished branches of the round after them."""
        done, rounds = 0, set(self.completed_rounds())
        while done + 1 in rounds:
            done += 1
        point = ResumePoint(rounds_done=done)
        for teacher in teachers:
            if (self.branch_dir(done + 1, teacher) / ADAPTER_WEIGHTS).exists():
                point.branches_done.append(teacher)
            elif self.dropped_path(done + 1, teacher).exists():
                point.branches_dropped.append(teacher)
        return point

    def read_branch(self, round_idx: int, teacher: str) -> dict[str, LowRankDelta]:
        """A finished branch's delta, bit for bit the fp32 factors the run held (adapters are saved in fp32)."""
        return load_delta(self.branch_dir(round_idx, teacher))

    def read_branch_record(self, round_idx: int, teacher: str) -> dict[str, Any]:
        """A finished branch's metrics line (its scores weigh the merge under ``teacher_weighting``); empty for a
        branch written before the record was kept beside its adapter."""
        path = self.branch_dir(round_idx, teacher) / BRANCH_RECORD
        return json.loads(path.read_text()) if path.exists() else {}

    def read_merged(self, round_idx: int) -> dict[str, LowRankDelta]:
        """The merged delta after ``round_idx`` with each layer at its own rank, as the run held it."""
        return dict(self.merged_view(round_idx))

    def merged_view(self, round_idx: int) -> SavedDelta:
        """The merged delta after ``round_idx``, read from its checkpoint one layer at a time when asked for."""
        layers = json.loads((self.round_dir(round_idx) / ROUND_FILE).read_text()).get("layers", {})
        return SavedDelta(self.merged_dir(round_idx), {name: info["rank_after"] for name, info in layers.items()})

    def remove_partial(self) -> None:
        """Delete what a killed run left half written (temporary names only; nothing complete is touched)."""
        for path in [*self.root.glob(f".*{_TEMP_MARK}*"), *self.root.glob(f"round-*/.*{_TEMP_MARK}*")]:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove a previous run's records and adapters (only what MoT writes; other files stay)."""
        for path in self.root.glob("round-*"):
            shutil.rmtree(path)
        for name in (RUN_FILE, METRICS_FILE):
            (self.root / name).unlink(missing_ok=True)
        self.remove_partial()

    def check_identity(self, info: Mapping[str, Any]) -> None:
        """Refuse to continue the run on disk with a configuration that would mix another run into it."""
        saved = self.read_run()
        current = json.loads(json.dumps(dict(info), default=_jsonable))  # compare as JSON, like the saved copy
        differences = [
            f"  {key}: {_changed(saved[key], current.get(key))}"
            for key in IDENTITY_FIELDS
            if key in saved and saved[key] != current.get(key)
        ]
        if differences:
            raise ValueError(
                f"Cannot resume the MoT run in {self.root}: it was made with another configuration.\n"
                + "\n".join(differences)
                + "\nResume with the settings on disk, or start a new run in another output_dir (or set "
                "overwrite_output_dir=True to replace this one)."
            )

    # ------------------------------------------------------------------ before training
    def check_writable(self, shared: bool = False) -> None:
        """Write a probe file in the folder: a clear error now rather than after the first branch. Folders made for
        the probe are removed again, so a run that fails before it starts leaves none behind, except when the
        folder is ``shared`` by the processes of a launch, which probe it at the same time."""
        created = [p for p in [self.root, *self.root.parents] if not p.exists()]
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=f".write-probe{_TEMP_MARK}") as f:
                f.write(b"ok")
                f.flush()
        except OSError as error:
            raise CheckpointWriteError(
                error.errno,
                f"output_dir {str(self.root)!r} is not writable ({error.strerror or error}). MoT writes every "
                "branch adapter and merged round there; choose a folder you can write to.",
            ) from error
        for folder in [] if shared else created:  # innermost first; the run writes its folder when it starts
            try:
                folder.rmdir()
            except OSError:  # not empty: something else uses it now
                break

    def check_free_space(self, bytes_per_round: int, bytes_left: int) -> None:
        """Error if the disk cannot hold even the next round's adapters; warn if it cannot hold the whole run."""
        existing = next(p for p in [self.root, *self.root.parents] if p.exists())  # a new run's folder may not yet
        free = shutil.disk_usage(existing).free
        if free < bytes_per_round:
            raise CheckpointWriteError(
                errno.ENOSPC,
                f"Not enough disk space in {self.root}: a round writes about {_mb(bytes_per_round)} of adapters, "
                f"only {_mb(free)} is free. Free some space or choose another output_dir.",
            )
        if free < bytes_left:
            logger.warning(
                "The rest of this MoT run writes about %s to %s, but only %s is free; it will stop when the disk is "
                "full and can then be resumed.", _mb(bytes_left), self.root, _mb(free)
            )


@dataclass
class ResumePoint:
    """Where a run continues: after ``rounds_done`` rounds, with these branches of the next round already done."""

    rounds_done: int = 0
    branches_done: list[str] = field(default_factory=list)
    branches_dropped: list[str] = field(default_factory=list)

    def branches_finished(self, n_teachers: int) -> int:
        return self.rounds_done * n_teachers + len(self.branches_done) + len(self.branches_dropped)


def _changed(on_disk: Any, now: Any) -> str:
    """``on disk 1, now 2``; for two settings dicts only the keys that differ: ``r: 8 -> 4``."""
    if isinstance(on_disk, Mapping) and isinstance(now, Mapping):
        keys = [k for k in {**on_disk, **now} if on_disk.get(k) != now.get(k)]
        return ", ".join(f"{k}: {on_disk.get(k)!r} -> {now.get(k)!r}" for k in keys) + " (on disk -> now)"
    return f"on disk {on_disk!r}, now {now!r}"


def resume_target(value: bool | str | os.PathLike | None) -> bool | str:
    """``resume_from_checkpoint`` as MoT reads it: False (a new run), True (the run in output_dir) or a run folder.

    Takes what TRL scripts pass through: booleans, None, and the strings "true"/"false" of a command line.
    """
    if value is None or isinstance(value, bool):
        return bool(value)
    text = os.fspath(value)
    if text.strip().lower() in ("true", "false", ""):
        return text.strip().lower() == "true"
    return text


def plural(n: int, word: str) -> str:
    """``1 round``, ``2 rounds``, ``1 branch``, ``3 branches``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}{'es' if word.endswith('ch') else 's'}"


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
