"""benchmarks/gpu_fit.py keeps working: its tiny CPU mode runs the same path (in-place nf4 student, MoT, plain)."""

import bitsandbytes as bnb

from helpers import load_benchmark


def test_gpu_fit_tiny_mode_runs_both_paths():
    gpu_fit = load_benchmark("gpu_fit.py")
    model = gpu_fit.quantized_student(gpu_fit.TINY, "cpu")
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 7 * gpu_fit.TINY["num_hidden_layers"]
    assert linears[0].weight.quant_state.quant_type == "nf4"
    for mode in ("mot", "plain"):
        result = gpu_fit.worker(mode, tiny=True, steps=1)
        assert result["steps"] == 2 and result["tokens_per_second"] > 0
