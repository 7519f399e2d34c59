"""Merge-of-Thought distillation for Hugging Face PEFT and TRL.

Each round the student is branched once per teacher, every branch trains a fresh LoRA adapter with TRL's
SFTTrainer on that teacher's reasoning traces, and the branch deltas are averaged exactly into the student.
"""

from .callbacks import MoTCallback
from .data import load_teachers
from .merging import LowRankDelta, merge_round
from .mot_config import MoTConfig
from .mot_trainer import MoTTrainer
from .students import STUDENTS, smollm2_135m, student_path

__version__ = "0.1.0"

__all__ = [
    "STUDENTS",
    "LowRankDelta",
    "MoTCallback",
    "MoTConfig",
    "MoTTrainer",
    "load_teachers",
    "merge_round",
    "smollm2_135m",
    "student_path",
    "__version__",
]
