"""collection.py: during a run the collector walks only objects made since it started, and is left as it was."""

from __future__ import annotations

import gc
import weakref

from merge_of_thought.collection import collect_new_objects_only


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
