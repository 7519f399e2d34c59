"""Ingredients of the embedded ``mot demo``: a character tokenizer, a synthetic addition task with four
chain-of-thought teachers, and a tiny pre-trained Qwen3 student shipped with the package."""

from .student import DEMO_STUDENT_DIR, load_demo_student, pretrain_student
from .task import (
    TEACHERS,
    Problem,
    accuracy,
    extract_answer,
    generate_completions,
    make_problems,
    make_teacher_dataset,
    make_teacher_datasets,
    teacher_trace,
)
from .tokenizer import build_char_tokenizer


__all__ = [
    "DEMO_STUDENT_DIR",
    "TEACHERS",
    "Problem",
    "accuracy",
    "build_char_tokenizer",
    "extract_answer",
    "generate_completions",
    "load_demo_student",
    "make_problems",
    "make_teacher_dataset",
    "make_teacher_datasets",
    "pretrain_student",
    "teacher_trace",
]
