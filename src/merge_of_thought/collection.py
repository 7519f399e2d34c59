"""Memory a MoT run frees between branches: collect the objects a branch leaves (not the whole process each time),
and hand the host memory they held back to the operating system.

Every SFTTrainer branch starts with accelerate's ``free_memory()``, a full ``gc.collect()``. A plain SFT run pays it
once; MoT pays it T*K times, and with transformers, TRL and datasets imported a full collection walks ~500k objects:
0.2 s a branch on a 70M student on 2 CPU cores (4 s of a T=5, K=4 run). Objects alive when the run starts (the
libraries, the model, the datasets) outlive every branch, so the run moves them to the collector's permanent
generation (``gc.freeze``) after one collection and back when it ends. Whatever a branch leaves (its trainer,
optimizer, dataloaders) is newer and is still collected at the next branch's start.

glibc keeps most memory a process frees for reuse, and a branch's activations, a merge's float64 temporaries and
the frozen adapter re-made each round at a larger rank leave holes that the next allocation does not fit, so a
run's resident memory ratchets up over its T*K branches where one SFT run of the same steps does not (a 70M nf4
student with bf16 autocast at T=5, K=4: peak RSS 1.21x the plain run's, 1.12x with the freed memory returned;
benchmarks/perf). ``release_freed_memory`` returns it once a round, after the merge and install, when the round's
branch deltas and the merge's float64 temporaries are gone. Not after every branch: the next branch allocates the
same buffers again, and each one handed back is faulted in again by its first step (SmolLM2-135M fp32, T=3 K=2:
a branch's first step 0.95-1.07x its later ones against 1.07-1.09x, peak memory 1.003x on the medians;
benchmarks/results/release_memory.md). On a GPU it also empties torch's CUDA cache: the frozen adapter an install
replaced (1.4 GB in bf16 at round 5 of an 8B student) would otherwise stay reserved through the round's evaluation
and the next branch.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import platform
from collections.abc import Iterator

from . import devices


@contextlib.contextmanager
def collect_new_objects_only() -> Iterator[None]:
    """Freeze the objects alive now for the duration; leave the collector as it was if someone froze it already."""
    if gc.get_freeze_count():  # the caller manages freezing (e.g. before forking workers): not ours to undo
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The process's C library where it is glibc (whose allocator ``mallopt`` and ``malloc_trim`` tune), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c"))


def release_freed_memory() -> None:
    """Collect unreachable new objects, then ask glibc to return the free parts of its heaps to the OS
    (``malloc_trim``; elsewhere only the collection), and torch's CUDA allocator its cached blocks to the card."""
    gc.collect()
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)
    devices.release_cached_memory()
