"""devices.py and the GPU-facing fixes around it (issue 35), shown on the CPU: what the code does on a CUDA machine is
reached by making torch report one (``torch.cuda.is_available`` and friends), never by a mock of MoT's own code."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
from trl import SFTConfig

from merge_of_thought import MoTConfig, adapters, collection, devices, distributed
from merge_of_thought.checkpointing import SavedDelta
from merge_of_thought.frozen import FrozenDelta
from merge_of_thought.guards import BranchDivergedError, DivergenceGuard, by_device, first_non_finite
from merge_of_thought.merging import LowRankDelta, merge_round

from helpers import load_benchmark


@pytest.fixture
def launched(monkeypatch):
    """This process as process 1 of a two-process launch on one machine (as detach_from_launcher records it)."""
    env = distributed.LauncherEnv(1, 2, 1, "127.0.0.1", 29500, local_world_size=2)
    monkeypatch.setattr(distributed, "_launcher", env)
    return env


@pytest.fixture
def two_gpus(monkeypatch):
    """torch reports two CUDA GPUs with bf16; ``set_device`` records what it was asked for instead of a driver call."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(torch.device(device)))
    return calls


# ---------------------------------------------------------------- 2: finite-flags of a model spread over devices
def test_finite_flags_are_reduced_per_device_before_they_meet():
    cpu = {"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")]), "c": torch.tensor([float("inf")])}
    assert first_non_finite(cpu) == "b"
    assert first_non_finite({"a": torch.ones(2)}) is None and first_non_finite({}) is None
    huge = {"a": torch.full((4,), 1e30), "b": torch.ones(2)}  # finite, but their norm overflows in fp32
    assert not torch.linalg.vector_norm(huge["a"]).isfinite()
    assert first_non_finite(huge) is None
    spread = {"a": torch.ones(2), "m": torch.ones(2, device="meta"), "b": torch.zeros(2)}
    with pytest.raises(RuntimeError):  # what the guard did before: one stack over every device's flags
        torch.stack([t.isfinite().all() for t in spread.values()])
    groups = by_device(spread)
    assert groups == {torch.device("cpu"): ["a", "b"], torch.device("meta"): ["m"]}
    for names in groups.values():  # each group stacks on its own device
        assert torch.stack([spread[n].isfinite().all() for n in names]).device == spread[names[0]].device


def test_the_guard_names_the_non_finite_gradient():
    model = torch.nn.Linear(2, 2)
    model.weight.grad = torch.tensor([[0.0, 1.0], [float("nan"), 0.0]])
    model.bias.grad = torch.zeros(2)
    with pytest.raises(BranchDivergedError, match="NaN \\(gradient of weight\\)"):
        DivergenceGuard("t", 1).on_pre_optimizer_step(None, type("State", (), {"global_step": 0}), None, model=model)


# ---------------------------------------------------------------- 3: building TrainingArguments keeps the pinned GPU
def test_building_configs_under_a_launcher_never_selects_gpu_0(launched, two_gpus, tmp_path):
    SFTConfig(output_dir=str(tmp_path), bf16=False, report_to=[])
    assert torch.device("cuda:0") in two_gpus  # transformers' single-process set-up, left alone: GPU 0
    two_gpus.clear()
    set_device = torch.cuda.set_device
    with distributed.device_setup_on_pinned_gpu():
        sft = distributed.pin_device(SFTConfig(output_dir=str(tmp_path), bf16=False, report_to=[]))
    config = MoTConfig(output_dir=str(tmp_path), bf16=False, report_to=[])
    assert two_gpus and set(two_gpus) == {torch.device("cuda:1")}, two_gpus
    assert sft.device == config.device == torch.device("cuda:1") and config.n_gpu == 1
    assert torch.cuda.set_device is set_device  # put back, not left redirected


def test_without_a_launcher_the_device_setup_is_transformers_own(two_gpus, monkeypatch, tmp_path):
    monkeypatch.setattr(distributed, "_launcher", None)
    with distributed.device_setup_on_pinned_gpu():
        SFTConfig(output_dir=str(tmp_path), bf16=False, report_to=[])
    assert two_gpus == [torch.device("cuda:0")]


# ---------------------------------------------------------------- 4: the eval-loss pass's batch
def test_the_eval_loss_batch_never_exceeds_the_train_batch(tmp_path):
    def batch(train: int, evaluate: int) -> int:
        config = MoTConfig(output_dir=str(tmp_path), per_device_train_batch_size=train,
                           per_device_eval_batch_size=evaluate, report_to=[])  # fmt: skip
        return devices.eval_loss_batch_size(config)

    assert batch(train=1, evaluate=16) == 1  # the example YAML's generation batch, at 4096 tokens
    assert batch(train=8, evaluate=4) == 4
    assert batch(train=4, evaluate=4) == 4


# ---------------------------------------------------------------- 6: the private group outlasts a branch
def test_the_private_group_waits_longer_than_one_branch():
    assert distributed.group_timeout(1800) == timedelta(hours=24)
    assert distributed.group_timeout(200_000) == timedelta(seconds=200_000)  # a longer ddp_timeout is kept


