"""Quality benchmark: MoT vs the best single teacher (STD) vs the union of all teachers (MTD), in miniature.

    python benchmarks/quality/run.py            # 4 teachers x 5 rounds x 50 steps, 8 seeds (~52 min, 2 cores)
    python benchmarks/quality/run.py --quick    # 1 seed, 2 rounds x 10 steps (< 5 min)
    python benchmarks/quality/run.py --ablations --seeds 0
    python benchmarks/quality/run.py --regime shared   # teachers sharing one format
    python benchmarks/quality/run.py --learning-rate 1e-3   # every method at another learning rate

The design (student, task, teachers, hyperparameters, reporting rule) and why: benchmarks/quality/README.md.
Each run (method x seed) is one job on a worker process with one CPU thread; its result is cached as JSON in
``--work-dir`` (one folder per setting and machine) so an interrupted benchmark resumes. Writes
benchmarks/results/quality{_<regime>}{_lr<rate>}{,_quick,_ablations}.{json,md,png}.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

from merge_of_thought.checkpointing import write_json_atomic

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hardware import identity as machine  # noqa: E402  (runs are cached per machine: hardware.py says why)
from hardware import describe as describe_machine  # noqa: E402
from hardware import identity_tag as machine_tag  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
TEACHERS = ("column", "verbose", "split", "noisy")
# Two regimes of teachers (README.md): "formats", the original, whose teachers write different formats from the
# first token; "shared", added for the MoT-wins issue, whose teachers share the surface format (x+y=z lines).
REGIMES = {"formats": TEACHERS, "shared": ("column", "commuted", "split", "noisy")}
# Runs cached by an older version of this script are not mixed with new ones. 2: STD and MTD are MoTTrainer runs
# (merge_of_thought.baselines) with fp32 adapters like MoT's; version 1 trained them with TRL's SFTTrainer, which
# keeps QLoRA adapters in bf16 (an unequal comparison; benchmarks/results/quality*.md were measured with it).
CACHE_VERSION = 2


@dataclasses.dataclass(frozen=True)
class Setting:
    """What every method shares; only the schedule of steps differs between methods."""

    rounds: int = 5
    steps_per_round: int = 50
    train_prompts: int = 200
    held_out: int = 200
    learning_rate: float = 3e-3
    batch_size: int = 16
    lora_r: int = 16
    lora_alpha: int = 32
    digits: int = 2
    regime: str = "formats"

    @property
    def teachers(self) -> tuple[str, ...]:
        return REGIMES[self.regime]

    @property
    def path_steps(self) -> int:
        """Steps of one branch path (= the STD and MTD-250 budget)."""
        return self.rounds * self.steps_per_round

    @property
    def compute_steps(self) -> int:
        """MoT's total SFT steps (= the MTD-1000 budget)."""
        return self.path_steps * len(self.teachers)


FULL = Setting()
QUICK = Setting(rounds=2, steps_per_round=10, held_out=100)


@dataclasses.dataclass(frozen=True)
class Job:
    """One training run. ``method``: "mot", "std" or "mtd"; ``variant`` names a MoT ablation (see ABLATIONS)."""

    method: str
    seed: int
    teacher: str | None = None
    variant: str = ""

    @property
    def name(self) -> str:
        label = {"std": f"STD-{self.teacher}", "mtd": "MTD", "mot": "MoT"}[self.method]
        return f"{label}{'-' + self.variant if self.variant else ''}"


