"""benchmarks/gpu_fit.py keeps working: its tiny CPU mode runs the same path (in-place nf4 student, MoT, plain)."""

import importlib.util
from pathlib import Path

import bitsandbytes as bnb

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_fit.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_fit", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_fit_tiny_mode_runs_both_paths():
    gpu_fit = load_script()
    model = gpu_fit.quantized_student(gpu_fit.TINY, "cpu")
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 7 * gpu_fit.TINY["num_hidden_layers"]
    assert linears[0].weight.quant_state.quant_type == "nf4"
    for mode in ("mot", "plain"):
        result = gpu_fit.worker(mode, tiny=True, steps=1)
        assert result["steps"] == 2 and result["tokens_per_second"] > 0
