"""Configuration for :class:`~merge_of_thought.MoTTrainer`: TRL's SFTConfig plus the Merge-of-Thought settings."""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field

import torch
from trl import SFTConfig

logger = logging.getLogger(__name__)


def _has_accelerator() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass
class MoTConfig(SFTConfig):
    r"""
    Every [`~trl.SFTConfig`] argument keeps its meaning inside each branch; ``max_steps`` counts the steps of ONE
    branch in ONE round (the paper trains 50). The run trains ``num_rounds x len(teachers) x max_steps`` steps.

    Parameters that differ from SFTConfig:
        max_steps (`int`, defaults to `50`): SFT steps per branch per round.
        bf16 (`bool` or `None`): as in TRL, except that on a machine without a GPU it defaults to `False`: bf16
            autocast on a CPU without native bf16 ran TRL's SFT steps 70x slower than fp32 here.

    MoT parameters:
        num_rounds (`int`, defaults to `5`): rounds of branch-train-merge.
        teacher_weights (`dict[str, float]`, *optional*): merge weight per teacher name, summing to 1; uniform
            when unset.
        merge_max_rank (`int`, *optional*): rank budget of the merged delta per layer. Unset keeps it exact (up to
            `merge_rtol`); a budget truncates through an SVD of the factors and logs the error it made.
        merge_rtol (`float`, defaults to `1e-6`): singular values of the merged delta below `merge_rtol` times the
            largest are dropped (numerically zero).
        allow_single_teacher (`bool`, defaults to `False`): allow one teacher (MoT then is SFT with restarts).
        save_branch_adapters (`bool`, defaults to `True`): keep each branch's adapter in its round folder so the
            merge can be recomputed from disk. (They are always written, as checkpoints; with `False` a round's
            branch adapters are deleted once the round is merged.)
        on_branch_divergence (`str`, defaults to `"raise"`): what a branch whose loss turns NaN or inf does:
            `"raise"` stops the run with an error naming the teacher, round and step (every completed branch and
            round stays on disk, resumable); `"drop"` leaves that branch out of the round's merge, renormalises the
            other teachers' weights, and logs a `dropped_branch` record in metrics.jsonl.
        overwrite_output_dir (`bool`, defaults to `False`): let a new run (not a resume) replace a MoT run already
            in `output_dir`. Without it such a folder is refused, so two runs are never mixed.
    """

    _VALID_DICT_FIELDS = SFTConfig._VALID_DICT_FIELDS + ["teacher_weights"]

    max_steps: int = field(default=50, metadata={"help": "SFT steps per branch per round (the paper uses 50)."})
    num_rounds: int = field(default=5, metadata={"help": "Number of branch-train-merge rounds."})
    teacher_weights: dict[str, float] | str | None = field(
        default=None,
        metadata={"help": "Merge weight per teacher name, summing to 1 (JSON on the command line). Uniform if unset."},
    )
    merge_max_rank: int | None = field(
        default=None,
        metadata={"help": "Rank budget of the merged delta per layer; unset keeps the merge exact."},
    )
    merge_rtol: float = field(
        default=1e-6,
        metadata={"help": "Relative singular-value cut-off below which merged directions count as zero."},
    )
    allow_single_teacher: bool = field(
        default=False, metadata={"help": "Allow a run with one teacher (SFT with periodic restarts)."}
    )
    save_branch_adapters: bool = field(
        default=True, metadata={"help": "Save every branch adapter in PEFT format in its round folder."}
    )

    on_branch_divergence: str = field(
        default="raise",
        metadata={"help": "On a NaN/inf loss in a branch: 'raise' (stop, resumable) or 'drop' (merge the others).",
                  "choices": ["raise", "drop"]},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Let a new run replace a MoT run already in output_dir."}
    )

    def __post_init__(self):
        if self.bf16 is None and not self.fp16 and (self.use_cpu or not _has_accelerator()):
            logger.info("No GPU found: MoTConfig sets bf16=False (bf16 autocast is very slow on most CPUs).")
            self.bf16 = False
        elif self.bf16 and (self.use_cpu or not _has_accelerator()) and not _cpu_has_native_bf16():
            warnings.warn(
                "bf16=True on a CPU without native bf16: SFT steps can run ~70x slower than with bf16=False.",
                stacklevel=3,
            )
        if isinstance(self.teacher_weights, str):
            self.teacher_weights = json.loads(self.teacher_weights)
        super().__post_init__()
        if self.num_rounds < 1:
            raise ValueError(f"num_rounds must be at least 1, got {self.num_rounds}.")
        if self.max_steps < 1:
            raise ValueError(
                f"max_steps must be at least 1 (it counts the SFT steps of one branch in one round), got "
                f"{self.max_steps}."
            )
        if self.merge_max_rank is not None and self.merge_max_rank < 1:
            raise ValueError(f"merge_max_rank must be at least 1 or unset, got {self.merge_max_rank}.")
        if self.on_branch_divergence not in ("raise", "drop"):
            raise ValueError(f"on_branch_divergence must be 'raise' or 'drop', got {self.on_branch_divergence!r}.")
        if not 0 <= self.merge_rtol < 1:
            raise ValueError(f"merge_rtol must be in [0, 1), got {self.merge_rtol}.")
