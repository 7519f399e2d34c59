"""benchmarks/gpu_fit.py keeps working: its --tiny mode runs the GPU measurement's code path on the CPU (the nf4
student built layer by layer, plain QLoRA, a MoT round above a round-5-sized frozen adapter, the eval-loss pass), and a
failing worker's traceback reaches the console and the record."""

import json

import bitsandbytes as bnb
import torch

from helpers import load_benchmark


def test_the_student_is_quantized_as_it_is_built():
    gpu_fit = load_benchmark("gpu_fit.py")
    model = gpu_fit.nf4_student(gpu_fit.TINY, "cpu", torch.float32)
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 7 * gpu_fit.TINY["num_hidden_layers"]
    assert all(m.weight.bnb_quantized and m.weight.quant_state.quant_type == "nf4" for m in linears)
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    assert model.lm_head.weight.dtype == torch.float32 and isinstance(model.lm_head, torch.nn.Linear)  # as bnb loads
    logits = model(input_ids=torch.arange(4, 20)[None]).logits
    assert logits.shape == (1, 16, gpu_fit.TINY["vocab_size"]) and logits.isfinite().all() and logits.std() > 0


def test_tiny_mode_measures_both_runs(tmp_path):
    gpu_fit = load_benchmark("gpu_fit.py")
    record = gpu_fit.main(["--tiny", "--out", str(tmp_path)])
    plain, mot = record["runs"]["plain"], record["runs"]["mot"]
    settings = gpu_fit.Settings.tiny()
    assert plain["steps"] == mot["steps"] == settings.teachers * settings.steps
    assert mot["frozen_adapter"]["rank"] == settings.frozen_rank
    assert mot["one_pass_layers"] == 7 * gpu_fit.TINY["num_hidden_layers"] and plain["one_pass_layers"] == 0
    assert mot["eval_batch"] == 1 < mot["eval_batch_asked"]  # the eval-loss pass at the train batch
    assert mot["eval_loss"] > 0 and record["comparison"]["complete"]
    assert record["comparison"]["step_time_ratio"] > 0
    saved = json.loads((tmp_path / "gpu_fit_tiny_cpu.json").read_text())
    assert saved["comparison"] == record["comparison"]
    assert "| mot |" in (tmp_path / "gpu_fit_tiny_cpu.md").read_text()


def test_a_failing_worker_shows_its_traceback(tmp_path, capfd):
    gpu_fit = load_benchmark("gpu_fit.py")
    record = gpu_fit.main(["--tiny", "--steps", "0", "--out", str(tmp_path)])
    assert "max_steps must be at least 1" in record["runs"]["mot"]["error"]
    assert not record["comparison"]["complete"]
    err = capfd.readouterr().err
    assert "Traceback (most recent call last)" in err and "max_steps must be at least 1" in err
