"""Run logging: ``metrics.jsonl`` (one JSON object per branch and per round) and the console summary."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .checkpointing import writing


class MetricsLog:
    """Append-only ``metrics.jsonl``: the machine-readable record of a run, one JSON object per line."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(dict(record), sort_keys=True) + "\n"
        with writing(self.path.name, self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a+b") as f:  # appends wherever it reads
                size = f.seek(0, os.SEEK_END)
                if size and f.seek(size - 1) is not None and f.read(1) != b"\n":
                    line = "\n" + line  # a killed run left its last line unfinished: start a new one
                f.write(line.encode())

    def read(self) -> list[dict[str, Any]]:
        """Every complete record; a line a killed run left unfinished is skipped."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records