# MoT variants for the follow-up (benchmarks/quality/README.md says why each): what changes against the main MoT
# run. "config" goes to MoTConfig; each spends 1000 branch-steps unless its comment says otherwise.
DILOCO_OUTER = {"lr": 0.7, "momentum": 0.9}  # DiLoCo's published outer step (outer.py), not tuned here
ABLATIONS: dict[str, dict] = {
    "step2": {"config": {"merge_step_size": 2.0}},  # extrapolate the averaged update (outer step size 2)
    "step4": {"config": {"merge_step_size": 4.0}},  # = the SUM of the four branch deltas (task arithmetic)
    "same-column": {"teachers": ("column",) * 4},  # four branches of the best teacher: diversity vs restarts
    "1x250": {"rounds": 1, "steps_per_round": 250},  # one average of four full STD runs
    "10x25": {"rounds": 10, "steps_per_round": 25},  # more, shorter rounds
    "no-noisy": {"teachers": ("column", "verbose", "split")},  # without the noisy teacher (750 branch-steps)
    # added after the six above: separate the restart cost from the cost of averaging LoRA branches
    "restart-only": {"teachers": ("column",)},  # one branch: merge-and-restart alone (250 branch-steps)
    "shared-init": {"config": {"shared_branch_init": True}},  # every branch of a round from the same LoRA A
    # added for issue 8: what a lossy rank budget (flat step cost) does to quality; exact rank 64 per round here
    "rank64": {"config": {"merge_max_rank": 64}},  # the budget of one round's update (K*r)
    "rank32": {"config": {"merge_max_rank": 32}},
    # added for the MoT-wins issue, after all of the above: branch state and DiLoCo's outer step (outer.py)
    "persistent": {"config": {"branch_state": "persistent"}},  # each teacher's LoRA factors + AdamW kept
    "nesterov": {"outer": DILOCO_OUTER},
    "persistent-nesterov": {"config": {"branch_state": "persistent"}, "outer": DILOCO_OUTER},
    # added for the study of branch travel (README.md), after the shared regime's 8 seeds: S against T at equal
    # compute with no restart cost, and step4 above as the outer learning rate's extreme
    "persistent-10x25": {"config": {"branch_state": "persistent"}, "rounds": 10, "steps_per_round": 25},
    "persistent-25x10": {"config": {"branch_state": "persistent"}, "rounds": 25, "steps_per_round": 10},
}


def outer_steps(variant: dict) -> list:
    """The variant's outer optimizer as a MoTCallback (outer.py), or none: the paper's average."""
    if "outer" not in variant:
        return []
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    from outer import NesterovOuterStep

    return [NesterovOuterStep(**variant["outer"])]


def jobs_for(seeds: list[int], ablations: bool, variants: list[str] | None = None,
             teachers: tuple[str, ...] = TEACHERS) -> list[Job]:  # fmt: skip
    """The main comparison, or the ablation variants; longest jobs first so the workers finish together."""
    if ablations:
        return [Job("mot", seed, variant=variant) for seed in seeds for variant in variants or ABLATIONS]
    jobs = [Job(method, seed) for seed in seeds for method in ("mot", "mtd")]
    return jobs + [Job("std", seed, teacher) for seed in seeds for teacher in teachers]


# ----------------------------------------------------------------------------------------------------------------
# Worker side: one job = load the 4-bit student, train, score held-out and pre-training accuracy along the way.


def _score(model, tokenizer, held_out, probes) -> dict[str, float]:
    from merge_of_thought.demo.student import pretraining_accuracy
    from merge_of_thought.demo.task import accuracy

    score, completions = accuracy(model, tokenizer, held_out, return_completions=True)
    return {"accuracy": score, "pretrain_accuracy": pretraining_accuracy(model, tokenizer, probes),
            "samples": [p.prompt + c for p, c in zip(held_out[:3], completions)]}  # what the errors look like


