"""The merge of five rounds at SmolLM2-135M's shapes: the append and incremental merges against the full recompression.

``merge_round`` used to recompress every layer's whole factor stack every round (``recompress(concatenate([D_t,
update]))``: a float64 QR of rank up to K*r*T columns). The incremental merge projects only the round's K*r new
columns out of ``D_t``'s orthogonal factors (``merging.add``; persistent branches and ``merge_max_rank``), and the
append merge (fresh branches, the default) recompresses the round's update alone and appends it to ``D_t``'s factors
(``merge_round(append=True)``); the trainer runs the append merge two layers at a time on two cores
(``workers=2``), timed beside it. All run on the same inputs in one process, interleaved, for each of
T=5 rounds of K=4 random rank-16 branches on SmolLM2-135M's adapted linears (30 layers; q, o 576x576; k, v 192x576;
gate, up 1536x576; down 576x1536), each round starting from the delta that method merged the round before. Reported
per round: the median seconds of each over the repeats and their ratio, and how far apart their results are (dense
products relative to the exact merged delta, kept ranks, dropped norms). The float32 variant projects in float32
instead of float64, to show what that precision would cost in accuracy.

    python benchmarks/perf/merge_rounds.py               # 5 repeats, ~10 minutes on 2 cores
    python benchmarks/perf/merge_rounds.py --quick       # 3 layers, 2 repeats
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine  # noqa: E402
from hardware import describe, identity  # noqa: E402  (common put benchmarks/ on the path)

from merge_of_thought import merging  # noqa: E402
from merge_of_thought.merging import LowRankDelta, concatenate, merge_round, recompress  # noqa: E402

ROUNDS, TEACHERS, RANK, TOLERANCE = 5, 4, 16, 1e-4  # the paper's T and K, the default LoRA rank and merge_tolerance
SMOLLM2 = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
           "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}  # (out, in)
Merge = Callable[..., tuple[dict[str, LowRankDelta], dict[str, merging.MergeReport]]]


def layer_by_layer(combine: Callable[[LowRankDelta, LowRankDelta, int | None, float], tuple[LowRankDelta, float]]
                   ) -> Merge:
    """``merge_round`` with another way to add a round's update to a layer's merged delta."""

    def merge(current, branches, weights, max_rank=None, tolerance=0.0):
        merged, reports = {}, {}
        for name in branches[0]:
            update = concatenate([b[name] for b in branches], weights)
            budget = tolerance * update.frobenius_norm()
            if current is None:
                merged[name], dropped = recompress(update, max_rank, budget)
            else:
                merged[name], dropped = combine(current[name], update, max_rank, budget)
            rank_before = update.rank + (current[name].rank if current is not None else 0)
            reports[name] = merging.MergeReport(rank_before, merged[name].rank, dropped, update.frobenius_norm())
        return merged, reports

    return merge


METHODS: dict[str, Merge] = {
    # the merge before the incremental one: every layer's whole stack recompressed (QR of all its columns)
    "full": layer_by_layer(lambda current, update, *budget: recompress(concatenate([current, update]), *budget)),
    "incremental": merge_round,
    "incremental_fp32": layer_by_layer(lambda *args: merging.add(*args, dtype=torch.float32)),
    "append": lambda *args: merge_round(*args, append=True),
    # what the trainer runs on 2 cores: two layers at a time, one torch thread each (merge_threads())
    "append_2_workers": lambda *args: merge_round(*args, append=True, workers=2),
}
TIMED = ("full", "incremental", "append", "append_2_workers")


def branch_deltas(layers: int, seed: int) -> list[dict[str, LowRankDelta]]:
    """K branches of random rank-r factors, scaled like a short SFT branch (|B A| about 1e-3 of a unit weight)."""
    g = torch.Generator().manual_seed(seed)
    branches = []
    for _ in range(TEACHERS):
        deltas = {}
        for layer in range(layers):
            for name, (out, inp) in SMOLLM2.items():
                B, A = torch.randn(out, RANK, generator=g), torch.randn(RANK, inp, generator=g) / inp**0.5
                deltas[f"model.layers.{layer}.{name}"] = LowRankDelta(B * 1e-3 / RANK**0.5, A)
        branches.append(deltas)
    return branches


def chain(merge: Merge, rounds: list[list[dict[str, LowRankDelta]]]) -> list[tuple[dict, dict]]:
    """Every round's (merged delta, reports) as ``merge`` makes them, each round from its own previous result."""
    current, out = None, []
    for branches in rounds:
        current, reports = merge(current, branches, [1 / TEACHERS] * TEACHERS, None, TOLERANCE)
        out.append((current, reports))
    return out


def disagreement(ours: tuple[Mapping, Mapping], reference: tuple[Mapping, Mapping]) -> dict[str, float]:
    """How far a method's round is from the full merge's: worst relative difference of the dense products, layers
    whose kept rank differs, and the worst difference of dropped norms relative to the round's update."""
    (merged, reports), (exact, exact_reports) = ours, reference
    dense = max(float((merged[n].dense().double() - exact[n].dense().double()).norm() / exact[n].dense().norm())
                for n in exact)
    ranks = sum(reports[n].rank_after != exact_reports[n].rank_after for n in exact)
    dropped = max(abs(reports[n].dropped_norm - exact_reports[n].dropped_norm) / exact_reports[n].delta_norm
                  for n in exact)
    return {"dense_rel_diff_max": dense, "rank_differs": ranks, "dropped_diff_rel_max": dropped}


