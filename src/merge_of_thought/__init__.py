"""Merge-of-Thought distillation for Hugging Face PEFT and TRL.

Each round the student is branched once per teacher, every branch trains a fresh LoRA adapter with TRL's
SFTTrainer on that teacher's reasoning traces, and the branch deltas are averaged exactly into the student.

The public names are imported on first use, so ``mot --help`` (and anything importing one light submodule) does
not pay for importing torch, transformers, TRL and PEFT.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import library_noise

library_noise.install()  # before PEFT imports bitsandbytes, which logs its notice at import

__version__ = "0.1.0"

_PUBLIC = {
    "LowRankDelta": "merging",
    "MoTCallback": "callbacks",
    "MoTConfig": "mot_config",
    "MoTTrainer": "mot_trainer",
    "load_teachers": "sources",
    "load_eval_set": "sources",
    "TeacherConfig": "sources",
    "EvalSetConfig": "sources",
    "merge_round": "merging",
    "STUDENTS": "students",
    "smollm2_135m": "students",
    "student_path": "students",
}

__all__ = [
    "STUDENTS",
    "EvalSetConfig",
    "TeacherConfig",
    "LowRankDelta",
    "MoTCallback",
    "MoTConfig",
    "MoTTrainer",
    "load_eval_set",
    "load_teachers",
    "merge_round",
    "smollm2_135m",
    "student_path",
    "__version__",
]

if TYPE_CHECKING:
    from .callbacks import MoTCallback
    from .sources import EvalSetConfig, TeacherConfig, load_eval_set, load_teachers
    from .merging import LowRankDelta, merge_round
    from .mot_config import MoTConfig
    from .mot_trainer import MoTTrainer
    from .students import STUDENTS, smollm2_135m, student_path


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
