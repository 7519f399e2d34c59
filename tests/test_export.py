"""Hub-ready exports: one exact adapter on the original base, the merged model, model cards, push_to_hub, mot export."""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from merge_of_thought.adapters import load_delta
from merge_of_thought.cli import main

from conftest import make_teacher
from helpers import dense_adapter, quick_trainer

PROMPTS = ["Q: 12+30=?\nthink:", "Q: 7+5=?\nthink: 7 plus"]


@pytest.fixture(scope="module")
def trained(qwen3_dir, tmp_path_factory):
    """One short fp32 MoT run (2 teachers, 2 rounds, 1 step per branch) shared by this module's tests."""
    teachers = {f"teacher{k}": make_teacher(k, seed=k) for k in range(2)}
    trainer = quick_trainer(qwen3_dir, teachers, tmp_path_factory.mktemp("mot-run"), max_steps=1)
    trainer.teacher_datasets = {"teacher0": "org/traces-a", "teacher1": "org/traces-b"}
    trainer.train()
    return trainer


def student_logits(trainer, tokenizer) -> torch.Tensor:
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return trainer.model(**batch).logits


def test_exact_adapter_reproduces_student_with_peft_and_transformers_alone(trained, qwen3_dir, tokenizer, tmp_path):
    report = trained.save_adapter(tmp_path / "adapter")
    assert report["relative_error_total"] == 0.0 and report["requested_rank"] is None
    assert report["rank"] == max(d.rank for d in trained.merged.values())
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == qwen3_dir  # the id the run started from
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    save_file({"expected": student_logits(trained, tokenizer), **dict(batch)}, str(tmp_path / "expected.safetensors"))
    # what a user shares: the exported adapter, `mot merge` of it, and the run's own last round checkpoint
    assert main(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    shared = [tmp_path / "adapter", tmp_path / "merged", trained.run.merged_dir(2)]
    script = textwrap.dedent(
        f"""
        import sys, torch
        from peft import AutoPeftModelForCausalLM, PeftModel, PeftModelForCausalLM
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        data = load_file({str(tmp_path / "expected.safetensors")!r})
        for folder in {[str(f) for f in shared]!r}:
            auto = AutoPeftModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            base = AutoModelForCausalLM.from_pretrained({qwen3_dir!r}, dtype=torch.float32)
            plain = PeftModel.from_pretrained(base, folder)
            assert isinstance(plain, PeftModelForCausalLM), type(plain)  # generate() and the causal-LM helpers
            for model in (auto, plain):
                with torch.no_grad():
                    logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
                print((logits - data["expected"]).abs().max().item())
        assert not any(name.startswith("merge_of_thought") for name in sys.modules), "merge_of_thought was imported"
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = [float(line) for line in result.stdout.strip().splitlines()[-6:]]
    assert len(errors) == 6 and max(errors) <= 1e-4, errors
    assert json.loads((tmp_path / "merged" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    mask = os.umask(0)
    os.umask(mask)
    for folder in shared[:2]:  # what a user shares is readable as any file they write (safetensors writes 0600)
        assert stat.S_IMODE((folder / "adapter_model.safetensors").stat().st_mode) == 0o666 & ~mask
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert card.data.base_model is None  # a local folder is no Hub id: left out of the metadata
    assert f"the base model in the local folder `{qwen3_dir}` (the export was not told its Hub id" in card.text
    assert "dropout=0.0," in card.text and "student weights: not quantized" in card.text  # lora_dropout=0.0


def test_rank_budget_is_the_best_truncation_and_reports_its_error(trained, tmp_path):
    report = trained.save_adapter(tmp_path / "r2", rank=2)
    saved = dense_adapter(tmp_path / "r2")
    assert json.loads((tmp_path / "r2" / "adapter_config.json").read_text())["r"] == 2
    dropped_sq, total_sq = 0.0, 0.0
    for name, delta in trained.merged.items():
        exact = delta.dense().double()
        s = torch.linalg.svdvals(exact)
        best = math.sqrt(float((s[2:] ** 2).sum()))  # Eckart-Young: the error of the best rank-2 approximation
        layer = report["layers"][name]
        assert layer["rank_after"] == 2 and layer["rank_before"] == delta.rank
        assert layer["relative_error"] == pytest.approx(best / float(exact.norm()), rel=1e-4)
        assert float((saved[name] - exact).norm()) == pytest.approx(best, rel=1e-3)
        dropped_sq, total_sq = dropped_sq + best**2, total_sq + float(exact.norm()) ** 2
    assert report["relative_error_total"] == pytest.approx(math.sqrt(dropped_sq / total_sq), rel=1e-4)
    assert 0 < report["relative_error_total"] < 1
    on_disk = json.loads((tmp_path / "r2" / "mot_export.json").read_text())
    assert on_disk["relative_error_total"] == report["relative_error_total"] and on_disk["round"] == 2


def test_merged_export_folds_in_fp32_and_casts_once(trained, qwen3_dir, tokenizer, tmp_path):
    trained.save_merged(tmp_path / "bf16", dtype="bfloat16", max_shard_size="50KB")
    files = {p.name for p in (tmp_path / "bf16").iterdir()}
    assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 1
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json", "README.md"} <= files
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    base = AutoModelForCausalLM.from_pretrained(qwen3_dir, dtype=torch.float32)
    assert merged.dtype == torch.bfloat16
    merged_params, base_params = dict(merged.named_parameters()), dict(base.named_parameters())
    for name, param in merged_params.items():
        module = name.removesuffix(".weight")
        expected = base_params[name].float()
        if module in trained.merged:
            expected = expected + trained.merged[module].dense()
        assert torch.equal(param, expected.to(torch.bfloat16)), name  # one rounding of the fp32 sum
    trained.save_merged(tmp_path / "fp32", dtype="float32")
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32")(**batch).logits
    assert (got - student_logits(trained, tokenizer)).abs().max() <= 1e-4


def test_model_card_metadata_table_and_plot(trained, tmp_path):
    trained.save_adapter(tmp_path / "adapter", rank=3, base_model_id="org/tiny-qwen3")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "org/tiny-qwen3"
    )
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "org/tiny-qwen3" and data["base_model_relation"] == "adapter"
    assert data["library_name"] == "peft" and "merge-of-thought" in data["tags"]
    assert data["datasets"] == ["org/traces-a", "org/traces-b"]
    for text in ("| teacher0 | org/traces-a | 0.5 |", "MoT rounds: 2", "steps per branch per round: 1", "r=4",
                 "branches: fresh", "update norm kept by the average"):
        assert text in card.text, text
    metrics = [json.loads(line) for line in trained.run.metrics_path.read_text().splitlines()]
    for record in (m for m in metrics if m["type"] == "round"):
        losses = [m["train_loss"] for m in metrics if m["type"] == "branch" and m["round"] == record["round"]]
        assert f"| {record['round']} | {sum(losses) / len(losses):.4g} |" in card.text
    assert "truncated to rank 3" in card.text and "![Losses per MoT round](mot_metrics.png)" in card.text
    assert (tmp_path / "adapter" / "mot_metrics.png").read_bytes().startswith(b"\x89PNG")
    trained.save_merged(tmp_path / "merged", base_model_id="org/tiny-qwen3")
    merged_card = ModelCard.load(tmp_path / "merged" / "README.md").data.to_dict()
    assert merged_card["library_name"] == "transformers" and merged_card["base_model_relation"] == "finetune"


@pytest.fixture
def recorded_upload(monkeypatch):
    """The network boundary only: HfApi's repo, branch and upload calls record their arguments and the folder."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        kwargs["files"] = sorted(p.name for p in folder.iterdir())
        kwargs["card"] = ModelCard.load(folder / "README.md")
        calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_adapter_with_explicit_options(trained, recorded_upload):
    result = trained.push_to_hub(
        "me/mot-lora", private=True, revision="v1", token="hf_test", base_model_id="org/tiny-qwen3", rank=4
    )
    assert result == "commit-info"
    (_, repo, create), (_, _, branch), (_, uploaded_repo, upload) = recorded_upload
    assert repo == uploaded_repo == "me/mot-lora"
    assert create["private"] is True and create["exist_ok"] and create["token"] == "hf_test"
    assert branch["branch"] == "v1" and upload["revision"] == "v1" and upload["token"] == "hf_test"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "mot_metrics.png"} <= set(upload["files"])
    card = upload["card"]
    assert card.data.base_model == "org/tiny-qwen3" and card.data.model_name == "me/mot-lora"
    assert 'PeftModel.from_pretrained(base, "me/mot-lora")' in card.text
    assert json.loads((Path(upload["folder_path"]) / "mot_export.json").read_text())["rank"] == 4


def test_push_to_hub_merged_takes_trl_defaults_from_args(trained, recorded_upload, monkeypatch):
    monkeypatch.setattr(trained.args, "hub_model_id", "me/mot-merged")
    monkeypatch.setattr(trained.args, "hub_private_repo", False)
    monkeypatch.setattr(trained.args, "hub_token", "hf_args")
    monkeypatch.setattr(trained.args, "hub_revision", None)
    trained.push_to_hub(merged=True, base_model_id="org/tiny-qwen3")
    assert [c[0] for c in recorded_upload] == ["create_repo", "upload_folder"]  # no revision: no branch
    (_, repo, create), (_, _, upload) = recorded_upload
    assert repo == "me/mot-merged" and create["private"] is False and upload["token"] == "hf_args"
    assert upload["revision"] is None and "config.json" in upload["files"] and "tokenizer.json" in upload["files"]
    assert upload["card"].data.library_name == "transformers"


def test_mot_export_from_the_run_folder(trained, qwen3_dir, tmp_path, capsys):
    run_dir = str(trained.run.root)
    assert main(["export", run_dir, "--adapter", str(tmp_path / "r1"), "--round", "1"]) == 0
    round1 = dense_adapter(trained.run.merged_dir(1))
    exported = dense_adapter(tmp_path / "r1")
    assert all(torch.allclose(exported[n], round1[n], atol=1e-7) for n in round1)
    both = ["--adapter", str(tmp_path / "a"), "--merged", str(tmp_path / "m"), "--rank", "2"]
    assert main(["export", run_dir, *both, "--base-model", "org/tiny-qwen3"]) == 0
    out = capsys.readouterr().out
    assert "rank 2" in out and "relative error" in out
    assert json.loads((tmp_path / "a" / "mot_export.json").read_text())["round"] == 2
    assert ModelCard.load(tmp_path / "m" / "README.md").data.base_model == "org/tiny-qwen3"
    merged = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "m").named_parameters())
    base = dict(AutoModelForCausalLM.from_pretrained(qwen3_dir).named_parameters())
    name = next(iter(trained.merged))
    expected = base[f"{name}.weight"] + trained.merged[name].dense()  # the merged export is exact, not rank 2
    assert torch.allclose(merged[f"{name}.weight"], expected, atol=1e-6)
    assert "--base-model" not in capsys.readouterr().err  # the Hub id was given: nothing to add
    with pytest.raises(SystemExit) as info:
        main(["export", run_dir, "--adapter", str(tmp_path / "x"), "--round", "7"])
    assert info.value.code == 2
    assert capsys.readouterr().err == f"mot: error: round 7 is not complete in {run_dir}; completed rounds: [1, 2].\n"


