"""``mot demo``: a complete MoT distillation offline on the CPU (a tiny 4-bit student, four synthetic teachers)."""

from __future__ import annotations

import argparse
from dataclasses import fields

from ..demo.run import DemoSettings, quiet, run_demo
from .console import add_verbose_flag, run_command


def make_parser(prog: str | None = "mot demo") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    defaults = DemoSettings()
    for f in fields(DemoSettings):
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=type(value) if value is not None else str, default=value)
    add_verbose_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(run, argv)


def run(argv: list[str]) -> int:
    options = vars(make_parser().parse_args(argv))
    options.pop("verbose")
    settings = DemoSettings(**options)
    quiet()
    rows = run_demo(settings)
    return 0 if rows[-1][1] > rows[0][1] else 1


if __name__ == "__main__":
    raise SystemExit(main())
