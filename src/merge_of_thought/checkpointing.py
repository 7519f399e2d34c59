"""The run folder: what a MoT run writes, where, and how it is read back.

```
output_dir/
  mot_run.json                 base model, teachers, weights, LoRA settings, completed rounds
  metrics.jsonl                one line per branch and per round
  round-001/
    round.json                 the round's teachers, weights, start state, merge report
    branch-<teacher>/          that branch's LoRA adapter (PEFT format), trained on top of the start state
    merged/                    the cumulative merged delta after this round: a PEFT LoRA adapter on the base model
  round-002/ ...
```

The start state of round t is ``round-(t-1)/merged`` (round 1 starts from the base model), so
``round-t/merged == start + sum_k w_k * branch_k`` can be recomputed from disk, and the final student is
``PeftModel.from_pretrained(base_model, "round-T/merged")``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .merging import LowRankDelta, MergeReport

RUN_FILE = "mot_run.json"
METRICS_FILE = "metrics.jsonl"


def _jsonable(value: Any) -> Any:
    """JSON for what configs hold besides plain types: sets (PEFT target_modules), enums and paths."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if hasattr(value, "value"):
        return value.value
    return str(value)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON under a temporary name and rename it, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=_jsonable)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f.name, path)


def teacher_slug(name: str) -> str:
    """A folder-safe form of a teacher name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "teacher"


class RunFolder:
    """Paths and records of one MoT run's output folder."""

    def __init__(self, output_dir: str | os.PathLike):
        self.root = Path(output_dir)

    def round_dir(self, round_idx: int) -> Path:
        return self.root / f"round-{round_idx:03d}"

    def branch_dir(self, round_idx: int, teacher: str) -> Path:
        return self.round_dir(round_idx) / f"branch-{teacher_slug(teacher)}"

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
    ) -> None:
        """Record how ``round-t/merged`` was made; written after the adapters it names, so it marks completion."""
        start = None if round_idx == 1 else os.path.relpath(self.merged_dir(round_idx - 1), self.round_dir(round_idx))
        record = {
            "round": round_idx,
            "start_state": start,
            "teachers": {
                name: {"weight": w, "adapter": self.branch_dir(round_idx, name).name}
                for name, w in zip(teachers, weights)
            },
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
        write_json_atomic(self.round_dir(round_idx) / "round.json", record)

    def completed_rounds(self) -> list[int]:
        """Rounds whose ``round.json`` exists (it is the last file a round writes)."""
        found = []
        for path in self.root.glob("round-*/round.json"):
            found.append(int(path.parent.name.split("-")[1]))
        return sorted(found)
