"""Regenerate docs/configuration.md, the reference of every MoT setting, from ``MoTConfig`` itself.

    python docs/make_config_reference.py

Types and defaults come from the dataclass fields, the text from ``MoTConfig``'s docstring (as TRL's documentation
is built from its configs' docstrings); ``tests/test_config_reference.py`` fails when a field has no entry, an entry
states another default than the field, or this page is out of date.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "configuration.md"

INTRO = """# Configuration reference

`MoTConfig` is TRL's [`SFTConfig`](https://huggingface.co/docs/trl/sft_trainer#trl.SFTConfig) plus the settings
below. Every SFTConfig argument keeps its meaning inside each branch (learning rate, batch, `max_length`, LoRA via
the PEFT config, ...); `max_steps` counts the steps of one branch in one round. In a `mot train` YAML every key
below is a top-level key; in Python, `MoTConfig(key=value, ...)`.

Generated from `MoTConfig` by `python docs/make_config_reference.py` (types and defaults from its fields, the text
from its docstring); `tests/test_config_reference.py` keeps it in step.
"""


def field_default(cls: type, name: str) -> str:
    """A field's default as the docstring writes it (``5``, ``"fresh"``, ``None``)."""
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    return repr(value).replace("'", '"')


def render() -> str:
    from merge_of_thought.mot_config import MoTConfig, documented_settings

    lines, current = [INTRO], None
    for group, name, kind, _, text in documented_settings(MoTConfig):
        if group != current:
            current = group
            lines += [f"\n## {group}\n", "| setting | type | default | what it does |", "| --- | --- | --- | --- |"]
        default = field_default(MoTConfig, name) if name in {f.name for f in dataclasses.fields(MoTConfig)} else "-"
        lines.append(f"| `{name}` | `{kind}` | `{default}` | {text.replace('|', '&#124;')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    PAGE.write_text(render())
    print(f"wrote {PAGE.relative_to(ROOT)}")