def timings(rounds, inputs: Mapping[str, list], repeats: int) -> dict[str, list[list[float]]]:
    """Seconds of each method per round and repeat, methods alternating (their order flipped every repeat)."""
    seconds = {method: [[] for _ in rounds] for method in inputs}
    weights = [1 / TEACHERS] * TEACHERS
    for repeat in range(repeats):
        for t, branches in enumerate(rounds):
            order = list(inputs) if repeat % 2 == 0 else list(inputs)[::-1]
            for method in order:
                previous = inputs[method][t - 1][0] if t else None
                start = time.perf_counter()
                METHODS[method](previous, branches, weights, None, TOLERANCE)
                seconds[method][t].append(time.perf_counter() - start)
        print(f"repeat {repeat + 1}/{repeats}:", {m: [round(s[-1], 2) for s in v] for m, v in seconds.items()},
              flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layers, repeats = (3, args.repeats or 2) if args.quick else (30, args.repeats or 5)
    record = measure(layers, repeats)
    name = "merge_rounds_quick" if args.quick else "merge_rounds"
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text("\n".join(markdown(record)) + "\n")
    print("\n".join(markdown(record)))


def measure(layers: int, repeats: int, num_rounds: int = ROUNDS) -> dict:
    """Every merge chained over the same T rounds: their timings, and their results against the full merge's."""
    rounds = [branch_deltas(layers, seed=t) for t in range(num_rounds)]
    inputs = {method: chain(merge, rounds) for method, merge in METHODS.items()}
    accuracy = {method: [disagreement(ours, ref) for ours, ref in zip(inputs[method], inputs["full"])]
                for method in METHODS if method != "full"}
    seconds = timings(rounds, {m: inputs[m] for m in TIMED}, repeats)
    medians = {m: [median(s) for s in seconds[m]] for m in TIMED}
    ranks = [max(r.rank_after for r in reports.values()) for _, reports in inputs["full"]]
    return {"command": "python " + " ".join(sys.argv), "machine": {**machine(), **identity()}, "layers": layers,
           "rounds": num_rounds, "teachers": TEACHERS, "rank": RANK, "tolerance": TOLERANCE, "repeats": repeats,
           "seconds": seconds, "median_seconds": medians,
           "ratio_of_medians": {m: [t / f for t, f in zip(medians[m], medians["full"])] for m in TIMED[1:]},
           "merged_rank": ranks,
           "accuracy": accuracy,
           "workers_vs_append": [disagreement(ours, ref)["dense_rel_diff_max"]
                                 for ours, ref in zip(inputs["append_2_workers"], inputs["append"])]}


def markdown(record: dict) -> list[str]:
    lines = [f"# merge_round over {record['rounds']} rounds of K={record['teachers']} rank-{record['rank']} branches "
             f"at SmolLM2-135M's shapes ({record['layers']} layers)", "",
             f"Command: `{record['command']}` (torch threads: {record['machine']['threads']}; {record['repeats']} "
             f"repeats, interleaved). Machine: {describe(record['machine'])}.", "",
             "| round | merged rank | full recompress (s) | incremental (s) | append (s) | append, 2 layers at a time "
             "(s) | incremental / full | append / full | append 2 at a time / full | incremental: dense diff, ranks "
             "differ, dropped diff | append: dense diff, ranks differ, dropped diff | append 2 at a time: dense diff "
             "against append | fp32 projections: dense diff, ranks differ |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---|"]
    medians, ratios, accuracy = record["median_seconds"], record["ratio_of_medians"], record["accuracy"]

    def diffs(method: str, t: int, dropped: bool = True) -> str:
        row = accuracy[method][t]
        cells = [f"{row['dense_rel_diff_max']:.1e}", str(row["rank_differs"])]
        return ", ".join(cells + ([f"{row['dropped_diff_rel_max']:.1e}"] if dropped else []))

    for t in range(record["rounds"]):
        lines.append(f"| {t + 1} | {record['merged_rank'][t]} | {medians['full'][t]:.2f} | "
                     f"{medians['incremental'][t]:.2f} | {medians['append'][t]:.2f} | "
                     f"{medians['append_2_workers'][t]:.2f} | {ratios['incremental'][t]:.2f} | "
                     f"{ratios['append'][t]:.2f} | {ratios['append_2_workers'][t]:.2f} | {diffs('incremental', t)} | "
                     f"{diffs('append', t)} | {record['workers_vs_append'][t]:.1e} | "
                     f"{diffs('incremental_fp32', t, dropped=False)} |")
    totals = {m: sum(medians[m]) for m in TIMED}
    lines += ["", f"All {record['rounds']} rounds: {totals['full']:.1f} s full, {totals['incremental']:.1f} s "
              f"incremental ({totals['incremental'] / totals['full']:.2f}x), {totals['append']:.1f} s append "
              f"({totals['append'] / totals['full']:.2f}x), {totals['append_2_workers']:.1f} s append two layers at a "
              f"time ({totals['append_2_workers'] / totals['full']:.2f}x). Diffs are against the full merge's result "
              "of the same round (each method chained over its own previous rounds); dense diff: worst layer's "
              "|difference|_F / |merged|_F; dropped-norm diff relative to the round's update.", "", COST_NOTE]
    if record.get("note"):
        lines += ["", record["note"]]
    return lines


COST_NOTE = (
    "Where the time goes: the full and incremental merges end in the same float64 SVD of the (k+m) x (k+m) core "
    "(k merged, m = K*r new columns) and the same rotation of the kept directions into the (out + in) x rank "
    "factors; the incremental merge replaces the QR of each whole (out or in) x (k+m) stack, and the explicit Q formed "
    "from it, by two projections of the m new columns and a QR of the residual, so the SVD and the rotation, which "
    "grow with (k+m), are what is left of its cost. The append merge factors the m new columns alone (a QR of each "
    "m-column stack and an m x m SVD) and copies D_t's factors beside them: its cost grows with m only.")


if __name__ == "__main__":
    main()
