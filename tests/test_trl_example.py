"""examples/trl_sft_to_mot.py: TRL's own sft.py converted to MoT in a few lines, run on a tiny local model."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import make_teacher
from helpers import dense_adapter

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "trl_sft_to_mot.py"
sys.path.insert(0, str(ROOT / "docs"))
from make_trl_diff import code_changes, trl_diff  # noqa: E402


def test_example_differs_from_trl_script_by_at_most_12_code_lines():
    changes = code_changes(trl_diff())
    assert 0 < len(changes) <= 12, "\n".join(changes)
    assert "-    trainer = SFTTrainer(" in changes and "+    trainer = MoTTrainer(" in changes
    # The diff shown in docs/ is the current one.
    documented = (ROOT / "docs" / "trl_diff.md").read_text()
    assert all(line in documented.splitlines() for line in changes)


def test_example_runs_on_tiny_model(qwen3_dir, tmp_path):
    specs = []
    for k in range(2):
        path = tmp_path / f"style{k}.jsonl"
        make_teacher(k, n=8, seed=k).to_json(str(path))
        specs.append({"path": "json", "data_files": str(path)})
    config = tmp_path / "cfg.yaml"
    values = {"model_name_or_path": qwen3_dir, "datasets": specs, "use_peft": True, "lora_r": 4, "lora_alpha": 8}
    config.write_text(yaml.safe_dump(values))
    spec = importlib.util.spec_from_file_location("trl_sft_to_mot", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "out"
    argv = ["--config", str(config), "--num_rounds", "1", "--max_steps", "1", "--per_device_train_batch_size", "4",
            "--report_to", "none", "--gradient_checkpointing", "false", "--disable_tqdm", "true",
            "--output_dir", str(out)]
    example.main(*example.make_parser().parse_args_and_config(args=argv, fail_with_unknown_args=False))

    run = json.loads((out / "mot_run.json").read_text())
    assert run["teachers"] == ["style0", "style1"]  # one branch per `datasets:` entry, named after the files
    assert run["lora"]["r"] == 4  # --lora_r reached the branches through get_peft_config
    # trainer.save_model(output_dir) wrote the student: the merged adapter of the last round, loadable by PEFT.
    assert dense_adapter(out).keys() == dense_adapter(out / "round-001" / "merged").keys()
    for name, delta in dense_adapter(out).items():
        torch.testing.assert_close(delta, dense_adapter(out / "round-001" / "merged")[name])
    student = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(qwen3_dir), str(out))
    ids = torch.tensor([[5, 6, 7]])
    assert not torch.equal(student(ids).logits, AutoModelForCausalLM.from_pretrained(qwen3_dir)(ids).logits)
