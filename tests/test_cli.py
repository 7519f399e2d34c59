"""The ``mot`` command line: ``mot train`` from a TRL-style YAML with one data set per teacher."""

from __future__ import annotations

import json

import yaml

from merge_of_thought.cli import main

from conftest import make_teacher


def test_mot_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "train" in out
    assert main(["nope"]) == 2


def test_mot_train_from_yaml_with_flag_override(qwen3_dir, tmp_path):
    teachers = []
    for k in range(2):
        path = tmp_path / f"teacher{k}.jsonl"
        make_teacher(k).to_json(str(path))
        teachers.append({"path": "json", "data_files": str(path), "teacher": f"style{k}", "weight": [0.75, 0.25][k]})
    config = {
        "model_name_or_path": qwen3_dir,
        "teachers": teachers,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_modules": ["q_proj", "v_proj"],
        "num_rounds": 1,
        "max_steps": 1,
        "per_device_train_batch_size": 4,
        "report_to": "none",
        "gradient_checkpointing": False,
        "output_dir": str(tmp_path / "out"),
        "learning_rate": 1e-3,
    }
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(cfg), "--max_steps", "2"]) == 0
    run = json.loads((tmp_path / "out" / "mot_run.json").read_text())
    assert run["teachers"] == ["style0", "style1"] and run["teacher_weights"] == [0.75, 0.25]
    assert run["steps_per_branch"] == 2  # the flag won over the YAML
    assert sorted(run["lora"]["target_modules"]) == ["q_proj", "v_proj"] and run["lora"]["r"] == 4
    assert (tmp_path / "out" / "round-001" / "branch-style1" / "adapter_model.safetensors").exists()
