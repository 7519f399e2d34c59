"""One MoT merge of K branch adapters into a 4-bit student, three ways, each in its own process:

- ``mot``: this project's merge (factor concatenation + QR/SVD recompression, fp32 adapter on the untouched base);
- ``peft_4bit``: PEFT's merge_and_unload straight into the 4-bit weights (dequantize, add, requantize);
- ``bf16_requant``: the usual workaround: reload the base in bf16, merge there, quantize the result to nf4 again.

Reported per method: wall time, peak extra memory (RSS above the loaded model), and fidelity: the relative error
of the change in effective weights against the exact weighted mean of the branch deltas. The branch deltas are
random LoRA factors scaled to 0.5% of each weight's norm (the size a short SFT branch produces).

    python benchmarks/perf/merge.py            # 70M Qwen3, 4 branches of rank 16
    python benchmarks/perf/merge.py --quick    # tiny model
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Timer, build_student, machine, update_results  # noqa: E402
from overhead import write_markdown  # noqa: E402

from merge_of_thought import adapters  # noqa: E402
from merge_of_thought.merging import LowRankDelta, merge_round  # noqa: E402

NF4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


class RssSampler:
    """Highest resident memory seen while the block runs (sampled every 2 ms), for the peak *extra* memory of a step
    that starts when the process has already been larger (ru_maxrss only knows the whole process's peak)."""

    def __enter__(self):
        import threading

        self.base = self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())
        self.extra = self.peak - self.base


def branch_deltas(model_dir: str, branches: int, rank: int) -> list[dict[str, LowRankDelta]]:
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(branches):
        deltas = {}
        for name, module in reference.named_modules():
            if name.split(".")[-1] in TARGETS:
                W = module.weight
                B, A = torch.randn(W.shape[0], rank, generator=g), torch.randn(rank, W.shape[1], generator=g)
                B *= 0.005 * W.norm() / (B @ A).norm()
                deltas[name] = LowRankDelta(B, A)
        out.append(deltas)
    return out


def effective(model) -> dict[str, torch.Tensor]:
    """Dequantized base plus any merged adapter, for every target layer."""
    model = model if isinstance(model, PeftModel) else get_peft_model(model, LoraConfig(target_modules=TARGETS, r=1))
    weights = {}
    for name, layer in adapters.lora_layers(model).items():
        W = adapters.base_weight(layer).double()
        if adapters.MERGED_ADAPTER in layer.lora_A:
            merged = adapters.MERGED_ADAPTER
            W += layer.lora_B[merged].weight.double() @ layer.lora_A[merged].weight.double()
        weights[name] = W
    return weights


def worker(method: str, model_dir: str, branches: int, rank: int) -> dict:
    torch.set_num_threads(2)
    deltas = branch_deltas(model_dir, branches, rank)
    weights = [1 / branches] * branches
    exact = {n: sum(w * d[n].dense().double() for w, d in zip(weights, deltas)) for n in deltas[0]}
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=NF4)
    before = effective(model)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=NF4)
    scratch_dir = tempfile.TemporaryDirectory(prefix="mot-merge-bench-")
    scratch = Path(scratch_dir.name)
    with RssSampler() as memory, Timer() as timer:
        if method == "mot":
            peft_model = get_peft_model(model, LoraConfig(target_modules=TARGETS, r=rank), adapter_name="unused")
            merged, _ = merge_round(None, deltas, weights)
            adapters.install_merged(peft_model, merged, model_dir)
            after_model = peft_model
        else:
            # one exact adapter holding the mean of the deltas (rank K*r), then folded the usual way
            merged, _ = merge_round(None, deltas, weights)
            folder = scratch / "merged"
            adapters.save_merged(merged, folder, model_dir)
            if method == "peft_4bit":
                after_model = PeftModel.from_pretrained(model, folder).merge_and_unload()
            else:  # bf16_requant
                del model
                bf16 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
                folded = PeftModel.from_pretrained(bf16, folder).merge_and_unload()
                out = scratch / "folded"
                folded.save_pretrained(out)
                del bf16, folded
                after_model = AutoModelForCausalLM.from_pretrained(out, quantization_config=NF4)
    after = effective(after_model)
    scratch_dir.cleanup()
    errors = [((after[n] - before[n]) - exact[n]).norm() / exact[n].norm() for n in exact]
    cosines = [torch.nn.functional.cosine_similarity((after[n] - before[n]).flatten(), exact[n].flatten(), dim=0)
               for n in exact]
    return {"seconds": timer.seconds, "extra_peak_mb": memory.extra, "rss_before_mb": memory.base,
            "rel_error_mean": float(torch.stack(errors).mean()), "rel_error_max": float(torch.stack(errors).max()),
            "cosine_mean": float(torch.stack(cosines).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--branches", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--worker", nargs=4)
    args = parser.parse_args()
    if args.worker:
        method, model_dir, branches, rank = args.worker
        print(json.dumps(worker(method, model_dir, int(branches), int(rank))))
        return
    size = "tiny" if args.quick else "70m"
    model_dir = build_student(Path(tempfile.gettempdir()) / f"mot-bench-{size}", size)
    record = {"size": size, "branches": args.branches, "rank": args.rank, "machine": machine(),
              "command": "python " + " ".join(sys.argv), "methods": {}}
    for method in ("mot", "peft_4bit", "bf16_requant"):
        cmd = [sys.executable, __file__, "--worker", method, model_dir, str(args.branches), str(args.rank)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        record["methods"][method] = json.loads(out.strip().splitlines()[-1])
        print(method, record["methods"][method], flush=True)
    ours = record["methods"]["mot"]
    md = [f"## merge: one round of {args.branches} rank-{args.rank} branches into a 4-bit {size} Qwen3", "",
          f"Command: `{record['command']}`", "",
          "| method | seconds | time vs ours | peak extra MB | rel. error to exact mean (mean / max) | cosine |",
          "|---|---|---|---|---|---|"]
    for method, r in record["methods"].items():
        md.append(f"| {method} | {r['seconds']:.2f} | {r['seconds'] / ours['seconds']:.2f}x | "
                  f"{r['extra_peak_mb']:.0f} | {r['rel_error_mean']:.2e} / {r['rel_error_max']:.2e} | "
                  f"{r['cosine_mean']:.3f} |")
    record["markdown"] = md + [""]
    update_results("merge_quick" if args.quick else "merge", record)
    write_markdown()


if __name__ == "__main__":
    main()
