"""The machine a benchmark ran on, described the same way by every benchmark.

A run is a function of its seed *and* its machine: the kernels a CPU's vector extensions select round differently,
and hundreds of SFT steps turn that into another run (benchmarks/quality/README.md: MoT seed 0 scored 0.43 on an AMD
EPYC without AVX512 and 0.84 on one with AVX512-BF16). So benchmarks cache runs per ``identity()`` and every
results file names the CPU.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import platform
from pathlib import Path

# The CPU flags that pick torch's and bitsandbytes' kernels.
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")


@functools.cache
def _cpuinfo() -> str:
    """/proc/cpuinfo, read once a process (every field used here is fixed while it runs)."""
    path = Path("/proc/cpuinfo")
    return path.read_text() if path.exists() else ""


def cpu_name() -> str:
    """The CPU's model name (``platform.processor()`` is empty or just "x86_64" on Linux)."""
    names = [line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines() if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def cpu_generation() -> str:
    """The CPU's family and model numbers: one model name ("AMD EPYC") covers generations whose kernels differ."""
    fields = dict(line.split(":", 1) for line in _cpuinfo().splitlines()[:12] if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    return f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"


def cpu_flags() -> set[str]:
    """Every flag /proc/cpuinfo lists (empty where there is none)."""
    return set(_cpuinfo().split())


def gpu_name() -> str | None:
    """The CUDA GPU a run would train on (the current device), or None on a machine without one."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def identity() -> dict:
    """The CPU, the GPU if there is one, and the numeric libraries that, besides the seed, decide a run's
    floating-point results. (A CPU-only machine's identity has no GPU key, so runs cached before GPUs were named
    keep their folder.)"""
    flags = cpu_flags()
    machine = {"cpu": cpu_name(), "cpu_generation": cpu_generation(),
               "cpu_flags": [flag for flag in KERNEL_FLAGS if flag in flags],
               **{lib: importlib.metadata.version(lib) for lib in ("torch", "bitsandbytes", "transformers", "peft")}}
    gpu = gpu_name()
    if gpu is not None:
        machine["gpu"] = gpu
    return machine


def identity_tag(machine: dict) -> str:
    """A short name for a machine identity: the cache folder of its runs."""
    return hashlib.sha256(json.dumps(machine, sort_keys=True).encode()).hexdigest()[:8]


def describe(machine: dict) -> str:
    """One line for a results file: the CPU, its kernel flags, the libraries."""
    flags = ", ".join(machine["cpu_flags"]) or "none of " + ", ".join(KERNEL_FLAGS)
    libraries = ", ".join(f"{lib} {machine[lib]}" for lib in ("torch", "bitsandbytes", "transformers", "peft"))
    generation = f", {machine['cpu_generation']}" if "cpu_generation" in machine else ""  # absent before 2026-12-02
    gpu = f"; GPU: {machine['gpu']}" if machine.get("gpu") else ""
    return f"{machine['cpu']}{generation} ({flags}){gpu}; {libraries}"


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse. By default it hands every large block (the logits, each layer's
    dequantized weight) back to the kernel and faults it in again at the next step: on a 2-core AMD EPYC with
    AVX512-BF16 a SmolLM2 nf4 step (batch 8 x 128 tokens) took 6.5 s that way and 5.3 s with this, and on an Intel
    Xeon a MoT run's fp32 SmolLM2 steps after its larger merges stopped spiking to 2-3 s (perf.json). Timing only:
    the arithmetic, and so every result, is unchanged."""
    from merge_of_thought.collection import glibc

    libc = glibc()
    if libc is None:
        return
    mmap_max, trim_threshold, top_pad = -4, -1, -2  # glibc's mallopt parameters (malloc.h)
    libc.mallopt(mmap_max, 0)
    libc.mallopt(trim_threshold, 2**31 - 1)
    libc.mallopt(top_pad, 2**28)
