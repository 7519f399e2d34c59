"""Branches spread over processes (torchrun, gloo on the CPU) give the single-process result, written once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from merge_of_thought import MoTConfig, distributed
from merge_of_thought.checkpointing import RunFolder

from distributed_worker import build
from helpers import dense_adapter, quick_trainer

TESTS = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(nproc: int, model_dir: str, output_dir: Path, result: Path, *extra: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TESTS.parent / "src"), str(TESTS)]))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    command += [str(TESTS / "distributed_worker.py"), model_dir, str(output_dir), str(result), *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def test_two_processes_reproduce_the_single_process_run(qwen3_dir, tmp_path):
    """3 teachers on 2 processes (process 0 trains two branches a round): same adapters as one process."""
    run_torchrun(2, qwen3_dir, tmp_path / "two", tmp_path / "result.json")
    result = json.loads((tmp_path / "result.json").read_text())
    processes = result["processes"]
    assert result["world_size"] == 2 and [p["rank"] for p in processes] == [0, 1]
    assert [p["branches"] for p in processes] == [[0, 2], [1]]
    for p in processes:  # each branch trained as one process: no data parallelism across the ranks
        assert p["transformers_world_size"] == 1
        assert not p["default_group_initialized"] and not p["launcher_env_visible"]
    assert processes[0]["merged_hash"] == processes[1]["merged_hash"], "the ranks hold different students"

    single = build(qwen3_dir, str(tmp_path / "one"))
    single.train()

    two, one = RunFolder(tmp_path / "two"), RunFolder(tmp_path / "one")
    assert two.completed_rounds() == one.completed_rounds() == [1, 2]
    for round_idx in (1, 2):
        folders = [two.merged_dir(round_idx)] + [two.branch_dir(round_idx, t) for t in single.teacher_names]
        for folder in folders:  # every branch is saved, also those trained on process 1
            expected = dense_adapter(one.root / folder.relative_to(two.root))
            got = dense_adapter(folder)
            assert set(got) == set(expected)
            worst = max((got[n] - expected[n]).abs().max().item() for n in expected)
            assert worst <= 1e-5, f"{folder.relative_to(two.root)}: max |dweight| = {worst:.2e}"
            assert max(expected[n].abs().max().item() for n in expected) > 1e-4, "nothing was learned"

    assert sorted(p.name for p in (tmp_path / "two").rglob("metrics.jsonl")) == ["metrics.jsonl"]
    lines = two.root.joinpath("metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    branches = [(r["round"], r["teacher"]) for r in records if r["type"] == "branch"]
    # Once each. Process 0 checkpoints its own branches as they finish and the others' after the gather, so within
    # a round the lines follow completion, and every round's lines come before its round record.
    assert sorted(branches) == [(t, f"teacher{k}") for t in (1, 2) for k in range(3)]
    kinds = [(r["type"], r["round"]) for r in records if r["type"] in ("branch", "round")]
    assert kinds == [("branch", 1)] * 3 + [("round", 1)] + [("branch", 2)] * 3 + [("round", 2)]
    assert [r["round"] for r in records if r["type"] == "round"] == [1, 2]
    single_records = [json.loads(line) for line in one.root.joinpath("metrics.jsonl").read_text().splitlines()]
    key = lambda r: (r["round"], r["type"] == "round", r.get("teacher") or "")  # noqa: E731
    assert len(records) == len(single_records)
    for got, expected in zip(sorted(records, key=key), sorted(single_records, key=key), strict=True):
        assert key(got) == key(expected)
        if got["type"] == "branch":
            assert got["train_loss"] == pytest.approx(expected["train_loss"], abs=1e-5)


def test_persistent_branches_on_two_processes_reproduce_the_single_process_run(qwen3_dir, tmp_path):
    """Each process keeps the factors and optimizer state of its own branches (branch_state='persistent')."""
    run_torchrun(2, qwen3_dir, tmp_path / "two", tmp_path / "result.json", "3", "", "persistent")
    processes = json.loads((tmp_path / "result.json").read_text())["processes"]
    assert processes[0]["merged_hash"] == processes[1]["merged_hash"]
    single = build(qwen3_dir, str(tmp_path / "one"), num_rounds=3, branch_state="persistent")
    single.train()
    expected, got = dense_adapter(tmp_path / "one" / "round-003" / "merged"), dense_adapter(
        tmp_path / "two" / "round-003" / "merged")  # fmt: skip
    assert max((got[n] - expected[n]).abs().max().item() for n in expected) <= 1e-5
    assert (tmp_path / "two" / "round-002" / "optimizer-teacher1" / "optimizer.pt").exists()  # written by process 1


def test_distributed_resume_matches_the_uninterrupted_run(qwen3_dir, tmp_path):
    """Two processes stop after round 1; two processes resume for round 2: the single-process 2-round student."""
    run_torchrun(2, qwen3_dir, tmp_path / "two", tmp_path / "r1.json", "1")
    assert RunFolder(tmp_path / "two").completed_rounds() == [1]
    run_torchrun(2, qwen3_dir, tmp_path / "two", tmp_path / "r2.json", "2", "resume")
    processes = json.loads((tmp_path / "r2.json").read_text())["processes"]
    assert processes[0]["merged_hash"] == processes[1]["merged_hash"]
    build(qwen3_dir, str(tmp_path / "one")).train()
    got = dense_adapter(tmp_path / "two" / "round-002" / "merged")
    expected = dense_adapter(tmp_path / "one" / "round-002" / "merged")
    assert max((got[n] - expected[n]).abs().max().item() for n in expected) <= 1e-6
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["type"] for r in records].count("resume") == 1
    assert sorted((r["round"], r["teacher"]) for r in records if r["type"] == "branch") == [
        (t, f"teacher{k}") for t in (1, 2) for k in range(3)
    ]


def test_launcher_env_is_hidden_from_transformers(monkeypatch, tmp_path):
    """Under torchrun's variables, MoTConfig records the rank and leaves transformers a single-process world.

    Without the hiding, TrainingArguments(use_cpu=True) calls init_process_group (and waits for process 0): the
    tripwire makes that fail at once instead.
    """

    def tripwire(*args, **kwargs):
        raise AssertionError("transformers/accelerate set up data parallelism over the launch")

    monkeypatch.setattr(torch.distributed, "init_process_group", tripwire)
    monkeypatch.setattr(distributed, "_launcher", None)
    launch = dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    for key, value in dict(launch, MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
    config = MoTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    port = int(os.environ["MASTER_PORT"])
    assert distributed.detach_from_launcher() == distributed.LauncherEnv(1, 2, 1, "127.0.0.1", port, local_world_size=2)
    assert not any(key in os.environ for key in distributed.LAUNCHER_VARIABLES)
    assert config.world_size == 1 and config.process_index == 0 and not torch.distributed.is_initialized()


def test_more_processes_than_teachers_is_refused(monkeypatch, qwen3_dir, teachers, tmp_path):
    monkeypatch.setattr(distributed, "_group", distributed.MoTProcessGroup(rank=0, world_size=4))
    with pytest.raises(ValueError, match="4 processes for 3 teachers"):
        quick_trainer(qwen3_dir, teachers, tmp_path)
