"""docs/configuration.md documents every MoT setting with its real type and default, and is up to date."""

from __future__ import annotations

import sys
from pathlib import Path

from merge_of_thought.mot_config import MoTConfig, documented_settings, mot_settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs"))
from make_config_reference import PAGE, field_default, render  # noqa: E402


def _same(stated: str, actual: str) -> bool:
    try:
        return float(stated) == float(actual)
    except ValueError:
        return stated == actual


def test_every_mot_setting_is_documented_with_its_default():
    documented = {name: default for _, name, _, default, _ in documented_settings(MoTConfig)}
    missing = [name for name in mot_settings(MoTConfig) if name not in documented]
    assert not missing, f"MoTConfig fields without an entry in its docstring: {missing}"
    wrong = {name: (stated, field_default(MoTConfig, name)) for name, stated in documented.items()
             if stated is not None and not _same(stated, field_default(MoTConfig, name))}  # fmt: skip
    assert not wrong, f"docstring defaults that differ from the fields (stated, actual): {wrong}"


def test_the_reference_page_is_up_to_date():
    assert PAGE.read_text() == render(), "docs/configuration.md is stale: run `python docs/make_config_reference.py`"
