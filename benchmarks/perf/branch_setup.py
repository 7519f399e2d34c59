"""What a branch's adapter costs to set up on SmolLM2-135M in nf4 with a merged adapter attached: PEFT's
``add_adapter`` + ``delete_adapter`` per branch (MoT before issue 38's change) against re-initialising one attached
adapter in place (``adapters.add_branch_adapter`` now), alternating in one process so both see the same machine.

    python benchmarks/perf/branch_setup.py             # 8 branches of each, r=16 on all linear layers

Writes benchmarks/results/branch_setup.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from statistics import median

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from hardware import describe, identity  # noqa: E402

RESULTS = HERE.parent / "results"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--branches", type=int, default=8)
    parser.add_argument("--results-dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from merge_of_thought import adapters
    from merge_of_thought.merging import LowRankDelta
    from merge_of_thought.quantization import keep_4bit_layout
    from merge_of_thought.students import smollm2_135m

    torch.set_num_threads(2)
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_135m()), quantization_config=nf4)
    keep_4bit_layout(model)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = adapters.add_branch_adapter(model, "first", lora, seed=0)  # the linear layers MoT's adapters cover
    names = list(adapters.lora_layers(model))
    shapes = {n: (layer.out_features, layer.in_features) for n, layer in adapters.lora_layers(model).items()}
    adapters.remove_adapter(model, "first")
    merged = {n: LowRankDelta(torch.randn(o, 64) * 1e-3, torch.randn(64, i) * 1e-3) for n, (o, i) in shapes.items()}
    model = adapters.install_merged(model, merged, None, "CAUSAL_LM")  # round 2's student: rank 64 frozen
    times: dict[str, list[float]] = {"add_and_delete": [], "reinitialise": []}
    for k in range(args.branches):
        start = time.perf_counter()  # before: a new adapter per branch, deleted after it
        model = adapters.add_branch_adapter(model, f"branch_{k}", lora, seed=k)
        adapters.remove_adapter(model, f"branch_{k}")
        times["add_and_delete"].append(time.perf_counter() - start)
        start = time.perf_counter()  # now: one adapter, re-initialised (its first add is once a round)
        model = adapters.add_branch_adapter(model, adapters.BRANCH_ADAPTER, lora, seed=k)
        adapters.silence_adapter(model, adapters.BRANCH_ADAPTER)
        times["reinitialise"].append(time.perf_counter() - start)
    result = {"command": "python benchmarks/perf/branch_setup.py " + " ".join(argv or sys.argv[1:]),
              "machine": identity(), "layers": len(names), "seconds": times,
              "median": {k: median(v[1:]) for k, v in times.items()}}  # fmt: skip
    ratio = result["median"]["add_and_delete"] / result["median"]["reinitialise"]
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "branch_setup.json").write_text(json.dumps(result, indent=1))
    (out / "branch_setup.md").write_text(
        f"# A branch adapter's set-up: SmolLM2-135M nf4, {len(names)} LoRA layers, merged adapter attached\n\n"
        f"Command: `{result['command'].strip()}`. Machine: {describe(result['machine'])}.\n"
        f"Median over branches 2-{args.branches} (the first of each warms up), alternating in one process.\n\n"
        "| set-up | seconds a branch |\n|---|---:|\n"
        f"| PEFT add_adapter + delete_adapter (before) | {result['median']['add_and_delete']:.3f} |\n"
        f"| re-initialise the attached adapter (now) | {result['median']['reinitialise']:.3f} |\n\n"
        f"Ratio: {ratio:.0f}x.\n"
    )
    print((out / "branch_setup.md").read_text())
    return result


if __name__ == "__main__":
    main()
