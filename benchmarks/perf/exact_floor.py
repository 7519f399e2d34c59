"""What an exact merged delta costs a student whose weights cannot hold it, by arithmetic on the layer shapes.

A 4-bit or bf16 student keeps the merged delta beside its weights (frozen.py). Exactly, that is fp32 low-rank factors
of rank K*r*(t-1) in round t with fresh branches (the paper's MoT), or a dense fp32 matrix per layer; either way
it is memory the plain QLoRA run does not have, and the low-rank form is also compute every step: a pass of rank R
costs R*(in+out) multiply-adds per token and layer against the base's in*out. This table states that floor for
the paper's T=5, K=4, r=16 on the students the performance issue names, beside the plain run's measured peak
where perf.json has one, so the goal (MoT memory and step time <= 1.05x plain) can be read against it.

    python benchmarks/perf/exact_floor.py      # seconds: meta-device models, no weights
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SIZES  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpu_fit import QWEN3_8B  # noqa: E402

ROUNDS, TEACHERS, RANK = 5, 4, 16
MB = 2**20
STUDENTS = {  # name: (config, where a plain run's peak memory was measured: perf.json record, or None)
    "70M Qwen3 (perf benchmark)": (Qwen3Config(vocab_size=100, tie_word_embeddings=False, **SIZES["70m"]),
                                   "overhead_nf4_paper"),
    "SmolLM2-135M (real student)": (LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                                num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                                tie_word_embeddings=True), "overhead_nf4_paper_smollm2"),
    "Qwen3-8B (GPU fit)": (Qwen3Config(**QWEN3_8B), None),
}


def linear_shapes(config) -> tuple[list[tuple[int, int]], int]:
    """(in, out) of every linear layer LoRA's all-linear adapts (all but the output head), from a meta model, and
    the output head's parameter count."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    shapes = [(m.in_features, m.out_features) for m in model.modules()
              if isinstance(m, torch.nn.Linear) and m is not head]  # fmt: skip
    return shapes, head.weight.numel()


def step_flops_per_token(params: int, edges: int, head: int, frozen_rank: int) -> int:
    """Multiply-adds per token of one QLoRA training step's matmuls: the frozen base linears and output head forward
    and input gradient (2 each), the rank-r branch forward and both gradients (3), the frozen merged pass of
    ``frozen_rank`` forward and input gradient (2). Attention's score products (short sequences here) and the
    element-wise work are left out, so the ratio of two steps is what their matmul FLOPs alone predict."""
    return 2 * (params + head) + 3 * RANK * edges + 2 * frozen_rank * edges


def floor(shapes: list[tuple[int, int]], head: int, plain_peak_mb: float | None) -> dict:
    params = sum(i * o for i, o in shapes)
    edges = sum(i + o for i, o in shapes)
    row = {"linear_params_M": params / 1e6, "nf4_weights_MB": params * (0.5 + 4 / 64) / MB,  # 4 bits + fp32 absmax/64
           "dense_fp32_delta_MB": 4 * params / MB, "plain_peak_MB": plain_peak_mb, "ranks": {}}
    for name, rank in (("fresh", TEACHERS * RANK * (ROUNDS - 1)), ("persistent", (TEACHERS + 1) * RANK)):
        factors_mb = 4 * rank * edges / MB
        row["ranks"][name] = {
            "frozen_rank_last_round": rank,
            "factors_fp32_MB": factors_mb,
            "factors_vs_plain_peak": factors_mb / plain_peak_mb if plain_peak_mb else None,
            "extra_linear_flops": rank * edges / params,  # the frozen pass per token against the base linears'
            # the last round's step against round 1's (no frozen pass), by matmul FLOPs: the step-time floor
            "step_flops_ratio": step_flops_per_token(params, edges, head, rank)
            / step_flops_per_token(params, edges, head, 0),
        }
    return row


def main() -> None:
    perf = json.loads((RESULTS / "perf.json").read_text()) if (RESULTS / "perf.json").exists() else {}
    rows = {}
    for name, (config, record) in STUDENTS.items():
        runs = perf.get(record, {}).get("runs", {}).get("plain", []) if record else []
        peak = sum(r["peak_rss_mb"] for r in runs) / len(runs) if runs else None
        rows[name] = floor(*linear_shapes(config), peak)
    lines = [
        "# The floor of an exact merged delta beside 4-bit or bf16 weights",
        "",
        f"Command: `python benchmarks/perf/exact_floor.py` (arithmetic on the layer shapes). T={ROUNDS}, K={TEACHERS}, "
        f"r={RANK}; the last round trains above a frozen delta of rank K*r*(T-1) with fresh branches (the default) and "
        "(K+1)*r with persistent ones (the merged K*r and the branch's own r). Extra FLOPs: the frozen low-rank pass "
        "per token against the adapted base linears' (forward and input gradient alike). Plain peak: the plain QLoRA "
        "run's measured peak RSS (perf.json), where there is one. Step FLOPs: the last round's training step against "
        "round 1's by matmul multiply-adds per token (base linears and output head forward and input gradient, the "
        "LoRA branch forward and both gradients, the frozen pass forward and input gradient): what a step time would "
        "grow by if it were all matmuls.",
        "",
        "| student | linear params | nf4 weights | dense fp32 delta | branches | frozen rank | fp32 factors | "
        "vs plain peak | extra linear FLOPs | step FLOPs last/first round |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        for kind, r in row["ranks"].items():
            peak = row["plain_peak_MB"]
            share = f"{r['factors_vs_plain_peak']:.1%} of {peak:.0f} MB" if peak else "-"
            lines.append(
                f"| {name} | {row['linear_params_M']:.0f}M | {row['nf4_weights_MB']:.0f} MB | "
                f"{row['dense_fp32_delta_MB']:.0f} MB | {kind} | {r['frozen_rank_last_round']} | "
                f"{r['factors_fp32_MB']:.0f} MB | {share} | {r['extra_linear_flops']:.0%} | "
                f"{r['step_flops_ratio']:.2f}x |"
            )
    lines += [
        "",
        "Every figure is a floor for an exact delta the weights cannot hold: fp32 factors (or a dense fp32 matrix, "
        "never smaller here) must be in memory while a branch trains above them, and the low-rank pass adds the "
        "extra FLOPs to each adapted layer. A student with fp32 weights needs neither (frozen_delta='weights').",
        "",
    ]
    (RESULTS / "exact_floor.md").write_text("\n".join(lines))
    (RESULTS / "exact_floor.json").write_text(json.dumps(
        {"command": "python benchmarks/perf/exact_floor.py", "rounds": ROUNDS, "teachers": TEACHERS, "rank": RANK,
         "students": rows}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
