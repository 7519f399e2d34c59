"""``mot demo``: a complete Merge-of-Thought distillation, offline on the CPU, in a few minutes.

The student is loaded in 4-bit nf4: by default the shipped tiny one (pre-trained on digit facts and copying, never
on the task), or with ``--student smollm2-135m`` a real pretrained LM (SmolLM2-135M-Instruct, see
:mod:`merge_of_thought.students`), asked in chat format. Four synthetic teachers write chain-of-thought for the same
prompts in different styles (one of them noisy); MoT distils them round by round; the held-out accuracy of the
student is printed after every round next to the starting student's.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import LoraConfig

from ..callbacks import MoTCallback
from ..mot_config import MoTConfig
from ..mot_trainer import MoTTrainer
from ..reporting import Column, Table
from ..students import STUDENTS, student_path
from .student import load_demo_student
from .task import TEACHERS, accuracy, make_problems, make_teacher_datasets


@dataclass
class DemoSettings:
    """The demo's defaults for the tiny student: chosen to finish in about a minute on 2 CPU cores and to show
    learning. Another student starts from its own defaults (:data:`STUDENT_DEFAULTS`, :func:`demo_settings`)."""

    student: str = field(
        default="tiny",
        metadata={"choices": list(STUDENTS), "help": "tiny (shipped) or smollm2-135m (real LM); default: %(default)s"},
    )
    num_rounds: int = 4
    max_steps: int = 20
    learning_rate: float = 3e-3
    batch_size: int = 16
    lora_r: int = 16
    lora_alpha: int = 32
    train_problems: int = 70  # single-digit sums: 70 for training, the other 30 held out
    eval_problems: int = 30
    digits: int = 1  # digits per operand
    chat: bool = False  # prompt/completion rows as chat messages (for a student with a chat template)
    seed: int = 0
    load_in_4bit: bool = True
    bf16: bool = field(
        default=False,
        metadata={"help": "bf16 autocast and nf4 compute in bf16 (fast only on CPUs with AVX512-BF16 or AMX); "
                  "default: %(default)s"},
    )
    output_dir: str | None = None
    threads: int = 2


# Defaults per student that differ from DemoSettings'. SmolLM2 knows its digit facts and writes chat answers, so a
# few steps at batch 8 (each ~3 s on 2 cores) teach it the teachers' layout and "#### <sum>" line on the same sums.
STUDENT_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "smollm2-135m": dict(num_rounds=2, max_steps=6, learning_rate=1e-3, batch_size=8, chat=True),
}


def demo_settings(student: str = "tiny", **overrides: Any) -> DemoSettings:
    """The demo's settings for ``student``: its defaults (:data:`STUDENT_DEFAULTS`), then ``overrides``."""
    if student not in STUDENT_DEFAULTS:
        raise ValueError(f"No demo defaults for student {student!r}; choose from {', '.join(STUDENT_DEFAULTS)}.")
    return DemoSettings(**{**STUDENT_DEFAULTS[student], **overrides, "student": student})


class AccuracyTable(MoTCallback):
    """Scores the merged student on the held-out problems after every round and prints a row."""

    def __init__(self, tokenizer, problems, start: float, conversational: bool = False):
        self.tokenizer, self.problems, self.start = tokenizer, problems, start
        self.conversational = conversational
        self.stream = sys.stdout  # the console, also while the branches' own step logs are silenced
        self.rows: list[tuple[int, float, float]] = []

    table = Table([Column("round", "round", "{:d}"), Column("accuracy", "accuracy", "{:.2f}"),
                   Column("elapsed", "elapsed", "{:.0f}s")])  # fmt: skip

    def score(self, model, round_idx: int) -> None:
        result = accuracy(model, self.tokenizer, self.problems, conversational=self.conversational)
        self.rows.append((round_idx, result, time.perf_counter() - self.start))
        row = self.table.row({"round": round_idx, "accuracy": result, "elapsed": self.rows[-1][2]})
        print(row, file=self.stream, flush=True)

    def on_round_end(self, trainer, round_idx, metrics, **kwargs):
        self.score(trainer.model, round_idx)


def run_demo(settings: DemoSettings | None = None) -> list[tuple[int, float, float]]:
    """Run the demo; return ``(round, held-out accuracy, seconds since start)`` rows, round 0 = the start."""
    settings = settings or DemoSettings()
    torch.set_num_threads(settings.threads)
    start = time.perf_counter()
    compute_dtype = torch.bfloat16 if settings.bf16 else torch.float32
    model, tokenizer = load_demo_student(
        student_path(settings.student), load_in_4bit=settings.load_in_4bit, compute_dtype=compute_dtype
    )
    split = dict(seed=settings.seed, eval_size=settings.eval_problems, digits=settings.digits)
    train = make_problems(settings.train_problems, split="train", **split)
    held_out = make_problems(settings.eval_problems, split="test", **split)
    teachers = make_teacher_datasets(train, seed=settings.seed, conversational=settings.chat)
    print(
        f"MoT demo: {len(teachers)} teachers ({', '.join(TEACHERS)}), {settings.num_rounds} rounds x "
        f"{settings.max_steps} steps per branch, {'4-bit nf4' if settings.load_in_4bit else 'fp32'} "
        f"{'(bf16 autocast) ' if settings.bf16 else ''}"
        f"{settings.student} student, {settings.eval_problems} held-out problems"
        f"{' (chat format)' if settings.chat else ''}\n\n{AccuracyTable.table.header()}",
        flush=True,
    )
    table = AccuracyTable(tokenizer, held_out, start, conversational=settings.chat)
    table.score(model, 0)
    args = MoTConfig(
        output_dir=settings.output_dir or tempfile.mkdtemp(prefix="mot-demo-"),
        num_rounds=settings.num_rounds,
        max_steps=settings.max_steps,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="constant",
        per_device_train_batch_size=settings.batch_size,
        gradient_checkpointing=False,
        logging_steps=settings.max_steps,
        report_to=[],
        disable_tqdm=True,
        seed=settings.seed,
        overwrite_output_dir=True,
        dataloader_pin_memory=False,
        bf16=settings.bf16,
    )
    lora = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, target_modules="all-linear")
    trainer = MoTTrainer(
        model, args=args, teachers=teachers, processing_class=tokenizer, peft_config=lora, callbacks=[table]
    )
    with contextlib.redirect_stdout(io.StringIO()):  # the branches' step logs; metrics.jsonl keeps them
        trainer.train()
    first, last = table.rows[0][1], table.rows[-1][1]
    print(
        f"\nHeld-out accuracy {first:.2f} -> {last:.2f} in {time.perf_counter() - start:.0f}s. "
        f"The run folder (branch adapters, merged student, metrics.jsonl) is {args.output_dir}",
        flush=True,
    )
    return table.rows


def quiet() -> None:
    """The demo prints its own table; the libraries' progress bars and notices would bury it."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("merge_of_thought").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
