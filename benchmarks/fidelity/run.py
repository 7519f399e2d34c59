"""Merge fidelity per student precision: after round 2, do the weights round 3 would train from equal
``student_2 + sum_k w_k dW_k``? Relative error per adapted layer against the saved branch adapters.

    python benchmarks/fidelity/run.py     # tiny Qwen3, 2 teachers, 2 rounds; about a minute on 2 cores

Writes benchmarks/results/fidelity.json and fidelity.md.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, TrainerCallback

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import make_teacher, tiny_config  # noqa: E402
from helpers import dense_adapter, quick_trainer  # noqa: E402
from test_trainer import PRECISIONS, effective_weights  # noqa: E402

from merge_of_thought.demo.tokenizer import build_char_tokenizer  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


class Snapshot(TrainerCallback):
    """The effective weights at the start of each round (first branch), i.e. what that round trains from."""

    def __init__(self):
        self.seen = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.seen.setdefault(args.run_name.split("/")[0], effective_weights(model))


def main() -> None:
    torch.set_num_threads(1)
    tokenizer = build_char_tokenizer()
    model_dir = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("qwen3", len(tokenizer))).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    results = {}
    for precision, load_kwargs in PRECISIONS.items():
        out, snapshot = Path(tempfile.mkdtemp()), Snapshot()
        model = AutoModelForCausalLM.from_pretrained(model_dir, **load_kwargs)
        trainer = quick_trainer(model, {f"teacher{k}": make_teacher(k, seed=k) for k in range(2)}, out)
        trainer.callbacks.append(snapshot)
        trainer.train()
        after, before = effective_weights(trainer.model), snapshot.seen["round2"]
        branches = [dense_adapter(out / "round-002" / f"branch-teacher{k}") for k in range(2)]
        errors = []
        for name in after:
            update = 0.5 * branches[0][name] + 0.5 * branches[1][name]
            errors.append(((after[name] - before[name] - update).norm() / update.norm()).item())
        results[precision] = {"max_rel_error": max(errors), "mean_rel_error": sum(errors) / len(errors),
                              "layers": len(errors)}
        print(precision, results[precision], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"command": "python benchmarks/fidelity/run.py", "bound": 1e-3, "results": results}
    (RESULTS / "fidelity.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["# Merge fidelity per student precision", "", f"Command: `{record['command']}` (tiny Qwen3, 2 teachers, "
             "2 rounds x 2 steps). Relative error per adapted layer of the weights round 3 would train from against "
             "`student_2 + sum_k w_k dW_k` recomputed from the saved branch adapters; the requirement is <= 1e-3.",
             "", "| student precision | max relative error | mean | layers |", "|---|---|---|---|"]
    lines += [f"| {p} | {r['max_rel_error']:.2e} | {r['mean_rel_error']:.2e} | {r['layers']} |"
              for p, r in results.items()]
    (RESULTS / "fidelity.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
