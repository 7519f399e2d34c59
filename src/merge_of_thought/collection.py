"""Python's garbage collector during a MoT run: collect the objects a branch leaves, not the whole process each time.

Every SFTTrainer branch starts with accelerate's ``free_memory()``, a full ``gc.collect()``. A plain SFT run pays it
once; MoT pays it T*K times, and with transformers, TRL and datasets imported a full collection walks ~500k objects:
0.2 s a branch on a 70M student on 2 CPU cores (4 s of a T=5, K=4 run). Objects alive when the run starts (the
libraries, the model, the datasets) outlive every branch, so the run moves them to the collector's permanent
generation (``gc.freeze``) after one collection and back when it ends. Whatever a branch leaves (its trainer,
optimizer, dataloaders) is newer and is still collected at the next branch's start.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


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
