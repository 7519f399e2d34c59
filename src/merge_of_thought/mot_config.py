"""Configuration for :class:`~merge_of_thought.MoTTrainer`: TRL's SFTConfig plus the Merge-of-Thought settings."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import warnings
from dataclasses import dataclass, field

import torch
from trl import SFTConfig

from . import devices, distributed
from .branches import BRANCH_STATES
from .evaluation import ANSWER_MATCHES
from .frozen import FROZEN_DELTA
from .weighting import TEACHER_WEIGHTINGS

logger = logging.getLogger(__name__)

EVAL_BRANCHES = ("none", "loss", "all")


_DOC_ENTRY = re.compile(r"^ {8}(\w+) \((`[^)]+?`)(?:, (?:\*optional\*|defaults to `([^`]*)`))?\): ?(.*)$")
_DOC_GROUP = re.compile(r"^ {4}(\S.*):$")


def documented_settings(cls: type | None = None) -> list[tuple[str, str, str, str | None, str]]:
    """``(group, name, type, stated default, text)`` for every parameter ``MoTConfig``'s docstring documents: the
    source of docs/configuration.md and of ``mot train --help``."""
    entries, group = [], ""
    for line in ((cls or MoTConfig).__doc__ or "").splitlines():
        if match := _DOC_GROUP.match(line):
            group = match.group(1)
        elif match := _DOC_ENTRY.match(line):
            name, kind, default, text = match.groups()
            entries.append([group, name, kind.replace("`", ""), default, text])
        elif entries and line.startswith(" " * 12):
            entries[-1][4] += " " + line.strip()
    return [tuple(entry) for entry in entries]


def mot_settings(cls: type | None = None) -> list[str]:
    """The settings MoT adds to SFTConfig, and the SFTConfig settings whose defaults it changes (init fields only:
    the others are the run's own records, such as ``baseline``)."""
    base = {f.name: f for f in dataclasses.fields(SFTConfig)}
    return [f.name for f in dataclasses.fields(cls or MoTConfig)
            if f.init and (f.name not in base or f.default != base[f.name].default)]  # fmt: skip


_DEFAULT_EPOCHS = 3.0  # TrainingArguments' num_train_epochs: a value MoT ignores, so any other one is refused


def steps_not_epochs(given: str) -> ValueError:
    """Why MoT counts steps, not epochs, and what to set instead (``given``: the setting that asked for epochs)."""
    return ValueError(
        f"{given}: MoT trains every branch for max_steps SFT steps in every round, not for epochs: a round is a "
        "fixed number of steps from the current student on each teacher, and the merge averages branches of equal "
        "length. Set max_steps (steps of one branch in one round; the paper uses 50). One epoch over a teacher of N "
        "rows is ceil(N / (per_device_train_batch_size x gradient_accumulation_steps)) steps."
    )


def has_accelerator() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _read_checkpointing_alias(config: SFTConfig) -> None:
    """Take ``gradient_checkpointing`` (TRL's documented key, True by default) as ``activation_checkpointing``.

    transformers 5 renamed it and warns about the old name whenever the new one is unset, which with TRL's default
    is every config; setting the new name from the old one keeps both keys working without that FutureWarning.
    """
    for old, new in (
        ("gradient_checkpointing", "activation_checkpointing"),
        ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
    ):
        if getattr(config, new, "absent") is None and getattr(config, old, None) is not None:
            setattr(config, new, getattr(config, old))


@dataclass
class MoTConfig(SFTConfig):
    r"""
    Every [`~trl.SFTConfig`] argument keeps its meaning inside each branch; ``max_steps`` counts the steps of ONE
    branch in ONE round (the paper trains 50). The run trains ``num_rounds x len(teachers) x max_steps`` steps.

    Parameters that differ from SFTConfig:
        max_steps (`int`, defaults to `50`): SFT steps per branch per round.
        bf16 (`bool` or `None`): as in TRL, except that on a machine without a GPU it defaults to `False`: bf16
            autocast on CPUs without native bf16 ran TRL's SFT steps 57-70x slower than fp32 (an AMD EPYC without
            AVX512: 57x for an fp32 and 34x for an nf4 student, benchmarks/results/cpu_bf16.md). On a CPU with
            AVX512-BF16 or AMX, whole MoT runs of SmolLM2-135M in nf4 took 0.75x the time at the same accuracy
            (+0.003 over 3 seeds), but the demo's tiny student lost 0.13 and ran 1.35x slower
            (benchmarks/results/cpu_bf16_accuracy.md), so the default stays `False`: set it for a real model on
            such a CPU. `True` without a GPU sets `use_cpu` (transformers refuses bf16 there otherwise).
        dataloader_pin_memory (`bool`): `False` on a machine without a GPU, where pinning does nothing (and torch
            warns about it in every branch).
        gradient_checkpointing (`bool`, defaults to `True`): as in TRL; read as transformers'
            `activation_checkpointing` (its new name), so either key works without transformers' FutureWarning.
        per_device_eval_batch_size (`int`): the generation batch of the accuracy eval; the eval-loss pass runs at
            most `per_device_train_batch_size` rows, whose full-length logits training showed fit (devices.py).
        bf16 on a CUDA GPU without bf16 (T4, RTX 20xx): raises, saying to set `bf16=False, fp16=True`.

    MoT parameters:
        num_rounds (`int`, defaults to `5`): rounds of branch-train-merge.
        teacher_weights (`dict[str, float]`, *optional*): merge weight per teacher name, summing to 1; uniform
            when unset.
        teacher_weighting (`str`, defaults to `"fixed"`): how each round weighs its branches in the merge
            (weighting.py). `"fixed"` (the paper): `teacher_weights` every round. `"eval_accuracy"`: proportional to
            each branch's own accuracy (pass@1) on `eval_dataset` that round (uniform when all score 0), so a teacher
            whose traces the student does not learn gets little of the average. It needs an `eval_dataset` with
            answers, `eval_accuracy_samples > 0`, `eval_branches="all"` (its default then) and `teacher_weights`
            unset; use held-out problems that are not your test set. Every round's weights go to metrics.jsonl,
            `round.json` and the model card.
        merge_step_size (`float`, defaults to `1.0`): outer step size: each round adds
            ``merge_step_size * sum_k w_k dW_k`` to the student. 1.0 is the paper's plain average; larger values
            extrapolate along the averaged update (an idea beyond the paper: averaging branches that went different
            ways shrinks the step). On SmolLM2, 1.5 and 2 scored no better and forgot 4.5x and 9x as much
            (benchmarks/real_student/README.md); keep 1.0 unless your own validation says otherwise.
        branch_state (`str`, defaults to `"fresh"`): `"fresh"` (the paper) starts every branch of every round from a
            new LoRA adapter and optimizer. `"persistent"` keeps each teacher's LoRA factors and optimizer state
            from round to round, re-based onto the student by a frozen offset so it still starts each round exactly
            at the merged student: no LoRA restart, and with a constant `merge_step_size` the exact merged delta
            stays at rank K*r (branches.py). The per-round learning-rate schedule still restarts.
        frozen_delta (`str`, defaults to `"auto"`): where the merged delta lives while branches train (frozen.py).
            `"weights"` adds it into the base weights, which must be fp32 `nn.Linear` weights: no cost per step
            (fp32 rounding adds ~6e-8 of |W| a round). `"adapter"` keeps it in a frozen LoRA adapter beside the
            branch: exact on 4-bit, 8-bit and bf16 bases too; the branch computes it in its own low-rank pass
            (fused.py), so each step pays for its rank, which grows with the rounds. The adapter holds fp32
            factors, or under bf16/fp16 mixed precision the autocast-dtype copy the step would cast them to anyway
            (same arithmetic, half the memory). `"auto"`: `"weights"` for an fp32 student, else `"adapter"`. Either
            way the exact fp32 low-rank factors are kept for checkpoints and exports (in memory, or in the round
            checkpoint, read one layer at a time).
        shared_branch_init (`bool`, defaults to `False`): start every branch of a round from the same random LoRA
            ``A`` (the data order still differs per branch). Branches with independent inits learn in different
            random subspaces, so their average keeps only part of each; see benchmarks/quality/README.md.
        merge_max_rank (`int`, *optional*): rank budget of the merged delta per layer. Unset keeps it exact (up to
            `merge_tolerance`), and the frozen merged adapter then grows by up to K*r ranks a round, which every
            later step pays for in time and memory. A budget (K*r holds every round at the round-2 cost) truncates
            through an SVD of the factors and logs the error it made (README, "Performance").
        merge_tolerance (`float`, defaults to `1e-4`): each merge may drop singular directions of the merged delta
            whose total Frobenius norm is at most this fraction of the round's update ``|sum_k w_k dW_k|``. It
            keeps the merged rank (and the cost of the frozen adapter in every later step) as small as the data
            allow while staying 10x inside the 1e-3 fidelity bound. 0 keeps every non-zero direction. With fresh
            branches and no `merge_max_rank` it applies to the round's update alone, which the merge appends to
            the merged factors without factoring them again (docs/algorithm.md).
        allow_single_teacher (`bool`, defaults to `False`): allow one teacher (MoT then is SFT with restarts).
        max_truncated_fraction (`float`, defaults to `0.05`): the largest share of a teacher's traces that
            `max_length` may cut. Before the model loads, every teacher's token lengths under the student's tokenizer
            are reported against `max_length` (TRL's default of 1024 cuts long chain of thought silently); a run
            that would cut more than this share of one teacher's traces is refused with the lengths that keep 95%
            and 100% of them. 1.0 allows any cut.
        save_branch_adapters (`bool`, defaults to `True`): keep each branch's adapter in its round folder so the
            merge can be recomputed from disk. (They are always written, as checkpoints; with `False` a round's
            branch adapters are deleted once the round is merged.)
        on_branch_divergence (`str`, defaults to `"raise"`): what a branch whose loss turns NaN or inf does:
            `"raise"` stops the run with an error naming the teacher, round and step (every completed branch and
            round stays on disk, resumable); `"drop"` leaves that branch out of the round's merge, renormalises the
            other teachers' weights, and logs a `dropped_branch` record in metrics.jsonl.
        overwrite_output_dir (`bool`, defaults to `False`): let a new run (not a resume) replace a MoT run already
            in `output_dir`. Without it such a folder is refused, so two runs are never mixed.

    Per-round evaluation (on the trainer's ``eval_dataset``; docs/evaluation.md says what each part costs). The merged
    student is evaluated before round 1 (round 0) and after every round: its eval loss on the rows SFT can score
    (messages with an assistant turn, prompt + completion, text; a prompt + answer set has none and skips it), and
    with `eval_accuracy_samples` its pass@1, whose generations go to `round-XXX/eval.jsonl` in the run folder.
        eval_accuracy_samples (`int`, defaults to `0`): the number of eval PROBLEMS (rows, the first ones) scored by
            generation every round (0: off); each is sampled `eval_num_samples` times. Columns read: `prompt` (text
            or chat messages) or `messages`, and `answer` (else `completion`, else the last assistant turn); see
            `evaluation.prompts_and_answers`. A row without an answer is an error before the model loads.
        eval_num_samples (`int`, defaults to `1`): completions per problem; `eval_accuracy` is their mean (pass@1
            over samples, as open-r1 and lighteval report it). 1 decodes greedily; more sample at `eval_temperature`
            and `eval_top_p`, seeded from `seed` and the round, so a rerun draws the same completions.
        eval_temperature (`float`, defaults to `0.6`): sampling temperature when `eval_num_samples > 1`.
        eval_top_p (`float`, defaults to `0.95`): nucleus sampling when `eval_num_samples > 1`.
        eval_max_new_tokens (`int`, defaults to `256`): generation budget per sample.
        eval_branches (`str`, defaults to `"loss"`; `"all"` with `teacher_weighting="eval_accuracy"`): what each
            branch (the student plus that branch's own update, before the merge) is evaluated on, into its `branch`
            record in metrics.jsonl, TensorBoard (`<teacher>/eval_loss`, `<teacher>/eval_accuracy`) and the model
            card: `"none"`, `"loss"` (its eval loss: one forward pass over the eval set) or `"all"` (eval loss and
            generation accuracy; its generations are not written). Branches that score well while their average
            does not are teachers the weight average cannot reconcile. `True`/`False` (older configs) read as
            `"all"`/`"none"`.
        answer_match (`str`, defaults to `"math"`): how a completion is judged (`evaluation.is_correct`). `"math"`:
            math-verify, `verify(parse(gold), parse(answer))`, on the text after the last `</think>` (a reasoning
            that never closes scores 0); gold answers it cannot parse are skipped and counted (`eval_skipped`).
            `"numeric"` compares numbers when both sides parse as one, `"exact"` the normalized strings.
        answer_pattern (`str`, *optional*): regex for the final answer (first group if any). Unset: math-verify's
            extraction for `"math"` (`\boxed{...}` first, then an answer it can parse), else the last
            `\boxed{...}`, else the text after `####`.
    """

    _VALID_DICT_FIELDS = SFTConfig._VALID_DICT_FIELDS + ["teacher_weights"]

    max_steps: int = field(default=50, metadata={"help": "SFT steps per branch per round (the paper uses 50)."})
    num_rounds: int = field(default=5, metadata={"help": "Number of branch-train-merge rounds."})
    teacher_weights: dict[str, float] | str | None = field(
        default=None,
        metadata={"help": "Merge weight per teacher name, summing to 1 (JSON on the command line). Uniform if unset."},
    )
    teacher_weighting: str = field(
        default="fixed",
        metadata={"help": "Merge weights per round: 'fixed' (teacher_weights, uniform if unset; the paper) or "
                  "'eval_accuracy' (the branches' own eval accuracy that round).", "choices": list(TEACHER_WEIGHTINGS)},
    )
    merge_step_size: float = field(
        default=1.0,
        metadata={"help": "Each round adds merge_step_size x the weighted average of the branch deltas (1 = paper)."},
    )
    branch_state: str = field(
        default="fresh",
        metadata={"help": "'fresh' (new LoRA + optimizer per round, the paper) or 'persistent' (kept across rounds).",
                  "choices": list(BRANCH_STATES)},
    )
    frozen_delta: str = field(
        default="auto",
        metadata={"help": "Where the merged delta lives while branches train: 'auto', 'weights' (fp32 students) or "
                  "'adapter'.", "choices": list(FROZEN_DELTA)},
    )
    shared_branch_init: bool = field(
        default=False, metadata={"help": "Start every branch of a round from the same random LoRA A."}
    )
    merge_max_rank: int | None = field(
        default=None,
        metadata={"help": "Rank budget of the merged delta per layer; unset keeps the merge exact."},
    )
    merge_tolerance: float = field(
        default=1e-4,
        metadata={"help": "Largest norm a merge may drop, as a fraction of the round's update (0 = keep all)."},
    )
    allow_single_teacher: bool = field(
        default=False, metadata={"help": "Allow a run with one teacher (SFT with periodic restarts)."}
    )
    max_truncated_fraction: float = field(
        default=0.05,
        metadata={"help": "Largest share of a teacher's traces max_length may cut; more is refused before the model "
                  "loads, with the lengths that keep 95 and 100 percent (1.0 allows any cut)."},
    )
    save_branch_adapters: bool = field(
        default=True, metadata={"help": "Save every branch adapter in PEFT format in its round folder."}
    )

    eval_accuracy_samples: int = field(
        default=0, metadata={"help": "Eval problems (rows) scored by generation every round (0 turns it off)."}
    )
    eval_num_samples: int = field(
        default=1, metadata={"help": "Completions per eval problem, averaged (pass@1); 1 decodes greedily."}
    )
    eval_temperature: float = field(default=0.6, metadata={"help": "Sampling temperature when eval_num_samples > 1."})
    eval_top_p: float = field(default=0.95, metadata={"help": "Sampling top_p when eval_num_samples > 1."})
    eval_max_new_tokens: int = field(default=256, metadata={"help": "Tokens generated per eval sample."})
    eval_branches: str | None = field(
        default=None,
        metadata={"help": "What each branch is evaluated on before the merge: 'none', 'loss' (default) or 'all' "
                  "(loss and generation accuracy; the default with teacher_weighting='eval_accuracy').",
                  "choices": list(EVAL_BRANCHES)},
    )
    answer_pattern: str | None = field(
        default=None, metadata={"help": "Regex for the final answer; default: math-verify's extraction (math), or "
                                "the last \\boxed{...}, else after '####'."}
    )
    answer_match: str = field(
        default="math",
        metadata={"help": "How answers are judged: 'math' (math-verify, after </think>), 'numeric' or 'exact'.",
                  "choices": list(ANSWER_MATCHES)},
    )
    on_branch_divergence: str = field(
        default="raise",
        metadata={"help": "On a NaN/inf loss in a branch: 'raise' (stop, resumable) or 'drop' (merge the others).",
                  "choices": ["raise", "drop"]},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Let a new run replace a MoT run already in output_dir."}
    )
    # set by baselines.baseline_run (not a config key): the equal-compute baseline this run is, for mot_run.json
    baseline: dict | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        distributed.detach_from_launcher()  # before the device set-up: each branch trains in one process
        devices.check_mixed_precision(self.bf16, self.fp16, self.use_cpu)  # before transformers' vaguer error
        no_gpu = not has_accelerator()
        on_cpu = self.use_cpu or no_gpu
        if self.bf16 is None and not self.fp16 and on_cpu:
            # documented above; at INFO it was printed before every command's output, errors included
            logger.debug("No GPU found: MoTConfig sets bf16=False (bf16 autocast is very slow on most CPUs).")
            self.bf16 = False
        elif self.bf16 and on_cpu and not _cpu_has_native_bf16():
            warnings.warn(
                "bf16=True on a CPU without native bf16: SFT steps can run ~70x slower than with bf16=False.",
                stacklevel=3,
            )
        if self.bf16 and no_gpu:
            self.use_cpu = True  # transformers refuses bf16 without a GPU unless told to train on the CPU
        if on_cpu:
            self.dataloader_pin_memory = False  # pinned memory needs a GPU; torch warns in every branch otherwise
        _read_checkpointing_alias(self)
        if isinstance(self.teacher_weights, str):
            self.teacher_weights = json.loads(self.teacher_weights)
        with distributed.device_setup_on_pinned_gpu():
            super().__post_init__()
        distributed.pin_device(self)
        if self.num_rounds < 1:
            raise ValueError(f"num_rounds must be at least 1, got {self.num_rounds}.")
        if self.max_steps == -1:  # TRL's "train for num_train_epochs"
            raise steps_not_epochs("max_steps=-1 (train for num_train_epochs)")
        if self.num_train_epochs != _DEFAULT_EPOCHS:
            raise steps_not_epochs(f"num_train_epochs={self.num_train_epochs:g}")
        if self.max_steps < 1:
            raise ValueError(
                f"max_steps must be at least 1 (it counts the SFT steps of one branch in one round), got "
                f"{self.max_steps}."
            )
        if not (self.merge_step_size > 0 and math.isfinite(self.merge_step_size)):
            raise ValueError(f"merge_step_size must be a positive number, got {self.merge_step_size}.")
        if self.merge_max_rank is not None and self.merge_max_rank < 1:
            raise ValueError(f"merge_max_rank must be at least 1 or unset, got {self.merge_max_rank}.")
        if not 0 <= self.max_truncated_fraction <= 1:
            raise ValueError(f"max_truncated_fraction must be in [0, 1], got {self.max_truncated_fraction}.")
        if not 0 <= self.merge_tolerance <= 1e-3:
            raise ValueError(
                f"merge_tolerance must be in [0, 1e-3] (the merge fidelity bound), got {self.merge_tolerance}; use "
                "merge_max_rank for a lossy rank budget."
            )
        self._check_evaluation()
        if self.teacher_weighting not in TEACHER_WEIGHTINGS:
            raise ValueError(f"teacher_weighting must be one of {TEACHER_WEIGHTINGS}, got {self.teacher_weighting!r}.")
        if self.teacher_weighting == "eval_accuracy":
            needs = [need for need, missing in (
                ("eval_accuracy_samples > 0 (the branches are weighted by their generation accuracy)",
                 self.eval_accuracy_samples < 1),
                ("eval_branches='all' (each branch is scored before the merge)", self.eval_branches != "all"),
                ("teacher_weights unset (the weights come from the scores)", self.teacher_weights is not None),
            ) if missing]  # fmt: skip
            if needs:
                raise ValueError("teacher_weighting='eval_accuracy' needs " + "; ".join(needs) + ".")
        if self.branch_state not in BRANCH_STATES:
            raise ValueError(f"branch_state must be 'fresh' or 'persistent', got {self.branch_state!r}.")
        if self.frozen_delta not in FROZEN_DELTA:
            raise ValueError(f"frozen_delta must be one of {FROZEN_DELTA}, got {self.frozen_delta!r}.")
        if self.on_branch_divergence not in ("raise", "drop"):
            raise ValueError(f"on_branch_divergence must be 'raise' or 'drop', got {self.on_branch_divergence!r}.")

    def _check_evaluation(self) -> None:
        """Resolve ``eval_branches`` (old configs' booleans; "all" when the weighting needs the branches' accuracy)
        and check the eval settings."""
        if isinstance(self.eval_branches, bool):
            self.eval_branches = "all" if self.eval_branches else "none"
        if self.eval_branches is None:
            self.eval_branches = "all" if self.teacher_weighting == "eval_accuracy" else "loss"
        if self.eval_branches not in EVAL_BRANCHES:
            raise ValueError(f"eval_branches must be one of {EVAL_BRANCHES}, got {self.eval_branches!r}.")
        if self.answer_match not in ANSWER_MATCHES:
            raise ValueError(f"answer_match must be one of {ANSWER_MATCHES}, got {self.answer_match!r}.")
        if self.eval_accuracy_samples < 0:
            raise ValueError(f"eval_accuracy_samples must be 0 (off) or positive, got {self.eval_accuracy_samples}.")
        if self.eval_num_samples < 1:
            raise ValueError(f"eval_num_samples must be at least 1 (1 decodes greedily), got {self.eval_num_samples}.")
        if self.eval_num_samples > 1 and not (self.eval_temperature > 0 and 0 < self.eval_top_p <= 1):
            raise ValueError(
                f"sampled evals need eval_temperature > 0 and 0 < eval_top_p <= 1, got {self.eval_temperature} and "
                f"{self.eval_top_p}."
            )
