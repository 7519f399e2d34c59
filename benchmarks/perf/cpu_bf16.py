"""bf16 against fp32 on the CPU: TRL SFT step time for an fp32 and an nf4 student, side by side in one run.

    python benchmarks/perf/cpu_bf16.py                 # 70M Qwen3, batch 8, 6 timed steps per setting
    python benchmarks/perf/cpu_bf16.py --steps 2       # a quick look (bf16 is very slow on CPUs without native bf16)

What MoTConfig's CPU default for ``bf16`` rests on. Settings: the student in fp32 or nf4 (compute dtype fp32, or bf16
when bf16 is on), LoRA r=16 on all linear layers, fp32 LoRA parameters; ``bf16=True`` is TRL's bf16 autocast. Each
setting trains in its own process, one after another, twice in the order ABCD DCBA (``--passes 1``: once); the
first step of a process is not timed. Writes benchmarks/results/cpu_bf16.{json,md}, naming the CPU and its bf16
capabilities, one record per kind of CPU (a run replaces only its own kind's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import RESULTS, build_student, machine, teacher_data  # noqa: E402
from hardware import cpu_flags, cpu_name  # noqa: E402

SETTINGS = [("fp32", False), ("fp32", True), ("nf4", False), ("nf4", True)]  # (student, bf16)


def cpu_capabilities() -> dict:
    """The CPU's name and the flags that decide bf16 speed (native AVX512-BF16 or AMX; oneDNN's own check)."""
    flags, name = cpu_flags(), cpu_name()
    from merge_of_thought.mot_config import _cpu_has_native_bf16
    from merge_of_thought.quantization import cpu_repacks_4bit

    return {"cpu_model": name, "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "onednn_bf16": _cpu_has_native_bf16(), "bitsandbytes_avx512bf16": cpu_repacks_4bit()}  # fmt: skip


def worker(model_dir: str, student: str, bf16: bool, steps: int, batch: int) -> dict:
    """One setting in this process: ``steps + 1`` SFT steps; returns the times of all but the first."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from merge_of_thought.quantization import keep_4bit_layout

    torch.set_num_threads(2)
    if student == "nf4":
        compute = torch.bfloat16 if bf16 else torch.float32
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant)
        keep_4bit_layout(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory(prefix="mot-bf16-") as out:
        args = SFTConfig(output_dir=out, max_steps=steps + 1, per_device_train_batch_size=batch, learning_rate=1e-4,
                         bf16=bf16, gradient_checkpointing=False, report_to=[], logging_steps=10**6,
                         save_strategy="no", disable_tqdm=True, seed=0, dataloader_pin_memory=False,
                         max_length=64, use_cpu=not torch.cuda.is_available())  # fmt: skip
        lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = SFTTrainer(model, args=args, train_dataset=teacher_data(0), peft_config=lora, callbacks=[Stamp()])
        for param in trainer.model.parameters():  # fp32 adapters for every setting, as MoTTrainer keeps them
            if param.requires_grad:
                param.data = param.data.float()
        trainer.train()
    times = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"student": student, "bf16": bf16, "step_seconds": times}


def cpu_kind(cpu: dict) -> str:
    """A CPU's name and the bf16 capabilities that decide the result."""
    native = [name for name, key in (("AVX512-BF16", "avx512_bf16"), ("AMX-BF16", "amx_bf16")) if cpu[key]]
    return f"{cpu['cpu_model']} ({', '.join(native) or 'no native bf16'})"


def _load_records(path: Path) -> dict[str, dict]:
    """The records of earlier runs by kind of CPU (a file from before this layout held one record)."""
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    return {cpu_kind(saved["machine"]): saved} if "command" in saved else saved


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="70m", choices=["70m", "tiny"])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per setting and pass")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--passes", type=int, default=2, choices=[1, 2], help="2: ABCD then DCBA; 1: ABCD")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL_DIR", "STUDENT", "BF16"), help=argparse.SUPPRESS)
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.worker:
        model_dir, student, bf16 = args.worker
        print(json.dumps(worker(model_dir, student, bf16 == "1", args.steps, args.batch)))
        return {}
    work = Path(tempfile.gettempdir()) / f"mot-bf16-student-{args.size}"
    model_dir = build_student(work, args.size)
    runs: dict[str, list[float]] = {}
    for student, bf16 in (SETTINGS + SETTINGS[::-1])[: 4 * args.passes]:
        command = [sys.executable, __file__, "--worker", model_dir, student, "1" if bf16 else "0",
                   "--steps", str(args.steps), "--batch", str(args.batch)]  # fmt: skip
        line = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        result = json.loads(line)
        runs.setdefault(f"{student} {'bf16' if bf16 else 'fp32'}", []).extend(result["step_seconds"])
        print(f"{student} student, bf16={bf16}: {statistics.median(result['step_seconds']):.2f} s/step", flush=True)
    medians = {name: statistics.median(times) for name, times in runs.items()}
    record = {
        "command": "python benchmarks/perf/cpu_bf16.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "size": args.size, "batch": args.batch, "seq": 64, "steps_per_pass": args.steps, "passes": args.passes,
        "machine": {**machine(), **cpu_capabilities()}, "median_step_seconds": medians, "step_seconds": runs,
        "bf16_over_fp32": {s: medians[f"{s} bf16"] / medians[f"{s} fp32"] for s in ("fp32", "nf4")},
    }  # fmt: skip
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    records = _load_records(out / "cpu_bf16.json")
    records[cpu_kind(record["machine"])] = record  # one record per kind of CPU: the default depends on it
    (out / "cpu_bf16.json").write_text(json.dumps(records, indent=2) + "\n")
    lines = [
        "# bf16 against fp32 on the CPU", "",
        f"{args.size} Qwen3, batch {args.batch} x 64 tokens, LoRA r=16 all-linear, fp32 LoRA parameters; median "
        "s/step per setting, each setting in its own process. One row per kind of CPU measured (cpu_bf16.json keeps "
        "every record, with its command and machine).",
        "",
        "| CPU | threads | oneDNN bf16 | student | fp32 s/step | bf16 s/step | bf16 / fp32 | command |",
        "|---|---:|---|---|---:|---:|---:|---|",
    ]  # fmt: skip
    for kind, rec in records.items():
        medians, cpu = rec["median_step_seconds"], rec["machine"]
        for s in ("fp32", "nf4"):
            lines.append(f"| {kind} | {cpu['threads']} | {cpu['onednn_bf16']} | {s} | {medians[f'{s} fp32']:.2f} | "
                         f"{medians[f'{s} bf16']:.2f} | {rec['bf16_over_fp32'][s]:.2f} | `{rec['command'].strip()}` |")
    (out / "cpu_bf16.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return record


if __name__ == "__main__":
    main()
