"""benchmarks/perf: overhead.py keeps working and measures what perf.md reports (a tiny run of each mode),
rank_cost.py times both passes side by side, cpu_bf16.py keeps the figures of every kind of CPU it ran on, and
exact_floor.py counts the layers it states a floor for."""

import json
import re
import tempfile
from pathlib import Path

import torch

from helpers import load_benchmark

from merge_of_thought import merging


def test_overhead_worker_records_ranks_and_rank_budget_errors(tmp_path):
    overhead = load_benchmark("perf/overhead.py")
    student = overhead.build_student(tmp_path / "student", "tiny")
    before = set(Path(tempfile.gettempdir()).glob("mot-perf-*"))
    mot = overhead.worker("mot", "fp32", student, rounds=2, teachers=2, steps=2, batch=2)
    assert mot["steps"] == 8 and set(mot["median_step_seconds_by_round"]) == {"round1", "round2"}
    assert mot["merged_rank"] == [32, 64]  # exact: 2 branches x r=16 more every round
    budget_32, budget_16 = mot["budget_rel_error_max"]["32"], mot["budget_rel_error_max"]["16"]
    assert budget_32[0] < 1e-3 < budget_32[1]  # rank 32 holds round 1 exactly, not round 2 (exact rank 64)
    assert budget_16[0] > 1e-3 and budget_16[1] > budget_32[1]
    assert set(Path(tempfile.gettempdir()).glob("mot-perf-*")) == before  # the run folder was removed
    plain = overhead.worker("plain", "fp32", student, rounds=2, teachers=2, steps=2, batch=2)
    assert plain["steps"] == 8 and plain["peak_rss_mb"] > 0


def test_cpu_bf16_keeps_one_record_per_kind_of_cpu(tmp_path):
    """A run on a CPU with native bf16 must not overwrite the figures of one without: the default rests on both."""
    cpu_bf16 = load_benchmark("perf/cpu_bf16.py")
    machine = {"cpu_model": "AMD EPYC", "threads": 2, "avx512_bf16": False, "amx_bf16": False, "onednn_bf16": False}
    old = {"command": "python benchmarks/perf/cpu_bf16.py", "machine": machine}  # the one-record layout
    (tmp_path / "cpu_bf16.json").write_text(json.dumps(old))
    records = cpu_bf16._load_records(tmp_path / "cpu_bf16.json")
    assert list(records) == ["AMD EPYC (no native bf16)"] and records["AMD EPYC (no native bf16)"] == old
    native = {**machine, "avx512_bf16": True, "onednn_bf16": True}
    assert cpu_bf16.cpu_kind(native) == "AMD EPYC (AVX512-BF16)" != cpu_bf16.cpu_kind(machine)


def test_rank_cost_alternates_both_passes_where_a_frozen_adapter_holds_the_delta(tmp_path):
    rank_cost = load_benchmark("perf/rank_cost.py")
    student = rank_cost.build_student(tmp_path / "student", "tiny")
    from peft import LoraConfig
    from transformers import AutoTokenizer

    from merge_of_thought import adapters
    from merge_of_thought.frozen import FrozenDelta

    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    for precision, passes in (("nf4", {"one-pass", "two-pass"}), ("fp32-weights", {"one-pass"})):
        loaded_as, home = rank_cost.HOMES[precision]
        model = rank_cost.load(student, loaded_as)
        modules = adapters.check_targets(model, lora)
        shapes = dict(zip(modules, adapters.layer_dims(model, modules)))
        times, model = rank_cost.step_times(model, shapes, AutoTokenizer.from_pretrained(student), lora, rank=8,
                                            steps=2, warmup=1, batch=2, home=FrozenDelta(home, None, "CAUSAL_LM"))
        assert set(times) == passes and all(len(t) == 2 and min(t) > 0 for t in times.values()), precision


