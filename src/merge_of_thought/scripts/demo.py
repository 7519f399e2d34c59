"""``mot demo``: a complete MoT distillation offline on the CPU (a 4-bit student, four synthetic teachers).

``--student smollm2-135m`` distils into a real pretrained LM instead of the shipped tiny one, with its own defaults
(``mot demo --student smollm2-135m --help`` shows them)."""

from __future__ import annotations

import argparse
from dataclasses import fields

from ..demo.run import DemoSettings, demo_settings, quiet, run_demo
from .console import add_verbose_flag, run_command


def make_parser(prog: str | None = "mot demo", student: str = "tiny", add_help: bool = True) -> argparse.ArgumentParser:
    """The demo's options, with ``student``'s defaults."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, add_help=add_help)
    defaults = demo_settings(student)
    for f in fields(DemoSettings):
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        options = {"help": "default: %(default)s", **f.metadata}
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, **options)
        else:
            parser.add_argument(flag, type=type(value) if value is not None else str, default=value, **options)
    add_verbose_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(run, argv)


def run(argv: list[str]) -> int:
    student = make_parser(add_help=False).parse_known_args(argv)[0].student  # its defaults apply to the rest
    options = vars(make_parser(student=student).parse_args(argv))
    options.pop("verbose")
    settings = DemoSettings(**options)
    quiet()
    rows = run_demo(settings)
    return 0 if rows[-1][1] > rows[0][1] else 1


if __name__ == "__main__":
    raise SystemExit(main())
