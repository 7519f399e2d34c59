"""``mot merge``: exact weighted means of existing LoRA adapters, PEFT's TIES/DARE on the deltas, and refusals."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from peft.utils import merge_utils
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from merge_of_thought.adapters import lora_layers
from merge_of_thought.cli import main

from conftest import tiny_config
from helpers import dense_adapter


def save_lora(base_dir: str, folder: Path, seed: int, config) -> Path:
    """A randomly initialised (B != 0) adapter saved by PEFT itself, as a user's trained adapter would be."""
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def loras(qwen3_dir, tmp_path_factory):
    """Two adapters with different ranks, alphas and target modules (q_proj is shared)."""
    root = tmp_path_factory.mktemp("loras")
    config_a = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    config_b = LoraConfig(r=2, lora_alpha=16, target_modules=["q_proj", "k_proj"], init_lora_weights=False)
    return save_lora(qwen3_dir, root / "a", 1, config_a), save_lora(qwen3_dir, root / "b", 2, config_b)


def expected_sum(folders, weights) -> dict[str, torch.Tensor]:
    """sum_i w_i dW_i computed independently from the saved files (float64), zero where an adapter is absent."""
    out: dict[str, torch.Tensor] = {}
    for folder, weight in zip(folders, weights):
        for name, delta in dense_adapter(folder).items():
            out[name] = out.get(name, 0) + weight * delta
    return out


def test_linear_is_the_exact_weighted_mean_with_mixed_ranks(loras, qwen3_dir, tmp_path):
    out = tmp_path / "linear"
    assert main(["merge", str(loras[0]), str(loras[1]), "--weights", "3", "1", "--out", str(out)]) == 0
    expected = expected_sum(loras, [0.75, 0.25])
    got = dense_adapter(out)
    assert set(got) == set(expected) and any(name.endswith("q_proj") for name in got)
    for name in expected:
        assert (got[name] - expected[name]).norm() <= 1e-6 * expected[name].norm(), name
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 6 and config["base_model_name_or_path"] == qwen3_dir  # 4 + 2 on the shared q_proj
    assert json.loads((out / "mot_export.json").read_text())["relative_error_total"] == 0.0
    # PEFT's own exact combination ("cat") with the same normalized weights agrees.
    # Not "a" and "b": PEFT 0.22's load_adapter reports the first adapter's keys as missing from the second's
    # checkpoint when they contain the second's name ("b" is in "base_model"), a false warning.
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(qwen3_dir), loras[0], adapter_name="first")
    model.load_adapter(loras[1], adapter_name="second")
    model.add_weighted_adapter(["first", "second"], [0.75, 0.25], "cat", combination_type="cat")
    for name, layer in lora_layers(model).items():
        peft_delta = layer.lora_B["cat"].weight.double() @ layer.lora_A["cat"].weight.double() * layer.scaling["cat"]
        assert torch.allclose(peft_delta, expected[name], atol=1e-6), name
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "peft" and f"| {loras[0]} | 0.75 |" in card.text


def test_ties_comes_from_peft_merge_utils_applied_to_the_deltas(loras, tmp_path):
    out = tmp_path / "ties"
    args = ["merge", *map(str, loras), "--method", "ties", "--density", "0.5", "--rank", "64", "--out", str(out)]
    assert main(args) == 0
    dense = [dense_adapter(folder) for folder in loras]
    got = dense_adapter(out)
    for name in got:
        shape = next(d[name].shape for d in dense if name in d)
        tensors = [d[name].float() if name in d else torch.zeros(shape) for d in dense]
        expected = merge_utils.ties(tensors, torch.tensor([0.5, 0.5]), density=0.5).double()
        assert (got[name] - expected).norm() <= 1e-5 * expected.norm(), name  # rank 64 = full rank: exact


def test_dense_methods_default_to_the_input_rank_and_report_the_svd_error(loras, tmp_path):
    out = tmp_path / "prune"
    assert main(["merge", *map(str, loras), "--method", "magnitude_prune", "--density", "0.3", "--out", str(out)]) == 0
    report = json.loads((out / "mot_export.json").read_text())
    dense = [dense_adapter(folder) for folder in loras]
    for name, layer in report["layers"].items():
        ranks = [4 if name in dense[0] else 0, 2 if name in dense[1] else 0]
        shape = next(d[name].shape for d in dense if name in d)
        tensors = [d[name].float() if name in d else torch.zeros(shape) for d in dense]
        full = merge_utils.magnitude_prune(tensors, torch.tensor([0.5, 0.5]), density=0.3).double()
        s = torch.linalg.svdvals(full)
        keep = sum(ranks)
        assert layer["rank_after"] == keep
        best = math.sqrt(float((s[keep:] ** 2).sum()))  # Eckart-Young: the error of the best rank-k approximation
        assert layer["relative_error"] == pytest.approx(best / float(full.norm()), rel=1e-4)
    assert 0 < report["relative_error_total"] < 1


