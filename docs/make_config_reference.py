"""Regenerate docs/configuration.md, the reference of every MoT setting, from ``MoTConfig`` itself.

    python docs/make_config_reference.py

Types and defaults come from the dataclass fields, the text from ``MoTConfig``'s docstring (as TRL's documentation
is built from its configs' docstrings); ``tests/test_config_reference.py`` fails when a field has no entry, an entry
states another default than the field, or this page is out of date.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "configuration.md"

_ENTRY = re.compile(r"^ {8}(\w+) \((`[^)]+?`)(?:, (?:\*optional\*|defaults to `([^`]*)`))?\): ?(.*)$")
_GROUP = re.compile(r"^ {4}(\S.*):$")

INTRO = """# Configuration reference

`MoTConfig` is TRL's [`SFTConfig`](https://huggingface.co/docs/trl/sft_trainer#trl.SFTConfig) plus the settings
below. Every SFTConfig argument keeps its meaning inside each branch (learning rate, batch, `max_length`, LoRA via
the PEFT config, ...); `max_steps` counts the steps of one branch in one round. In a `mot train` YAML every key
below is a top-level key; in Python, `MoTConfig(key=value, ...)`.

Generated from `MoTConfig` by `python docs/make_config_reference.py` (types and defaults from its fields, the text
from its docstring); `tests/test_config_reference.py` keeps it in step.
"""


def docstring_entries(cls: type) -> list[tuple[str, str, str, str | None, str]]:
    """``(group, name, type, stated default, text)`` for every parameter the class docstring documents."""
    entries, group = [], ""
    for line in (cls.__doc__ or "").splitlines():
        if match := _GROUP.match(line):
            group = match.group(1)
        elif match := _ENTRY.match(line):
            name, kind, default, text = match.groups()
            entries.append([group, name, kind.replace("`", ""), default, text])
        elif entries and line.startswith(" " * 12):
            entries[-1][4] += " " + line.strip()
    return [tuple(entry) for entry in entries]


def field_default(cls: type, name: str) -> str:
    """A field's default as the docstring writes it (``5``, ``"fresh"``, ``None``)."""
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    return repr(value).replace("'", '"')


def mot_fields(cls: type) -> list[str]:
    """The fields MoT adds to SFTConfig, and the SFTConfig fields whose defaults it changes."""
    from trl import SFTConfig

    base = {f.name: f for f in dataclasses.fields(SFTConfig)}
    return [f.name for f in dataclasses.fields(cls) if f.name not in base or f.default != base[f.name].default]


def render() -> str:
    from merge_of_thought import MoTConfig

    lines, current = [INTRO], None
    for group, name, kind, _, text in docstring_entries(MoTConfig):
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