def run_job(job: Job, setting: Setting) -> dict:
    """Train one run and return its curve: ``[{"steps": total SFT steps so far, "accuracy", "pretrain_accuracy"}]``."""
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback

    from merge_of_thought import MoTCallback, MoTConfig, MoTTrainer
    from merge_of_thought.demo.run import quiet
    from merge_of_thought.demo.student import load_demo_student, pretraining_probes
    from merge_of_thought.demo.task import make_problems, make_teacher_datasets

    quiet()
    torch.set_num_threads(1)
    start = time.perf_counter()
    variant = ABLATIONS.get(job.variant, {})
    teachers = variant.get("teachers", setting.teachers)
    rounds = variant.get("rounds", setting.rounds)
    steps_per_round = variant.get("steps_per_round", setting.steps_per_round)
    model, tokenizer = load_demo_student(load_in_4bit=True)
    train = make_problems(setting.train_prompts, seed=job.seed, split="train", digits=setting.digits)
    held_out = make_problems(setting.held_out, seed=0, split="test", digits=setting.digits)
    probes = pretraining_probes()
    data = make_teacher_datasets(train, teachers=sorted(set(teachers)), seed=job.seed)
    curve = [{"steps": 0, **_score(model, tokenizer, held_out, probes)}]
    run_dir = tempfile.TemporaryDirectory(prefix="mot-quality-")
    shared = {
        "output_dir": run_dir.name, "learning_rate": setting.learning_rate, "lr_scheduler_type": "constant",
        "per_device_train_batch_size": setting.batch_size, "gradient_checkpointing": False, "bf16": False,
        "report_to": [], "disable_tqdm": True, "logging_steps": 10**6, "save_strategy": "no", "seed": job.seed,
        "dataloader_pin_memory": False,
    }  # fmt: skip
    lora = LoraConfig(r=setting.lora_r, lora_alpha=setting.lora_alpha, target_modules="all-linear")

    if job.method == "mot":
        branches = {f"{t}-{i}" if teachers.count(t) > 1 else t: data[t] for i, t in enumerate(teachers)}

        class ScoreRound(MoTCallback):
            def on_round_end(self, trainer, round_idx, metrics):
                steps = round_idx * steps_per_round * len(branches)
                merge = {key: metrics[key] for key in ("merge_rel_error_max", "merge_rank", "merge_kept_norm")}
                curve.append({"steps": steps, "round": round_idx,
                              **_score(trainer.model, tokenizer, held_out, probes), **merge})

        args = MoTConfig(num_rounds=rounds, max_steps=steps_per_round, overwrite_output_dir=True,
                         allow_single_teacher=len(branches) == 1, **shared, **variant.get("config", {}))
        MoTTrainer(model, args=args, teachers=branches, processing_class=tokenizer, peft_config=lora,
                   callbacks=[*outer_steps(variant), ScoreRound()]).train()
    else:  # the baselines through merge_of_thought.baselines: MoTTrainer runs, fp32 adapters as in MoT
        from merge_of_thought.baselines import baseline_run

        every = setting.path_steps if job.method == "mtd" else setting.steps_per_round
        args = MoTConfig(num_rounds=rounds, max_steps=steps_per_round, overwrite_output_dir=True, **shared)
        baseline, args = baseline_run(job.method, {t: data[t] for t in setting.teachers}, args,
                                      teacher=job.teacher)  # fmt: skip

        class ScoreEvery(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step % every == 0:
                    curve.append({"steps": state.global_step, **_score(model, tokenizer, held_out, probes)})

        MoTTrainer(model, args=args, teachers=baseline, processing_class=tokenizer, peft_config=lora,
                   callbacks=[ScoreEvery()]).train()
    run_dir.cleanup()
    return {"job": dataclasses.asdict(job), "name": job.name, "curve": curve,
            "seconds": time.perf_counter() - start}


def _run_cached(job: Job, setting: Setting, cache: Path) -> dict:
    path = cache / f"{job.name}-seed{job.seed}.json"
    if path.exists():
        return {**json.loads(path.read_text()), "cached": True}
    with contextlib.redirect_stdout(io.StringIO()):  # the trainers' step logs; the curve keeps what matters
        result = run_job(job, setting)
    write_json_atomic(path, result)  # a run killed half-way leaves no cache file
    return result


# ----------------------------------------------------------------------------------------------------------------
# Summary: mean +- std over seeds, paired differences, a Markdown report and a plot.


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def _at(curve: list[dict], steps: int) -> dict:
    return next(point for point in curve if point["steps"] == steps)


def summarize(results: list[dict], setting: Setting) -> dict:
    """Per method: final accuracy (the last point, never the best), forgetting, and MoT's per-round curve."""
    by_name: dict[str, dict[int, list[dict]]] = {}
    for result in results:
        by_name.setdefault(result["name"], {})[result["job"]["seed"]] = result["curve"]
    rows: dict[str, dict] = {}

    def add(label: str, curves: dict[int, list[dict]], steps: int | None = None) -> None:
        finals = {seed: (_at(curve, steps) if steps is not None else curve[-1]) for seed, curve in curves.items()}
        seeds = sorted(finals)
        rows[label] = {
            "steps": finals[seeds[0]]["steps"],
            "seeds": seeds,
            "accuracy": _mean_std([finals[s]["accuracy"] for s in seeds]),
            "pretrain_accuracy": _mean_std([finals[s]["pretrain_accuracy"] for s in seeds]),
            "forgetting": _mean_std([curves[s][0]["pretrain_accuracy"] - finals[s]["pretrain_accuracy"]
                                     for s in seeds]),
        }

    mtd_path, mtd_compute = f"MTD-{setting.path_steps}", f"MTD-{setting.compute_steps}"
    for name, curves in sorted(by_name.items()):
        if name == "MTD":
            add(mtd_path, curves, setting.path_steps)
            add(mtd_compute, curves)
        else:
            add(name, curves)
    std_rows = {name: row for name, row in rows.items() if name.startswith("STD-")}
    summary: dict = {"setting": dataclasses.asdict(setting), "methods": rows}
    best = max(std_rows, key=lambda name: std_rows[name]["accuracy"]["mean"]) if std_rows else None
    if best:
        summary["best_std"] = best
    others = sorted(n for n in rows if n.startswith("MTD-") and n not in (mtd_path, mtd_compute))  # MTD-parallel
    for variant in (name for name in rows if name.startswith("MoT")):
        key = "mot_minus" if variant == "MoT" else f"{variant}_minus"
        for baseline in (best, mtd_path, mtd_compute, *others, *(["MoT"] if variant != "MoT" else [])):
            if baseline not in rows:
                continue
            paired = paired_difference(rows[variant], rows[baseline])
            if paired:
                summary.setdefault(key, {})[baseline] = paired
    for name, curves in by_name.items():
        if name.startswith("MoT"):
            per_round, kept = {}, {}
            for curve in curves.values():
                for point in curve:
                    per_round.setdefault(point.get("round", 0), []).append(point["accuracy"])
                    if "merge_kept_norm" in point:  # how much of the branch updates' norm the merge kept
                        kept.setdefault(point["round"], []).append(point["merge_kept_norm"])
            summary.setdefault("mot_rounds", {})[name] = {r: _mean_std(v) for r, v in sorted(per_round.items())}
            if kept:
                summary.setdefault("mot_kept_norm", {})[name] = {r: _mean_std(v) for r, v in sorted(kept.items())}
    summary["seconds_per_run"] = {name: statistics.fmean(r["seconds"] for r in results if r["name"] == name)
                                  for name in by_name}
    return summary


def _by_seed(row: dict) -> dict[int, float]:
    return dict(zip(row["seeds"], row["accuracy"]["values"]))


def paired_difference(row: dict, other: dict) -> dict | None:
    """``row``'s accuracy minus ``other``'s, paired on the seeds both have run (mean, std, values, seeds); None
    when they share no seed."""
    mine, theirs = _by_seed(row), _by_seed(other)
    seeds = sorted(mine.keys() & theirs.keys())
    return {**_mean_std([mine[s] - theirs[s] for s in seeds]), "seeds": seeds} if seeds else None


def _fmt(stat: dict) -> str:
    """``mean +- std`` to 3 decimals; a mean that rounds to zero prints 0.000, not -0.000."""
    return f"{round(stat['mean'], 3) + 0.0:.3f} +- {stat['std']:.3f}"


def _named_machines(machines: dict, prefix: str = "") -> str:
    return "; ".join(f"{prefix}{name}: {describe_machine(m) if m else 'not recorded'}" for name, m in machines.items())


def write_markdown(summary: dict, path: Path, command: str, wall_seconds: float, title: str | None = None,
                   design: str = "benchmarks/quality/README.md", probe: str | None = None) -> None:
    seeds = sorted({s for row in summary["methods"].values() for s in row["seeds"]})
    cached = summary.get("runs_from_cache", 0)
    crossed = summary.get("machines_crossed") or {}
    timing = f"{wall_seconds / 60:.1f} min on this machine" + (
        f"; {cached} runs were read from the cache of earlier invocations, their own seconds are in the JSON"
        if cached else "")
    lines = [
        title or f"# Quality benchmark{' (' + path.stem.split('_', 1)[1] + ')' if '_' in path.stem else ''}",
        "",
        f"Command: `{command}` ({timing}). Seeds: {seeds}. Design and findings:",
        f"{design}. Accuracy: held-out final answers, at the END of each run (MoT: its last round).",
        probe or "Forgetting: accuracy on the student's pre-training probes at the start minus at the end.",
        "Mean +- std over seeds.",
        *([f"Machine (every run): {describe_machine(summary['machine'])}."] if summary.get("machine") else []),
        *([f"Machines, per seed (each seed's runs on one{', except those named next' if crossed else ''}): "
           f"{_named_machines(summary['machines_per_seed'], 'seed ')}."] if summary.get("machines_per_seed") else []),
        *([f"Runs paired across machines (another machine than the rest of their seed): {_named_machines(crossed)}."]
          if crossed else []),
        "",
        f"| method | SFT steps | held-out accuracy | {'probe score' if probe else 'pre-training accuracy'} "
        "| forgetting |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in summary["methods"].items():
        label = name + (" (best STD)" if name == summary.get("best_std") else "")
        if row["seeds"] != seeds:  # a method not yet run on every seed says on which
            label += f" (seed{'s' * (len(row['seeds']) > 1)} {', '.join(map(str, row['seeds']))} only)"
        lines.append(f"| {label} | {row['steps']} | {_fmt(row['accuracy'])} | {_fmt(row['pretrain_accuracy'])} "
                     f"| {_fmt(row['forgetting'])} |")
    for key in (k for k in summary if k.endswith("_minus")):
        variant = "MoT" if key == "mot_minus" else key.removesuffix("_minus")
        lines += ["", f"{variant} minus baseline, paired by seed (held-out accuracy):", ""]
        for baseline, diff in summary[key].items():
            per_seed = ", ".join(f"{v:+.3f}" for v in diff["values"])
            lines.append(f"- vs {baseline}: {_fmt(diff)} (per seed {', '.join(map(str, diff['seeds']))}: {per_seed})")
    if summary.get("not_run"):
        lines += ["", f"Not run yet (cached runs only): {', '.join(summary['not_run'])}."]
    for name, rounds in summary.get("mot_rounds", {}).items():
        lines += ["", f"{name} per round (round 0 = the starting student):", "",
                  "| round | " + " | ".join(str(r) for r in rounds) + " |",
                  "|---|" + "---:|" * len(rounds),
                  "| accuracy | " + " | ".join(_fmt(v) for v in rounds.values()) + " |"]
        kept = summary.get("mot_kept_norm", {}).get(name)
        if kept:  # the branches' agreement: |average update| / average |update|, 1 = they agree
            lines.append("| merge kept norm | " + " | ".join(_fmt(kept[r]) if r in kept else "-" for r in rounds)
                         + " |")
    path.write_text("\n".join(lines) + "\n")


def plot(results: list[dict], summary: dict, path: Path, probe_is_accuracy: bool = True) -> None:
    """Held-out and pre-training accuracy against total SFT steps (mean over seeds, +- std shaded, an accuracy's
    band clipped to [0, 1]), and the two against each other: how much a method forgets for what it learns.
    ``probe_is_accuracy=False`` for a probe that is no accuracy (the real student's minus NLL): no clipping."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    names = sorted({r["name"] for r in results}, key=lambda n: (not n.startswith("MoT"), n))
    for name in names:
        curves = [r["curve"] for r in results if r["name"] == name]
        steps = [p["steps"] for p in curves[0]]
        style = {"lw": 2.5} if name == "MoT" else {"lw": 1.2, "alpha": 0.8}
        if name.startswith("STD") and name != summary.get("best_std"):
            style.update(ls="--", alpha=0.5)
        means = {}
        for ax, key in zip(axes, ("accuracy", "pretrain_accuracy")):
            values = [[c[i][key] for c in curves] for i in range(len(steps))]
            means[key] = mean = [statistics.fmean(v) for v in values]
            spread = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            (line,) = ax.plot(steps, mean, marker="o", ms=3, label=name, **style)
            floor, ceiling = (0.0, 1.0) if key == "accuracy" or probe_is_accuracy else (-math.inf, math.inf)
            low = [max(floor, m - s) for m, s in zip(mean, spread)]
            high = [min(ceiling, m + s) for m, s in zip(mean, spread)]
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.1)
        axes[2].plot(means["accuracy"], means["pretrain_accuracy"], marker="o", ms=3, color=line.get_color(),
                     label=name, **style)
    axes[0].set(xlabel="total SFT steps (MoT: 4 branches per round)", ylabel="held-out accuracy",
                title="Distillation: held-out final-answer accuracy")
    probe = "pre-training probe accuracy" if probe_is_accuracy else "pre-training probe score (minus NLL)"
    axes[1].set(xlabel="total SFT steps", ylabel=probe, title="Forgetting")
    axes[2].set(xlabel="held-out accuracy", ylabel=probe,
                title="Forgetting against learning (every checkpoint)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 rounds x 10 steps: a smoke test")
    parser.add_argument("--ablations", action="store_true", help="run the MoT variants of ABLATIONS instead")
    parser.add_argument("--variants", nargs="+", choices=sorted(ABLATIONS), help="with --ablations: only these")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0-7, the design's 8 (--quick: 0)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="parallel runs, 1 thread each")
    parser.add_argument("--work-dir", default=str(RESULTS / "runs" / "quality"),
                        help="the run cache (default: in the repository, so a later session resumes; commit it)")
    parser.add_argument("--results-dir", default=str(RESULTS))
    parser.add_argument("--regime", choices=sorted(REGIMES), default="formats",
                        help="teachers: 'formats' (the original four) or 'shared' (one surface format; README.md)")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="every method's SFT learning rate (default 3e-3); results get the suffix _lr<value>")
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md and .png from the saved .json")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    setting = dataclasses.replace(base, regime=args.regime, learning_rate=args.learning_rate or base.learning_rate)
    seeds = args.seeds or ([0] if args.quick else list(range(8)))
    identity = machine()
    suffix = results_suffix(setting, args.quick, args.ablations)
    cache = Path(args.work_dir) / cache_folder(setting, args.quick, identity)
    cache.mkdir(parents=True, exist_ok=True)
    jobs = jobs_for(seeds, args.ablations, args.variants, setting.teachers)
    if args.ablations:  # the reference MoT and best-STD runs of the same seeds, from the main comparison's cache
        jobs += jobs_for(seeds, ablations=False, teachers=setting.teachers)
    out = Path(args.results_dir)
    if args.report_only:
        saved = json.loads((out / f"quality{suffix}.json").read_text())
        summary = summarize(saved["runs"], setting)
        keys = ("wall_seconds", "command", "runs_from_cache", "machine")
        summary.update({key: saved["summary"].get(key) for key in keys})
        return _report(saved["runs"], summary, out, suffix)
    start = time.perf_counter()
    results = []
    print(f"{len(jobs)} runs on {args.workers} workers; cache {cache}", flush=True)
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_run_cached, job, setting, cache): job for job in jobs}
        for done, future in enumerate(as_completed(futures), 1):
            result = future.result()  # a failed run stops the benchmark; finished runs stay cached
            results.append(result)
            final = result["curve"][-1]
            print(f"[{done}/{len(jobs)}] {result['name']} seed {result['job']['seed']}: accuracy "
                  f"{final['accuracy']:.3f}, pre-training {final['pretrain_accuracy']:.3f} "
                  f"({result['seconds']:.0f}s; {time.perf_counter() - start:.0f}s elapsed)", flush=True)
    wall = time.perf_counter() - start
    summary = summarize(results, setting)
    summary["wall_seconds"] = wall
    summary["runs_from_cache"] = sum(bool(r.pop("cached", False)) for r in results)
    summary["machine"] = identity
    command = "python benchmarks/quality/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    summary["command"] = command.strip()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"quality{suffix}.json").write_text(json.dumps({"summary": summary, "runs": results}, indent=1))
    return _report(results, summary, out, suffix)


def _setting_tag(setting: Setting, base: Setting) -> str:
    """``_shared``, ``_lr0.001``: what sets this run apart from the formats regime at the default settings."""
    regime = "" if setting.regime == "formats" else f"_{setting.regime}"
    return regime + ("" if setting.learning_rate == base.learning_rate else f"_lr{setting.learning_rate:g}")


def results_suffix(setting: Setting, quick: bool, ablations: bool) -> str:
    """The results files' suffix: ``quality{suffix}.json``."""
    return _setting_tag(setting, QUICK if quick else FULL) + ("_quick" if quick else "_ablations" if ablations else "")


def cache_folder(setting: Setting, quick: bool, identity: dict) -> str:
    """The cache folder of one setting's runs on one machine (runs of the main comparison and of the ablations
    share it: the ablations read their references from it)."""
    tag = _setting_tag(setting, QUICK if quick else FULL).replace("_", "-")
    return f"{'quick' if quick else 'full'}-v{CACHE_VERSION}{tag}-{machine_tag(identity)}"


def _report(results: list[dict], summary: dict, out: Path, suffix: str) -> dict:
    write_markdown(summary, out / f"quality{suffix}.md", summary["command"], summary["wall_seconds"])
    plot(results, summary, out / f"quality{suffix}.png")
    print((out / f"quality{suffix}.md").read_text())
    return summary


if __name__ == "__main__":
    main()
