"""Issue 39's learning-rate grid on the real student: every method at every rate (one seed), each method's rate
chosen by its accuracy on the validation problems (held-out problems 100-149, or more with ``--validation``; never
the 100 scored ones).

    python benchmarks/real_student/lr_grid.py                      # shared regime, seed 0, rates 2e-4 5e-4 1e-3 2e-3
    python benchmarks/real_student/lr_grid.py --rates 1e-3 2e-3    # some rates now, the others later (runs cached)
    python benchmarks/real_student/lr_grid.py --cached-only        # the table from the runs cached so far
    python benchmarks/real_student/lr_grid.py --compare-seeds 0 1 2   # then each row at its chosen rate, 3 seeds
    python benchmarks/real_student/lr_grid.py --regime multiply --validation 200 --rates 5e-4 1e-3 2e-3 \
        --methods mot std-left --exploratory mtd-parallel     # the products grid: 200 validation problems
    python benchmarks/real_student/lr_grid.py --regime multiply --validation 200 --rounds 10 ...   # T=10's runs

Each rate is one ``run.py --learning-rate <rate>`` (its own cache folder, so the grid resumes in a later session);
this script only reads their validation accuracies and applies the rule written in README.md before the grid ran:
the best validation accuracy wins, a tie goes to the smaller rate, and a choice at the grid's edge asks for the
next rate beyond it. The comparison pairs rows read from different rates' folders, so it may pair runs made on
different CPUs; its table then names each seed's run's machine. Writes
benchmarks/results/real_student_lr_grid{_<regime>}.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("real_student_run", HERE / "run.py")
run = importlib.util.module_from_spec(_spec)
sys.modules["real_student_run"] = run
_spec.loader.exec_module(run)

RATES = (2e-4, 5e-4, 1e-3, 2e-3)
# The shared regime's pre-registered rows (README.md, "Learning rate per method"): MoT, MTD (read as MTD-50 and
# MTD-200), its best STD (verbose, on 3 seeds at 5e-4) and the data-parallel control.
METHODS, EXPLORATORY = ("mot", "mtd", "std-verbose"), ("mtd-parallel",)


def choose(validation: dict[float, float]) -> dict:
    """The rule fixed before the grid ran: the best validation accuracy, a tie to the smaller rate; ``edge`` when
    the choice is the smallest or largest rate the row has run (the next rate beyond it is owed)."""
    best = min(validation, key=lambda rate: (-validation[rate], rate))
    return {"rate": best, "validation_accuracy": validation[best],
            "edge": len(validation) > 1 and best in (min(validation), max(validation))}  # fmt: skip


def grid_table(by_rate: dict[float, dict], rates: list[float]) -> dict[str, dict]:
    """Per reported row: each rate's validation and held-out accuracy (seed's values), and the chosen rate."""
    rows: dict[str, dict] = {}
    for rate in rates:
        summary = by_rate.get(rate)
        if summary is None:
            continue
        for label, val in summary.get("validation_accuracy", {}).items():
            held = summary["methods"][label]["accuracy"]["mean"]
            rows.setdefault(label, {"rates": {}})["rates"][rate] = {"validation": val["mean"], "held_out": held}
    for row in rows.values():
        row["choice"] = choose({r: v["validation"] for r, v in row["rates"].items()})
    return rows


def markdown(rows: dict[str, dict], rates: list[float], command: str, regime: str, seed: int,
             validation: int = run.Setting.validation, held_out: int = run.Setting.held_out,
             rounds: int | None = None) -> str:  # fmt: skip
    lines = [f"# Learning rate per method: SmolLM2-135M-Instruct in nf4, {regime} regime, seed {seed}"
             + ("" if rounds is None else f", T={rounds} rounds"), "",
             f"Command: `{command}`. Design and rule: benchmarks/real_student/README.md. Each cell: accuracy on the "
             f"{validation} validation problems (what chooses) / on the {held_out} held-out problems (reported, "
             "never used to choose). "
             "Chosen: the best validation accuracy, a tie to the smaller rate; *edge*: the choice is the smallest "
             "or largest rate its row has run, so the next rate beyond it is owed.", "",
             "| row | " + " | ".join(f"{r:g}" for r in rates) + " | chosen |",
             "|---|" + "---:|" * len(rates) + "---|"]  # fmt: skip
    digits = 2 if validation <= 100 else 3  # steps of 0.005 on 200 problems
    for label, row in rows.items():
        cells = [f"{row['rates'][r]['validation']:.{digits}f} / {row['rates'][r]['held_out']:.2f}"
                 if r in row["rates"] else "-" for r in rates]  # fmt: skip
        choice = row["choice"]
        cells.append(f"{choice['rate']:g}" + (" (edge)" if choice["edge"] else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_rate(args: argparse.Namespace, rate: float, seeds: list[int], methods: list[str], reports: str) -> dict:
    """``run.py`` at one rate for ``seeds`` and ``methods`` (its report to ``reports``, not kept): its summary, or
    {} where ``--cached-only`` finds no run of the rate yet."""
    call = ["--regime", args.regime, "--seeds", *map(str, seeds), "--learning-rate", f"{rate:g}",
            "--methods", *methods, "--work-dir", args.work_dir, "--results-dir", reports,
            *(["--cached-only"] if args.cached_only else []),
            *(["--across-machines"] if args.across_machines else []),
            *(["--validation", str(args.validation)] if args.validation is not None else []),
            *(["--rounds", str(args.rounds)] if args.rounds is not None else []),
            *(["--quick"] if args.quick else [])]  # fmt: skip
    try:
        return run.main(call)
    except SystemExit as nothing_cached:
        if not isinstance(nothing_cached.code, str):  # a usage error (argparse exits 2): not a rate to skip
            raise
        print(f"rate {rate:g}: {nothing_cached}", flush=True)
        return {}


def compare(args: argparse.Namespace, rows: dict[str, dict], reports: str) -> dict[str, dict]:
    """Each row at its chosen rate on ``--compare-seeds``: accuracy, forgetting (both probes) and, paired on the
    seeds both have, MoT minus the row."""
    method_of = {run.Job(m, 0).name: m for m in [*args.methods, *args.exploratory]}
    chosen: dict[float, dict[str, str]] = {}  # rate: {row: method}; MTD-50 and MTD-200 both read MTD's run
    for label, row in rows.items():
        chosen.setdefault(row["choice"]["rate"], {})[label] = method_of.get(label, "mtd")
    table: dict[str, dict] = {}
    for rate, labels in sorted(chosen.items()):
        summary = run_rate(args, rate, args.compare_seeds, sorted(set(labels.values())), reports)
        for label, method in labels.items():
            if label in summary.get("methods", {}):
                row = summary["methods"][label]
                facts = summary["facts"].get(label)
                table[label] = {"rate": rate, "seeds": row["seeds"], "accuracy": row["accuracy"],
                                "forgetting": row["forgetting"], "facts_kept": facts and facts["facts_kept"],
                                "machines": [summary["run_machines"][run.Job(method, 0).name][seed]
                                             for seed in row["seeds"]]}  # fmt: skip
    for label, row in table.items():
        paired = run.quality.paired_difference(table["MoT"], row) if "MoT" in table and label != "MoT" else None
        if paired:
            row["mot_minus"] = paired
    return table


def comparison_markdown(table: dict[str, dict]) -> str:
    """The comparison at the chosen rates: one row per method, paired differences against MoT; where its runs come
    from more than one CPU, the machine of each seed's run (A, B, ... named below the table)."""
    machines = list(dict.fromkeys(json.dumps(m, sort_keys=True) for row in table.values()
                                  for m in row.get("machines", [])))  # fmt: skip
    crossing = len(machines) > 1
    lines = ["", "## Each row at its chosen rate", "",
             "Held-out accuracy over the seeds each row has at its rate (mean +- std, then per seed); MoT minus the "
             "row, paired on the seeds both have; forgetting: the NLL probe's rise and the facts still stated.", "",
             "| row | rate | seeds | accuracy | MoT minus it, paired | NLL forgetting | facts kept |"
             + (" machine, per seed |" if crossing else ""),
             "|---|---:|---|---:|---:|---:|---:|" + ("---|" if crossing else "")]  # fmt: skip
    for label, row in table.items():
        per_seed = ", ".join(f"{v:.2f}" for v in row["accuracy"]["values"])
        paired = row.get("mot_minus")
        paired_cell = (f"{run.quality._fmt(paired)} ({', '.join(f'{v:+.2f}' for v in paired['values'])})"
                       if paired else "")  # fmt: skip
        facts = run.quality._fmt(row["facts_kept"]) if row["facts_kept"] else "-"
        letters = ", ".join(chr(65 + machines.index(json.dumps(m, sort_keys=True))) for m in row["machines"])
        lines.append(f"| {label} | {row['rate']:g} | {', '.join(map(str, row['seeds']))} | "
                     f"{run.quality._fmt(row['accuracy'])} ({per_seed}) | {paired_cell} | "
                     f"{run.quality._fmt(row['forgetting'])} | {facts} |" + (f" {letters} |" if crossing else ""))
    if crossing:
        named = {chr(65 + i): json.loads(m) for i, m in enumerate(machines)}
        lines += ["", "The pairings cross CPUs (each rate's runs come from its own cache folders); what crossing "
                  "moves is measured, not assumed: benchmarks/real_student/README.md. Machines: "
                  f"{run.quality._named_machines(named)}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=list(RATES))
    parser.add_argument("--seed", type=int, default=0, help="the grid's one seed (default 0)")
    parser.add_argument("--regime", choices=sorted(run.REGIMES), default="shared")
    parser.add_argument("--methods", nargs="+", choices=run.METHODS, default=list(METHODS))
    parser.add_argument("--exploratory", nargs="+", choices=list(run.EXPLORATORY), default=list(EXPLORATORY))
    parser.add_argument("--validation", type=int, default=None, help="validation problems (run.py --validation; "
                        f"default {run.Setting.validation})")
    parser.add_argument("--rounds", type=int, default=None, help="rounds T (run.py --rounds; default "
                        f"{run.Setting.rounds}): read the runs made with it, reported apart (suffix _rounds<T>)")
    parser.add_argument("--compare-seeds", type=int, nargs="+", default=None,
                        help="then every row at its chosen rate on these seeds (training the runs not cached), "
                        "paired against MoT's: the comparison the grid is for")
    parser.add_argument("--cached-only", action="store_true", help="train nothing: the table of the cached runs")
    parser.add_argument("--across-machines", action="store_true", help="run.py --across-machines: a row added "
                        "later pairs with the rows cached on another machine (the table names the crossing runs)")
    parser.add_argument("--quick", action="store_true", help="smoke test (run.py --quick at each rate)")
    parser.add_argument("--work-dir", default=str(run.RUNS))
    parser.add_argument("--results-dir", default=str(run.RESULTS))
    args = parser.parse_args(argv)
    rates = sorted(args.rates)
    by_rate: dict[float, dict] = {}
    with tempfile.TemporaryDirectory() as reports:  # each rate's own report is not kept: this table is the result
        for rate in rates:
            by_rate[rate] = run_rate(args, rate, [args.seed], [*args.methods, *args.exploratory], reports)
        rows = grid_table({rate: summary for rate, summary in by_rate.items() if summary}, rates)
        comparison = compare(args, rows, reports) if args.compare_seeds else None
    command = ("python benchmarks/real_student/lr_grid.py " + " ".join(argv if argv is not None
               else sys.argv[1:])).strip()  # fmt: skip
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = ("real_student_lr_grid" + ("_quick" if args.quick else "") + ("" if args.regime == "shared" else
            f"_{args.regime}") + ("" if args.rounds is None else f"_rounds{args.rounds}"))  # fmt: skip
    setting = run.QUICK if args.quick else run.Setting()  # the problem counts the runs were scored on
    validation = args.validation or setting.validation
    result = {"command": command, "regime": args.regime, "seed": args.seed, "rates": rates, "rows": rows,
              "validation_problems": validation, "comparison": comparison,
              "machine": next((s.get("machine") for s in by_rate.values() if s), None),
              "machines_crossed": {f"{rate:g}: {name}": machine for rate, s in by_rate.items()
                                   for name, machine in (s.get("machines_crossed") or {}).items()}}  # fmt: skip
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    report = markdown(rows, rates, command, args.regime, args.seed, validation, setting.held_out, args.rounds)
    if result["machines_crossed"]:  # rows added later on another machine than the rest of the seed's
        report += ("\nRuns on another machine than the rest of their rate's seed (rate: run: machine): "
                   f"{run.quality._named_machines(result['machines_crossed'])}.\n")
    (out / f"{stem}.md").write_text(report + (comparison_markdown(comparison) if comparison else ""))
    print((out / f"{stem}.md").read_text())
    return result


if __name__ == "__main__":
    main()
