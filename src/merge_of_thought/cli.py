"""The ``mot`` command: ``mot demo``, ``mot train --config cfg.yaml`` and friends.

Each subcommand lives in ``merge_of_thought/scripts/<name>.py`` and exposes ``make_parser(prog)`` and
``main(argv)``, as TRL's scripts do, so it also runs as ``python -m merge_of_thought.scripts.<name>``.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": "Run a complete MoT distillation offline on the CPU in a few minutes",
    "train": "Run MoT from a TRL-style YAML config (teachers: one data set per branch)",
    "export": "Export a run as one LoRA adapter on the original base and/or a merged model, with a model card",
    "compare": "Compare MoT runs and their baselines: one table of eval results and a plot of the curves",
    "merge": "Merge LoRA adapters of one base exactly (or with TIES/DARE) into one adapter or a merged model",
    "student": "Print the local folder of a named student (smollm2-135m: converted from PyPI on first use)",
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: mot <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "Run 'mot <command> --help' for a command's options. Every command takes --verbose: on an error it"]
    lines += ["prints the full traceback, not just the one-line message."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"merge-of-thought {__version__}")
        return 0
    if argv[0] == "--verbose":  # `mot --verbose train ...` means `mot train ... --verbose`
        argv = [*argv[1:], "--verbose"]
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mot: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"merge_of_thought.scripts.{name}")
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