# ---------------------------------------------------------------- 7: the fp32 install never runs in TF32
@pytest.mark.parametrize("precision", ["medium", "high"])
def test_the_weights_take_the_change_in_true_fp32_whatever_the_user_set(precision):
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(512, 256, bias=False)})
    base = model["proj"].weight.detach().double().clone()
    branches = [{"proj": LowRankDelta(torch.randn(256, 16) * 1e-2, torch.randn(16, 512) * 1e-2)} for _ in range(4)]
    merged, _ = merge_round(None, branches, [0.25] * 4)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)  # transformers' tf32=True sets the same for CUDA
    try:
        settings = (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
        FrozenDelta("weights", None, None).install(model, merged)
        after = (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
        assert after == settings  # the user's choice is back
        assert torch.get_float32_matmul_precision() == precision  # and still readable through the legacy API
    finally:
        torch.set_float32_matmul_precision(before)
    reference = base + merged["proj"].B.double() @ merged["proj"].A.double()
    error = (model["proj"].weight.detach().double() - reference).norm() / reference.norm()
    assert error < 1e-7, f"{error:.2e}"


def test_exact_fp32_matmul_restores_the_settings_after_an_error():
    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
    with pytest.raises(KeyError), devices.exact_fp32_matmul():
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
        raise KeyError("boom")
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision) == before


# ---------------------------------------------------------------- 8: freed CUDA memory goes back to the card
def test_released_memory_includes_the_cuda_cache_once_cuda_is_in_use(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    collection.release_freed_memory()
    assert emptied == []  # no CUDA context is made just to empty it
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    collection.release_freed_memory()
    assert emptied == [True]


# ---------------------------------------------------------------- 9: the float64 merge under torchrun
def test_the_merge_uses_this_process_share_of_the_cores_under_a_launcher(launched, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # torchrun's OMP_NUM_THREADS=1
    try:
        with devices.merge_threads() as threads:
            assert threads == torch.get_num_threads() == 8  # 16 cores, 2 processes on this machine
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(distributed, "_launcher", None)
        with devices.merge_threads() as threads:  # no launcher: the user's own thread count
            assert threads == torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_the_merge_never_lowers_the_thread_count(launched, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with devices.merge_threads() as threads:  # 2 cores / 2 processes = 1, but 2 were set
            assert threads == torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- 11: bf16 on a GPU without it; rank padding
def test_bf16_on_a_gpu_without_it_says_what_to_set(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Tesla T4")
    for bf16 in (None, True):  # TRL's default, and asked for
        with pytest.raises(ValueError, match=r"Tesla T4 has no bf16 .* bf16=False, fp16=True"):
            MoTConfig(output_dir=str(tmp_path), bf16=bf16, report_to=[])
    devices.check_mixed_precision(bf16=False, fp16=True, use_cpu=False)  # what it says to set passes
    devices.check_mixed_precision(bf16=True, fp16=False, use_cpu=True)  # and a CPU run is not its business


def frozen_layers(rank: int) -> tuple[torch.nn.Module, dict[str, LowRankDelta]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24, bias=False), torch.nn.Linear(24, 16, bias=False))
    merged = {"0": LowRankDelta(torch.randn(24, rank), torch.randn(rank, 16)),
              "1": LowRankDelta(torch.randn(16, rank - 2), torch.randn(rank - 2, 24))}  # fmt: skip
    return model, merged


def test_a_copied_frozen_adapter_is_padded_to_a_multiple_of_8_and_computes_the_same(tmp_path):
    model, merged = frozen_layers(rank=11)
    home = FrozenDelta("adapter", None, None, adapter_dtype=torch.bfloat16)
    student = home.install(model, merged)
    for name, layer in adapters.lora_layers(student).items():
        A, B = layer.lora_A[adapters.MERGED_ADAPTER].weight, layer.lora_B[adapters.MERGED_ADAPTER].weight
        assert A.shape[0] == B.shape[1] == 16 and A.dtype == torch.bfloat16
        exact = merged[name].B.bfloat16().float() @ merged[name].A.bfloat16().float()
        assert torch.equal(B.float() @ A.float(), exact)  # zero rows and columns: the very same product
    adapters.save_merged(merged, tmp_path, None)  # what checkpoints and exports hold is not padded
    assert {name: delta.rank for name, delta in SavedDelta(tmp_path).items()} == {"0": 11, "1": 11}


def test_an_fp32_adapter_on_the_cpu_keeps_sharing_the_merged_factors():
    model, merged = frozen_layers(rank=11)
    student = FrozenDelta("adapter", None, None).install(model, merged)
    layer = adapters.lora_layers(student)["0"]
    assert layer.lora_A[adapters.MERGED_ADAPTER].weight.data_ptr() == merged["0"].A.data_ptr()


# ---------------------------------------------------------------- 11: benchmark caches per device
def test_a_gpu_machine_has_its_own_benchmark_cache(monkeypatch):
    hardware = load_benchmark("hardware.py")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu_only = hardware.identity()
    assert "gpu" not in cpu_only  # caches made before GPUs were named keep their folder
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "NVIDIA GeForce RTX 4090")
    with_gpu = hardware.identity()
    assert with_gpu["gpu"] == "NVIDIA GeForce RTX 4090"
    assert hardware.identity_tag(with_gpu) != hardware.identity_tag(cpu_only)
    assert "GPU: NVIDIA GeForce RTX 4090" in hardware.describe(with_gpu)
