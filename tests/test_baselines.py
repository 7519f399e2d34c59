"""Equal-compute baselines (baselines.py, ``mot train --baseline``): the same MoTTrainer path, other data and steps."""

from __future__ import annotations

import json

import pytest
import yaml
from huggingface_hub import ModelCard

from merge_of_thought import MoTConfig
from merge_of_thought.baselines import baseline_run
from merge_of_thought.cli import main
from merge_of_thought.export import FinishedRun

from conftest import make_teacher
from helpers import dense_adapter


def write_config(tmp_path, model_dir, **overrides):
    teachers = []
    for k in range(3):
        path = tmp_path / f"teacher{k}.jsonl"
        make_teacher(k, n=8, seed=k).to_json(str(path))
        teachers.append({"path": "json", "data_files": str(path), "teacher": f"style{k}"})
    config = {"model_name_or_path": model_dir, "teachers": teachers, "lora_r": 4, "lora_alpha": 8,
              "lora_target_modules": "all-linear", "num_rounds": 2, "max_steps": 2, "per_device_train_batch_size": 4,
              "report_to": "none", "learning_rate": 1e-3, "output_dir": str(tmp_path / "out"), "disable_tqdm": True,
              **overrides}  # fmt: skip
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(config))
    return cfg


def test_mtd_baseline_trains_the_union_for_mots_total_steps(qwen3_dir, tmp_path, capsys):
    cfg = write_config(tmp_path, qwen3_dir)
    assert main(["train", "--config", str(cfg), "--baseline", "mtd"]) == 0
    assert "The MTD baseline finished" in capsys.readouterr().out
    run = json.loads((tmp_path / "out" / "mot_run.json").read_text())
    assert run["teachers"] == ["union"] and run["num_rounds"] == 1
    assert run["steps_per_branch"] == 2 * 3 * 2  # num_rounds x teachers x max_steps
    assert run["teacher_rows"] == {"union": 24}
    branch = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
              if '"branch"' in line]  # fmt: skip
    assert [b["steps"] for b in branch] == [12]
    # the run folder is an ordinary MoT run: its merged adapter is the baseline's adapter, and exports read it
    merged = dense_adapter(tmp_path / "out" / "round-001" / "merged")
    trained = dense_adapter(tmp_path / "out" / "round-001" / "branch-union")
    assert all(((merged[n] - trained[n]).norm() / trained[n].norm()).item() < 1e-5 for n in trained)
    assert FinishedRun(tmp_path / "out").round == 1


def test_a_baseline_is_recorded_carded_and_evaluated_as_one(qwen3_dir, tmp_path):
    held_out = {"path": "json", "data_files": str(tmp_path / "teacher0.jsonl")}
    cfg = write_config(tmp_path, qwen3_dir, eval_dataset=held_out, eval_accuracy_samples=2, eval_max_new_tokens=4)
    assert main(["train", "--config", str(cfg), "--baseline", "mtd"]) == 0
    run = json.loads((tmp_path / "out" / "mot_run.json").read_text())
    assert run["kind"] == "mtd" and run["sft_steps"] == 12
    assert run["baseline"] == {"kind": "mtd", "steps": "mot", "teacher": None, "mot_num_rounds": 2,
                               "teachers": ["style0", "style1", "style2"], "mot_steps_per_branch": 2}  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    # the one branch is the round's student: evaluated once, after the merge (and the starting student, round 0)
    assert [(r["type"], r["round"]) for r in records if "eval_loss" in r] == [("round", 0), ("round", 1)]
    assert main(["export", str(tmp_path / "out"), "--adapter", str(tmp_path / "a"), "--base-model", "org/tiny"]) == 0
    card = ModelCard.load(tmp_path / "a" / "README.md")
    assert "distilled from" not in card.text and "Merge-of-Thought (MoT" not in card.text
    assert "as the MTD baseline (the union of style0, style1, style2; MoT's total compute)" in card.text
    assert "plain LoRA SFT for 12 steps" in card.text
    assert "mot-baseline-mtd" in card.data.tags
    files = "; ".join(f"json: {tmp_path / f'teacher{k}.jsonl'}" for k in range(3))
    assert f"| union | {files} | 1 |" in card.text  # the data files, not a dash
    # the card's evaluation: its settings, and the accuracy of every round as a plot
    assert "- accuracy: greedy generation on 2 rows, at most 4 new tokens" in card.text
    assert "- held-out rows: 8" in card.text
    assert "![Eval accuracy per MoT round](mot_accuracy.png)" in card.text
    assert (tmp_path / "a" / "mot_accuracy.png").read_bytes().startswith(b"\x89PNG")


def test_a_mot_run_records_its_kind_and_compute(qwen3_dir, tmp_path):
    cfg = write_config(tmp_path, qwen3_dir, num_rounds=1, max_steps=1)
    assert main(["train", "--config", str(cfg)]) == 0
    run = json.loads((tmp_path / "out" / "mot_run.json").read_text())
    assert run["kind"] == "mot" and run["baseline"] is None and run["sft_steps"] == 1 * 3 * 1
    assert run["teacher_sources"] == {f"style{k}": f"json: {tmp_path / f'teacher{k}.jsonl'}" for k in range(3)}


def test_std_baseline_takes_one_teacher_for_one_branch_path(qwen3_dir, tmp_path):
    cfg = write_config(tmp_path, qwen3_dir)
    assert main(["train", "--config", str(cfg), "--baseline", "std", "--baseline_teacher", "style1"]) == 0
    run = json.loads((tmp_path / "out" / "mot_run.json").read_text())
    assert run["teachers"] == ["style1"] and run["steps_per_branch"] == 2 * 2


def test_baseline_inputs_are_checked_before_anything_runs(tmp_path):
    args = MoTConfig(output_dir=str(tmp_path), num_rounds=5, max_steps=10, report_to=[])
    teachers = {f"t{k}": make_teacher(k, n=4) for k in range(4)}
    with pytest.raises(ValueError, match="needs baseline_teacher, one of t0, t1, t2, t3; got 'nope'"):
        baseline_run("std", teachers, args, teacher="nope")
    with pytest.raises(ValueError, match="baseline must be one of"):
        baseline_run("union", teachers, args)
    with pytest.raises(ValueError, match="baseline steps must be one of"):
        baseline_run("mtd", teachers, args, steps="all")
    data, config = baseline_run("mtd", teachers, args, steps="path")
    assert config.max_steps == 50 and config.num_rounds == 1 and len(data["union"]) == 16
    assert baseline_run("std", teachers, args, teacher="t2", steps="mot")[1].max_steps == 200


def test_the_data_parallel_control_runs_mots_sequential_steps_with_a_k_fold_batch(tmp_path):
    args = MoTConfig(output_dir=str(tmp_path), num_rounds=5, max_steps=10, gradient_accumulation_steps=2, report_to=[])
    teachers = {f"t{k}": make_teacher(k, n=4) for k in range(4)}
    data, config = baseline_run("mtd", teachers, args, steps="parallel")
    # T*S steps of K x the batch: MoT's compute in MoT's number of sequential steps
    assert config.max_steps == 50 and config.gradient_accumulation_steps == 8 and len(data["union"]) == 16
    assert config.baseline["steps"] == "parallel"
    with pytest.raises(ValueError, match="'parallel' is the data-parallel control on the union: use it with 'mtd'"):
        baseline_run("std", teachers, args, teacher="t0", steps="parallel")