def test_mot_export_of_a_local_base_says_to_pass_its_hub_id(trained, qwen3_dir, tmp_path, capsys):
    assert main(["export", str(trained.run.root), "--adapter", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert f"mot export: note: the run's base model is the local folder {qwen3_dir}" in err
    assert "Pass --base-model <hub id>" in err
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_model_name_or_path"] == qwen3_dir


def test_without_matplotlib_the_card_says_why_the_plot_is_missing(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: `import matplotlib` fails
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    args = ["export", str(trained.run.root), "--adapter", str(tmp_path / "a"), "--base-model", "org/tiny-qwen3"]
    assert main(args) == 0
    card = ModelCard.load(tmp_path / "a" / "README.md").text
    assert "is missing: matplotlib was not installed where this card was written" in card
    assert 'pip install "merge-of-thought[plot]"' in card and "![Losses" not in card
    assert not (tmp_path / "a" / "mot_metrics.png").exists()
    assert "mot export: note: matplotlib is not installed, so the card has no loss plot" in capsys.readouterr().err


def test_merged_export_of_a_4bit_student_uses_the_unquantized_base(qwen3_dir, tmp_path):
    """The delta is folded into the original fp32 weights, not into the dequantized 4-bit ones."""
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(qwen3_dir, quantization_config=nf4)
    teachers = {f"teacher{k}": make_teacher(k, seed=k) for k in range(2)}
    trainer = quick_trainer(model, teachers, tmp_path / "run", num_rounds=1, max_steps=1)
    trainer.train()
    trainer.save_merged(tmp_path / "merged")
    merged = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "merged").named_parameters())
    base = dict(AutoModelForCausalLM.from_pretrained(qwen3_dir).named_parameters())
    for name, delta in trainer.merged.items():
        assert torch.equal(merged[f"{name}.weight"], base[f"{name}.weight"] + delta.dense())
    assert load_delta(tmp_path / "run" / "round-001" / "merged").keys() == trainer.merged.keys()
    # The cards say so: the student trained on 4-bit weights, the exports apply the delta to the full-precision base.
    run = json.loads((tmp_path / "run" / "mot_run.json").read_text())
    assert run["quantization"] == {"method": "bitsandbytes", "bits": 4, "type": "nf4"}
    merged_card = ModelCard.load(tmp_path / "merged" / "README.md").text
    assert "The student was trained on a 4-bit (bitsandbytes nf4) copy of the base." in merged_card
    assert "this merged model differs from the student as trained by the base's own quantization error" in merged_card
    trainer.save_adapter(tmp_path / "adapter")
    card = ModelCard.load(tmp_path / "adapter" / "README.md").text
    assert "base + this adapter differs from the student as trained" in card and "same quantization config" in card
    assert "student weights: 4-bit (bitsandbytes nf4)" in card
    assert "merge_of_thought.quantization.keep_4bit_layout(model)" in card and "up to 1.41" in card


def test_recorded_ids_are_hub_ids():
    from merge_of_thought.hub import hub_id, is_local_path
    from merge_of_thought.scripts.train import TeacherConfig, hub_dataset_id

    snapshot = (
        "/root/.cache/huggingface/hub/models--Qwen--Qwen3-0.6B/snapshots/c1899de289a04d12100db370d81485cdf75e47ca"
    )
    assert hub_id(snapshot) == "Qwen/Qwen3-0.6B" and hub_id("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"
    assert is_local_path("/tmp/model") and is_local_path("./model") and not is_local_path("Qwen/Qwen3-0.6B")
    assert hub_dataset_id(TeacherConfig(path="open-r1/OpenR1-Math-220k", teacher="r1")) == "open-r1/OpenR1-Math-220k"
    assert hub_dataset_id(TeacherConfig(path="json", data_files="traces.jsonl", teacher="local")) is None
