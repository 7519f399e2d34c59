"""What a MoT run does differently on a GPU (and on a CPU under a launcher), each a small helper the trainer calls.

- :func:`check_mixed_precision`: bf16 (TRL's default) on a CUDA GPU without bf16 (T4, RTX 20xx) says what to set
  instead of transformers' "Your setup doesn't support bf16/gpu".
- :func:`exact_fp32_matmul`: the fp32 install of a round's change into the weights (frozen.py) runs in true fp32
  even when the user turned TF32 on (``tf32=True``, ``torch.backends.fp32_precision = "tf32"``) or bf16 matmuls on
  the CPU (``torch.set_float32_matmul_precision("medium")``): TF32 rounds a product to ~1e-3, far above the 6e-8 a
  round that frozen.py documents.
- :func:`merge_threads`: the float64 merge uses this process's share of the machine's cores under torchrun, which
  sets ``OMP_NUM_THREADS=1`` and so leaves every process's merge on one thread.
- :func:`release_cached_memory`: the CUDA memory a merge or an install freed goes back to the card, so the last
  round's frozen adapter is not held reserved through the round's evaluation and the next branch.
- :func:`eval_loss_batch_size`: the eval-loss pass never runs a larger batch than training does.
- :data:`TENSOR_CORE_MULTIPLE`: the frozen adapter's rank is padded to a multiple of it where its factors are copied
  anyway (frozen.py).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from . import distributed

if TYPE_CHECKING:
    from transformers import TrainingArguments

TENSOR_CORE_MULTIPLE = 8  # bf16/fp16 (and TF32) tensor-core GEMMs want every dimension a multiple of 8


def check_mixed_precision(bf16: bool | None, fp16: bool, use_cpu: bool) -> None:
    """Refuse bf16 on a CUDA GPU that has none (before transformers does), naming the settings that work there.

    ``bf16=None`` counts as on: TRL turns it on unless ``fp16`` is set.
    """
    wants_bf16 = bf16 or (bf16 is None and not fp16)
    if not wants_bf16 or use_cpu or not torch.cuda.is_available() or torch.cuda.is_bf16_supported():
        return
    how = "bf16=True was set" if bf16 else "TRL turns bf16 on by default"
    raise ValueError(
        f"{torch.cuda.get_device_name()} has no bf16 (it needs an Ampere or newer GPU) and {how}: set "
        "bf16=False, fp16=True (on the command line --bf16 false --fp16 true) for fp16 mixed precision, or "
        "bf16=False alone for fp32."
    )


@contextlib.contextmanager
def exact_fp32_matmul() -> Iterator[None]:
    """fp32 matrix products in true fp32 (IEEE) on CUDA and the CPU for the duration, whatever the user chose.

    Reads and sets only the per-backend settings of torch's ``fp32_precision`` API (setting the legacy
    ``allow_tf32`` as well would make torch refuse to read either), and puts back exactly what was there.
    """
    settings = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    before = [backend.fp32_precision for backend in settings]
    try:
        for backend in settings:
            backend.fp32_precision = "ieee"
        yield
    finally:
        for backend, value in zip(settings, before):
            backend.fp32_precision = value


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and ``taskset`` narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def merge_thread_count() -> int:
    """Threads for this process's merge: under a launcher its share of the cores (every local process merges at
    the same time), else torch's current count, which is the user's choice."""
    launch = distributed.launcher()
    if launch is None:
        return torch.get_num_threads()
    return max(usable_cores() // max(launch.local_world_size, 1), 1)


@contextlib.contextmanager
def merge_threads() -> Iterator[int]:
    """Raise torch's thread count to :func:`merge_thread_count` for the duration (never lower it); restore it."""
    before = torch.get_num_threads()
    threads = max(merge_thread_count(), before)
    if threads != before:
        torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def release_cached_memory() -> None:
    """Return the CUDA memory torch's allocator holds but no tensor uses (a no-op before CUDA is initialised)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def eval_loss_batch_size(args: "TrainingArguments") -> int:
    """The eval-loss pass's batch: ``per_device_eval_batch_size``, at most ``per_device_train_batch_size``.

    The eval batch is also the generation batch (evaluation.py), where 16 is reasonable; a loss pass over full-length
    rows at that batch holds 16 rows of logits (at 4096 tokens and Qwen3's 152k vocabulary, 40 GB in bf16) with no
    gradient checkpointing to lean on. Training already showed that ``per_device_train_batch_size`` rows fit.
    """
    return max(min(args.per_device_eval_batch_size, args.per_device_train_batch_size), 1)