def test_exact_floor_counts_the_adapted_linears_of_the_70m_student():
    """By hand for the 70M benchmark student (10 layers; q, o 768x768; k, v 768x256; gate, up, down 768x2048)."""
    exact_floor = load_benchmark("perf/exact_floor.py")
    config, _ = exact_floor.STUDENTS["70M Qwen3 (perf benchmark)"]
    shapes, head = exact_floor.linear_shapes(config)
    assert len(shapes) == 70 and head == 768 * 100  # the output head (vocabulary 100) is not adapted
    row = exact_floor.floor(shapes, head, plain_peak_mb=1000.0)
    params, edges = 10 * (2 * 768 * 768 + 2 * 768 * 256 + 3 * 768 * 2048), 10 * (2 * 1536 + 2 * 1024 + 3 * 2816)
    assert row["linear_params_M"] == params / 1e6
    fresh, persistent = row["ranks"]["fresh"], row["ranks"]["persistent"]
    assert fresh["frozen_rank_last_round"] == 256 and persistent["frozen_rank_last_round"] == 80
    assert fresh["factors_fp32_MB"] == 4 * 256 * edges / 2**20
    assert fresh["factors_vs_plain_peak"] == fresh["factors_fp32_MB"] / 1000
    assert fresh["extra_linear_flops"] == 256 * edges / params
    first = 2 * (params + head) + 3 * 16 * edges  # frozen base and head: forward + input grad; LoRA: + weight grad
    assert fresh["step_flops_ratio"] == (first + 2 * 256 * edges) / first


def test_merge_rounds_times_every_merge_on_the_same_rounds_and_finds_them_equal():
    merge_rounds = load_benchmark("perf/merge_rounds.py")
    rounds = [merge_rounds.branch_deltas(layers=1, seed=t) for t in range(3)]  # SmolLM2's 7 linears, ranks 64-192
    inputs = {method: merge_rounds.chain(merge, rounds) for method, merge in merge_rounds.METHODS.items()}
    diffs = [merge_rounds.disagreement(ours, full) for ours, full in zip(inputs["incremental"], inputs["full"])]
    assert [d["rank_differs"] for d in diffs] == [0, 0, 0]
    assert max(d["dense_rel_diff_max"] for d in diffs) < 1e-6
    assert [max(r.rank_after for r in reports.values()) for _, reports in inputs["full"]] == [64, 128, 192]
    # The append merge keeps every direction of a layer that reaches its smaller dimension (k and v: 192 rows, in
    # round 3), where the full merge may drop some within the 1e-4 tolerance: it is checked against the exact sum.
    exact: dict[str, torch.Tensor] = {}
    for (merged, reports), (_, full_reports), branches in zip(inputs["append"], inputs["full"], rounds):
        for name, delta in merged.items():
            update = merging.concatenate([b[name] for b in branches], [1 / len(branches)] * len(branches))
            exact[name] = exact.get(name, 0) + update.dense().double()
            assert (delta.dense().double() - exact[name]).norm() <= 1e-6 * exact[name].norm(), name
            full_rank = reports[name].rank_before >= min(delta.shape)
            assert delta.rank == (min(delta.shape) if full_rank else full_reports[name].rank_after), name
    # every merge timed on the same rounds, the trainer's (two layers at a time) among them, with the append's result
    record = merge_rounds.measure(layers=1, repeats=1, num_rounds=2)
    assert set(record["seconds"]) == set(merge_rounds.TIMED) and "append_2_workers" in merge_rounds.TIMED
    assert all(len(s) == 1 and s[0] > 0 for method in record["seconds"].values() for s in method)
    assert len(record["workers_vs_append"]) == 2 and max(record["workers_vs_append"]) < 1e-8
    report = "\n".join(merge_rounds.markdown(record))
    assert len(re.findall(r"^\| [12] \| ", report, re.M)) == 2 and "two layers at a time" in report


def test_cpu_bf16_accuracy_pairs_the_precisions_by_seed():
    """The bf16 study reports paired differences (bf16 minus fp32, per seed) and time ratios, from JSON as saved."""
    study = load_benchmark("perf/cpu_bf16_accuracy.py")
    runs = {"fp32": {0: {"accuracy": 0.9, "seconds": 100.0}, 1: {"accuracy": 0.8, "seconds": 120.0}},
            "bf16": {0: {"accuracy": 0.7, "seconds": 80.0}, 1: {"accuracy": 0.8, "seconds": 60.0}}}
    summary = study.summarize(runs)
    assert summary["seeds"] == [0, 1]
    assert abs(summary["accuracy_difference"][0] - (-0.1)) < 1e-12  # (-0.2 + 0.0) / 2
    assert abs(summary["time_ratio"][0] - 0.65) < 1e-12  # (0.8 + 0.5) / 2
    record = json.loads(json.dumps({"command": "c", "machine": {"cpu": "x"},
                                    "students": {"demo": {"runs": runs, "summary": summary}}}))
    text = study.markdown(record)
    assert "| 0 | 0.900 | 0.700 | -0.200 | 100 | 80 | 0.80 |" in text
    assert "paired bf16 - fp32 -0.100" in text
