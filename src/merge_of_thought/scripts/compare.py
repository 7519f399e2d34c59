"""``mot compare``: MoT runs and their baselines side by side, so "did MoT help on my data" is one command.

    mot train --config cfg.yaml --output_dir runs/mot
    mot train --config cfg.yaml --output_dir runs/mtd --baseline mtd
    mot train --config cfg.yaml --output_dir runs/std --baseline std --baseline_teacher r1
    mot compare runs/mot runs/mtd runs/std --plot compare.png

Prints one Markdown table (kind, teachers, SFT steps, the last round's eval loss and accuracy, the best and the
last round) and writes the eval curves of every run against the SFT steps trained (``compare.png``, and
``compare-accuracy.png`` where accuracy was measured; matplotlib: the ``plot`` extra). Reads ``mot_run.json`` and
``metrics.jsonl`` only; writes nothing into the run folders.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..comparison import comparison_table, plot_runs, read_run
from ..plots import PLOT_HINT, pyplot
from .console import add_verbose_flag, run_command

DEFAULT_PLOT = "mot_compare.png"


def make_parser(prog: str | None = "mot compare") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="output_dir of each run (MoT or baseline).")
    parser.add_argument("--plot", default=DEFAULT_PLOT, metavar="PNG", help=f"Where the curves go ({DEFAULT_PLOT}).")
    parser.add_argument("--no-plot", action="store_true", help="Print the table only.")
    add_verbose_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    return run_command(lambda rest: run(parser.parse_args(rest)), argv)


def run(args: argparse.Namespace) -> int:
    runs = [read_run(folder) for folder in args.runs]  # every folder checked before anything is printed
    print(comparison_table(runs))
    if args.no_plot:
        return 0
    if pyplot() is None:
        print(f"mot compare: note: matplotlib is not installed, so no plot was written: {PLOT_HINT}.", file=sys.stderr)
        return 0
    written = plot_runs(runs, Path(args.plot).resolve())  # the full path: where to look
    if written:
        print(f"Curves per round: {', '.join(written)}")
    else:
        print("mot compare: note: no run was evaluated (no eval_dataset), so there are no curves to plot.",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
