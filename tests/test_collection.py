"""collection.py: during a run the collector walks only objects made since it started, and is left as it was; the
memory a branch freed goes back to the OS."""

from __future__ import annotations

import gc
import os
import weakref

import pytest

from merge_of_thought.collection import collect_new_objects_only, glibc, release_freed_memory


class Node:
    def __init__(self):
        self.me = self  # a reference cycle: only the collector frees it


def test_objects_made_inside_are_still_collected_and_the_freeze_is_undone():
    assert gc.get_freeze_count() == 0
    alive_before = Node()
    with collect_new_objects_only():
        assert gc.get_freeze_count() > 0  # what existed at the start is out of the collector's walk
        cycle = weakref.ref(Node())  # garbage a branch leaves behind
        gc.collect()
        assert cycle() is None
    assert gc.get_freeze_count() == 0
    assert alive_before.me is alive_before


def test_a_freeze_made_by_the_caller_is_left_alone():
    mine = Node()
    gc.freeze()
    try:
        with collect_new_objects_only():
            pass
        assert gc.get_freeze_count() > 0
        assert not any(o is mine for o in gc.get_objects())  # still frozen: the collector does not list it
    finally:
        gc.unfreeze()
    assert any(o is mine for o in gc.get_objects())


def _resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(glibc() is None, reason="malloc_trim is glibc's")
def test_release_freed_memory_returns_a_fragmented_heap_to_the_os():
    # 64 KiB blocks come from the heap (below glibc's mmap threshold); the last one stays alive and pins the top of
    # the heap, so freeing the others leaves ~128 MB of holes that glibc keeps unless asked to give them back.
    blocks = [bytearray(64 * 1024) for _ in range(2048)]
    for block in blocks:
        block[::4096] = b"\x01" * len(block[::4096])  # touch every page: resident
    pin = blocks[-1]
    del blocks
    before = _resident_mb()
    release_freed_memory()
    after = _resident_mb()
    assert before - after > 64, f"resident memory {before:.0f} MB -> {after:.0f} MB"
    assert pin[0] == 1