def test_into_base_writes_a_full_model(loras, qwen3_dir, tmp_path):
    out = tmp_path / "model"
    assert main(["merge", *map(str, loras), "--into-base", "--dtype", "float32", "--out", str(out)]) == 0
    merged = dict(AutoModelForCausalLM.from_pretrained(out).named_parameters())
    base = dict(AutoModelForCausalLM.from_pretrained(qwen3_dir).named_parameters())
    expected = expected_sum(loras, [0.5, 0.5])
    for name, param in merged.items():
        delta = expected.get(name.removesuffix(".weight"))
        target = base[name] if delta is None else (base[name].double() + delta).float()
        assert torch.allclose(param, target, atol=1e-6), name
    assert (out / "tokenizer.json").exists()
    data = ModelCard.load(out / "README.md").data
    assert data.library_name == "transformers" and data.base_model_relation == "merge"


def copy_with_config(folder: Path, dest: Path, **changes) -> Path:
    shutil.copytree(folder, dest)
    config = json.loads((dest / "adapter_config.json").read_text())
    config.update(changes)
    (dest / "adapter_config.json").write_text(json.dumps(config))
    return dest


def merge_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as info:
        main(["merge", *map(str, argv)])
    assert info.value.code == 2
    return capsys.readouterr().err


def test_adapters_of_another_base_are_refused_unless_allowed(loras, tmp_path, capsys):
    other = copy_with_config(loras[1], tmp_path / "other", base_model_name_or_path="org/another-model")
    err = merge_error(capsys, loras[0], other, "--out", tmp_path / "x")
    assert "different base models" in err and "org/another-model" in err and "--allow-different-base" in err
    assert main(["merge", str(loras[0]), str(other), "--allow-different-base", "--out", str(tmp_path / "y")]) == 0


def test_other_shapes_are_refused_naming_the_layer(loras, tmp_path, tokenizer, capsys):
    config = tiny_config("qwen3", len(tokenizer))
    config.hidden_size, config.head_dim = 32, 8
    small = tmp_path / "small-base"
    AutoModelForCausalLM.from_config(config).save_pretrained(small)
    lora = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    narrow = save_lora(str(small), tmp_path / "narrow", 3, lora)
    narrow = copy_with_config(narrow, tmp_path / "narrow-same-base", base_model_name_or_path=None)
    err = merge_error(capsys, loras[0], narrow, "--out", tmp_path / "x")
    assert "model.layers.0.self_attn.q_proj is 64x64" in err and "32x32" in err


def test_pickle_adapters_are_refused_unless_opted_in(loras, tmp_path, capsys):
    pickled = copy_with_config(loras[0], tmp_path / "pickled")
    torch.save(load_file(str(pickled / "adapter_model.safetensors")), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    err = merge_error(capsys, pickled, loras[1], "--out", tmp_path / "x")
    assert "pickle" in err and "--allow-pickle" in err
    out = tmp_path / "ok"
    assert main(["merge", str(pickled), str(loras[1]), "--allow-pickle", "--out", str(out)]) == 0
    expected = expected_sum(loras, [0.5, 0.5])
    assert all(torch.allclose(dense_adapter(out)[n], expected[n], atol=1e-6) for n in expected)


def test_non_delta_adapters_are_refused_with_the_reason(loras, qwen3_dir, tmp_path, capsys):
    dora = copy_with_config(loras[0], tmp_path / "dora", use_dora=True)
    assert "use_dora=True cannot be merged" in merge_error(capsys, dora, loras[1], "--out", tmp_path / "x")
    pissa = copy_with_config(loras[0], tmp_path / "pissa", init_lora_weights="pissa")
    assert "rewrites the base weights" in merge_error(capsys, pissa, loras[1], "--out", tmp_path / "x")
    torch.manual_seed(0)
    ia3_config = IA3Config(target_modules=["q_proj"], feedforward_modules=[])
    ia3 = get_peft_model(AutoModelForCausalLM.from_pretrained(qwen3_dir), ia3_config)
    ia3.save_pretrained(tmp_path / "ia3")
    assert "LoRA" in merge_error(capsys, tmp_path / "ia3", loras[1], "--out", tmp_path / "x")
    assert "needs --density" in merge_error(capsys, *loras, "--method", "ties", "--out", tmp_path / "x")


def test_a_missing_adapter_folder_is_named_as_one(loras, tmp_path, capsys):
    missing = tmp_path / "no-such-lora"
    err = merge_error(capsys, missing, loras[1], "--out", tmp_path / "x")
    assert err == f"mot: error: adapter '{missing}': no such folder (a local adapter is a folder with " \
        "adapter_config.json and adapter_model.safetensors).\n"
    err = merge_error(capsys, "./no-such-lora", loras[1], "--out", tmp_path / "x")
    assert "adapter './no-such-lora': no such folder" in err and "Repo id" not in err
    err = merge_error(capsys, "not a repo id", loras[1], "--out", tmp_path / "x")
    assert "adapter 'not a repo id': neither a local folder nor a Hub repo id (org/name)" in err
    assert not (tmp_path / "x").exists()
