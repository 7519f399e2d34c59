"""Crash-safe rounds and exact resume: SIGKILL mid-branch and mid-merge, NaN branches, unwritable and full disks.

Every interrupted run is resumed and compared with one uninterrupted run of the same seed (``reference``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

import merge_of_thought
import merge_of_thought.adapters as adapters_module
import merge_of_thought.checkpointing as checkpointing_module
from merge_of_thought.cli import main as cli_main
from merge_of_thought.checkpointing import CheckpointWriteError, RunFolder, atomic_dir
from merge_of_thought.guards import BranchDivergedError
from merge_of_thought.metrics import MetricsLog

from conftest import make_teacher, tiny_config
from crash_run import small_run
from helpers import dense_adapter, quick_lora, quick_trainer

TESTS = Path(__file__).parent
MISSING_MODEL = "/nonexistent/model/that/must/not/be/loaded"
FINAL = Path("round-002") / "merged"


@pytest.fixture(scope="module")
def reference(qwen3_dir, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must reproduce."""
    folder = tmp_path_factory.mktemp("reference")
    small_run(qwen3_dir, folder).train()
    return folder


def max_abs_diff(run_a: Path, run_b: Path, adapter: Path = FINAL) -> float:
    a = load_file(str(run_a / adapter / "adapter_model.safetensors"))
    b = load_file(str(run_b / adapter / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def crash_run(*args: str) -> subprocess.CompletedProcess:
    """tests/crash_run.py in a fresh Python process, importing this checkout's merge_of_thought."""
    src = Path(merge_of_thought.__file__).parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(src)]), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, str(TESTS / "crash_run.py"), *args], env=env, capture_output=True, text=True, timeout=300
    )


class PoisonBranch(TrainerCallback):
    """Writes a NaN into one branch's LoRA weight before ``step``, so that step's forward pass gives a NaN loss."""

    def __init__(self, round_idx: int, teacher: str, step: int):
        self.run_name, self.step = f"round{round_idx}/{teacher}", step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if args.run_name == self.run_name and state.global_step == self.step - 1:
            param = next(p for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n)
            with torch.no_grad():
                param[0, 0] = float("nan")


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- atomic writes
def test_atomic_dir_never_leaves_a_partial_folder(tmp_path):
    target = tmp_path / "round-001" / "merged"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "adapter_model.safetensors").write_bytes(b"half")
            raise RuntimeError("killed")
    assert not target.exists() and list(target.parent.iterdir()) == []
    # Into an existing folder (a branch's trainer logs there) the completion mark arrives last.
    target.mkdir()
    (target / "runs").mkdir()
    with atomic_dir(target, last="adapter_model.safetensors") as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(b"weights")
        (tmp / "adapter_config.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "runs"]
    assert [p.name for p in target.parent.iterdir()] == ["merged"]


# ---------------------------------------------------------------------------------------------- SIGKILL and resume
def test_sigkill_mid_branch_then_resume_equals_uninterrupted(reference, qwen3_dir, tmp_path):
    killed = crash_run(qwen3_dir, str(tmp_path), "--kill-branch", "2", "teacher1", "2")
    assert killed.returncode == -9, killed.stderr[-3000:]
    run = RunFolder(tmp_path)
    assert run.completed_rounds() == [1]
    assert run.branch_dir(2, "teacher1").is_dir()  # the killed branch's trainer had created its folder...
    point = run.resume_point(["teacher0", "teacher1"])  # ...which is not taken for a finished branch
    assert (point.rounds_done, point.branches_done) == (1, ["teacher0"])

    resumed = crash_run(qwen3_dir, str(tmp_path), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert max_abs_diff(reference, tmp_path) <= 1e-6
    lines = metrics(tmp_path)
    assert [(row["type"], row.get("round"), row.get("teacher")) for row in lines if row["type"] != "round"] == [
        ("branch", 1, "teacher0"), ("branch", 1, "teacher1"), ("branch", 2, "teacher0"),
        ("resume", None, None), ("branch", 2, "teacher1"),
    ]  # fmt: skip


def test_sigkill_mid_merge_then_resume_equals_uninterrupted(reference, qwen3_dir, tmp_path):
    killed = crash_run(qwen3_dir, str(tmp_path), "--kill-merge", "1")
    assert killed.returncode == -9, killed.stderr[-3000:]
    run = RunFolder(tmp_path)
    half_written = list(run.round_dir(1).glob(".merged.tmp-*"))
    assert len(half_written) == 1 and (half_written[0] / "adapter_model.safetensors").exists()
    assert run.completed_rounds() == [] and not run.merged_dir(1).exists()
    assert run.resume_point(["teacher0", "teacher1"]).branches_done == ["teacher0", "teacher1"]

    trainer = small_run(qwen3_dir, tmp_path)
    records = trainer.train(resume_from_checkpoint=True)  # merges round 1 from disk, then trains round 2
    assert [r["round"] for r in records] == [1, 2]
    assert not list(run.round_dir(1).glob(".merged.tmp-*"))
    assert max_abs_diff(reference, tmp_path) <= 1e-6
    assert sum(row["type"] == "branch" for row in metrics(tmp_path)) == 4  # no branch trained twice


# ---------------------------------------------------------------------------------------------- incompatible folders
def _other_base(tmp_path, tokenizer):
    folder = tmp_path / "tiny-llama"
    AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize(
    "change, field",
    [
        ("base_model", "base_model"),
        ("teacher_names", "teachers"),
        ("teacher_order", "teachers"),
        ("teacher_data", "teacher_rows"),
        ("weights", "teacher_weights"),
        ("lora_r", "lora"),
        ("lora_targets", "lora"),
        ("rslora", "lora"),
        ("max_steps", "steps_per_branch"),
        ("seed", "seed"),
    ],
)
def test_incompatible_folder_is_refused_on_resume(change, field, reference, qwen3_dir, tokenizer, tmp_path):
    model = _other_base(tmp_path, tokenizer) if change == "base_model" else qwen3_dir
    teachers = {f"teacher{k}": make_teacher(k, n=16, seed=k) for k in range(2)}
    if change == "teacher_names":
        teachers = {"alice": teachers["teacher0"], "bob": teachers["teacher1"]}
    if change == "teacher_order":
        teachers = dict(reversed(teachers.items()))
    if change == "teacher_data":
        teachers["teacher1"] = make_teacher(1, n=20, seed=1)
    lora = quick_lora(
        r=8 if change == "lora_r" else 4,
        target_modules=["q_proj", "v_proj"] if change == "lora_targets" else "all-linear",
        use_rslora=change == "rslora",
    )
    config = dict(num_rounds=2, max_steps=5 if change == "max_steps" else 3, seed=1 if change == "seed" else 0)
    if change == "weights":
        config["teacher_weights"] = {"teacher0": 0.7, "teacher1": 0.3}
    before = (reference / "mot_run.json").read_text()
    trainer = quick_trainer(model, teachers, reference, lora=lora, **config)
    refused = rf"Cannot resume the MoT run in .*\n  {field}: (on disk .*, now |.* -> )"
    with pytest.raises(ValueError, match=refused) as e:
        trainer.train(resume_from_checkpoint=True)
    if change == "lora_r":  # only the settings that differ, old -> new
        assert "\n  lora: r: 4 -> 8 (on disk -> now)\n" in str(e.value)
    assert (reference / "mot_run.json").read_text() == before  # nothing was written


def test_resuming_a_finished_run_reads_it_and_writes_nothing(reference, qwen3_dir, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(reference, folder)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}
    trainer = small_run(qwen3_dir, folder)
    rounds = trainer.train(resume_from_checkpoint=True)
    assert [r["round"] for r in rounds] == [1, 2] and trainer.merged is not None  # the student after round 2
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}
    assert after == before  # no resume line in metrics.jsonl, mot_run.json not rewritten


def test_run_files_get_the_mode_the_umask_gives(reference):
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.relative_to(reference).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in reference.rglob("*")}
    expected = {name: (0o777 if (reference / name).is_dir() else 0o666) & ~mask for name in modes}
    assert modes == expected and "round-002/merged/adapter_model.safetensors" in modes and "mot_run.json" in modes


def test_new_run_in_a_used_folder_needs_overwrite(reference, qwen3_dir, tmp_path):
    with pytest.raises(ValueError, match="already holds a MoT run.*resume_from_checkpoint=True.*overwrite_output_dir"):
        small_run(qwen3_dir, reference).train()
    with pytest.raises(ValueError, match="no MoT run found in that folder"):
        small_run(qwen3_dir, reference).train(resume_from_checkpoint=str(tmp_path))
    # Asked for in args, a resume is checked in MoTTrainer(...), before the model is loaded (this path is missing).
    with pytest.raises(ValueError, match="no MoT run found in that folder"):
        small_run(MISSING_MODEL, reference, resume_from_checkpoint=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"Cannot resume the MoT run in .*\n  base_model: on disk"):
        small_run(MISSING_MODEL, reference, resume_from_checkpoint="true")
    # A run that stopped before completing any branch (here: only its mot_run.json) has nothing to lose.
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copy(reference / "mot_run.json", stopped)
    small_run(qwen3_dir, stopped, num_rounds=1, max_steps=1).train()
    assert RunFolder(stopped).completed_rounds() == [1]
    folder = tmp_path / "run"
    shutil.copytree(reference, folder)
    small_run(qwen3_dir, folder, num_rounds=1, max_steps=1, overwrite_output_dir=True).train()
    assert RunFolder(folder).completed_rounds() == [1] and not (folder / "round-002").exists()
    assert [row["type"] for row in metrics(folder)] == ["branch", "branch", "round"]


# ---------------------------------------------------------------------------------------------- diverging branches
def test_nan_branch_stops_naming_teacher_round_step_and_resumes(reference, qwen3_dir, tmp_path):
    trainer = small_run(qwen3_dir, tmp_path)
    poison = PoisonBranch(2, "teacher1", step=2)
    trainer.callbacks.append(poison)
    with pytest.raises(BranchDivergedError, match="teacher 'teacher1' diverged in round 2 at step 2: .*NaN") as error:
        trainer.train()
    assert (error.value.teacher, error.value.round, error.value.step) == ("teacher1", 2, 2)
    run = RunFolder(tmp_path)
    assert run.completed_rounds() == [1]
    assert run.resume_point(trainer.teacher_names).branches_done == ["teacher0"]
    trainer.callbacks.remove(poison)  # the same trainer object resumes
    trainer.train(resume_from_checkpoint=True)
    # exactly: the weights already hold round 1's delta, so the resume leaves them as they are (installing D - D
    # would add rounding, and a rounding-sized change in a branch may turn the merged factors' singular vectors)
    assert max_abs_diff(reference, tmp_path) == 0.0


def test_runaway_learning_rate_is_caught_at_the_step_it_diverges(qwen3_dir, tmp_path):
    with pytest.raises(BranchDivergedError, match="teacher 'teacher0' diverged in round 1 at step 2"):
        small_run(qwen3_dir, tmp_path / "raise", num_rounds=1, learning_rate=1e30).train()
    trainer = small_run(qwen3_dir, tmp_path / "drop", num_rounds=1, learning_rate=1e30, on_branch_divergence="drop")
    with pytest.raises(RuntimeError, match="Every branch of round 1 .* diverged"):
        trainer.train()
    dropped = [row for row in metrics(tmp_path / "drop") if row["type"] == "dropped_branch"]
    assert [(row["teacher"], row["step"]) for row in dropped] == [("teacher0", 2), ("teacher1", 2)]


def test_drop_mode_merges_the_other_branches_with_renormalised_weights(qwen3_dir, teachers, tmp_path, caplog):
    weights = {"teacher0": 0.5, "teacher1": 0.3, "teacher2": 0.2}
    trainer = quick_trainer(
        qwen3_dir, teachers, tmp_path, num_rounds=1, teacher_weights=weights, on_branch_divergence="drop"
    )
    trainer.callbacks.append(PoisonBranch(1, "teacher1", step=1))
    trainer.train()
    record = json.loads((tmp_path / "round-001" / "round.json").read_text())
    assert record["dropped"] == ["teacher1"]
    assert {t: info["weight"] for t, info in record["teachers"].items()} == pytest.approx(
        {"teacher0": 0.5 / 0.7, "teacher2": 0.2 / 0.7}
    )
    branches = {t: dense_adapter(tmp_path / "round-001" / f"branch-{t}") for t in ("teacher0", "teacher2")}
    merged = dense_adapter(tmp_path / "round-001" / "merged")
    for name, delta in merged.items():
        expected = (0.5 * branches["teacher0"][name] + 0.2 * branches["teacher2"][name]) / 0.7
        assert (delta - expected).norm() <= 1e-5 * expected.norm()
    dropped = [row for row in metrics(tmp_path) if row["type"] == "dropped_branch"]
    assert [(row["round"], row["teacher"], row["step"]) for row in dropped] == [(1, "teacher1", 1)]
    assert "Dropping it from round 1's merge" in caplog.text
    assert RunFolder(tmp_path).resume_point(trainer.teacher_names).rounds_done == 1


# ---------------------------------------------------------------------------------------------- disks
def test_unwritable_output_dir_fails_before_the_model_is_loaded(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # fails for root too, unlike a chmod
    with pytest.raises(CheckpointWriteError, match=r"output_dir '.*a-file/run' is not writable"):
        quick_trainer("/nonexistent/model", {"a": make_teacher(0), "b": make_teacher(1)}, blocker / "run")


def test_too_little_disk_space_fails_before_training(qwen3_dir, tmp_path, monkeypatch, caplog):
    # This run writes 128 KiB in round 1 (two rank-4 branches, a rank-8 merge) and 320 KiB in all.
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpointing_module.shutil, "disk_usage", lambda path: usage._replace(free=100_000))
    with pytest.raises(CheckpointWriteError, match=r"Not enough disk space .* writes about 0.1 MiB .* 0.1 MiB is free"):
        small_run(qwen3_dir, tmp_path / "full").train()
    assert not (tmp_path / "full" / "round-001").exists()
    # Room for a round but not for the run: a warning, and the run goes on (and could be resumed if it fills up).
    monkeypatch.setattr(checkpointing_module.shutil, "disk_usage", lambda path: usage._replace(free=200_000))
    small_run(qwen3_dir, tmp_path / "tight", max_steps=1).train()
    assert "The rest of this MoT run writes about 0.3 MiB" in caplog.text


def test_disk_full_mid_run_loses_nothing_and_resumes(reference, qwen3_dir, tmp_path, monkeypatch):
    save_file, calls = adapters_module.save_file, []

    def full_disk_on_fifth_write(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 5:  # round 1: two branches and the merge; round 2: teacher0, then teacher1 fails
            with open(filename, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(adapters_module, "save_file", full_disk_on_fifth_write)
    trainer = small_run(qwen3_dir, tmp_path)
    with pytest.raises(CheckpointWriteError, match="adapter of teacher 'teacher1' in round 2 .* disk is full.*resume"):
        trainer.train()
    run = RunFolder(tmp_path)
    assert run.completed_rounds() == [1]
    assert run.resume_point(trainer.teacher_names).branches_done == ["teacher0"]
    assert not list(run.round_dir(2).glob(".*"))  # the half-written adapter was removed, not left as complete
    monkeypatch.setattr(adapters_module, "save_file", save_file)
    trainer.train(resume_from_checkpoint=True)
    assert max_abs_diff(reference, tmp_path) <= 1e-6


# ---------------------------------------------------------------------------------------------- the command line
def test_mot_train_resume(qwen3_dir, tmp_path, capsys, caplog):
    teachers = []
    for k in range(2):
        make_teacher(k, n=8, seed=k).to_json(str(tmp_path / f"t{k}.jsonl"))
        teachers.append({"path": "json", "data_files": str(tmp_path / f"t{k}.jsonl"), "teacher": f"t{k}"})
    config = dict(
        model_name_or_path=qwen3_dir,
        teachers=teachers,
        lora_r=4,
        lora_alpha=8,
        lora_target_modules=["q_proj", "v_proj"],
        num_rounds=1,
        max_steps=1,
        report_to="none",
        output_dir=str(tmp_path / "out"),
    )
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    train = ["train", "--config", str(tmp_path / "cfg.yaml")]
    assert cli_main(train) == 0
    # Refused before the teachers' data and the model are loaded (this model path does not exist), as one line.
    with pytest.raises(SystemExit) as refused:
        cli_main([*train, "--num_rounds", "2", "--model_name_or_path", "/nonexistent/model"])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "mot: error: output_dir '" in err and "already holds a MoT run (1 round completed)" in err
    # Epochs are refused with the reason, in the YAML (even TRL's default 3) and as a flag, before anything loads.
    (tmp_path / "epochs.yaml").write_text(yaml.safe_dump({**config, "num_train_epochs": 3}))
    for argv in (["train", "--config", str(tmp_path / "epochs.yaml")], [*train, "--num_train_epochs", "2"]):
        with pytest.raises(SystemExit):
            cli_main(argv)
        err = capsys.readouterr().err
        given = ("mot: error: num_train_epochs: 3 in the config file: ", "mot: error: --num_train_epochs: ")
        assert err.startswith(given)
        assert "MoT trains every branch for max_steps" in err and err.count("\n") == 1
    assert "Traceback" not in err
    with caplog.at_level(logging.INFO, logger="merge_of_thought"):
        assert cli_main([*train, "--num_rounds", "2", "--resume", "--disable_tqdm", "false"]) == 0
    assert "reusing 1 of 2 rounds and 0 of 2 branches of round 2 from disk; 2 branches left to train" in caplog.text
    assert ("plan: 2 rounds x 2 teachers x 1 steps = 4 SFT steps (2 to train); 8 sequences per step "
            "(per_device_train_batch_size 8 x gradient_accumulation_steps 1) of up to 1024 tokens") in caplog.text
    bar = capsys.readouterr().err
    assert " 2/4 [" in bar and " 0/4 [" not in bar  # the bar starts after the rounds reused
    assert cli_main([*train, "--num_rounds", "3", "--resume_from_checkpoint", "true"]) == 0
    lines = metrics(tmp_path / "out")
    assert [row["round"] for row in lines if row["type"] == "branch"] == [1, 1, 2, 2, 3, 3]  # nothing trained twice
    assert [row["rounds_done"] for row in lines if row["type"] == "resume"] == [1, 2]
    assert RunFolder(tmp_path / "out").completed_rounds() == [1, 2, 3]

    # Killed after one branch of round 3: the resume reuses it, says so, and its bar starts at 5 of 6.
    run = RunFolder(tmp_path / "out")
    shutil.rmtree(run.round_dir(3) / "merged")
    (run.round_dir(3) / "round.json").unlink()
    shutil.rmtree(run.branch_dir(3, "t1"))
    caplog.clear()
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="merge_of_thought"):
        assert cli_main([*train, "--num_rounds", "3", "--resume", "--disable_tqdm", "false"]) == 0
    assert "reusing 2 of 3 rounds and 1 of 2 branches of round 3 (t0) from disk; 1 branch left to train" in caplog.text
    assert "plan: 3 rounds x 2 teachers x 1 steps = 6 SFT steps (1 to train)" in caplog.text
    bar = capsys.readouterr().err
    assert " 5/6 [" in bar and " 4/6 [" not in bar
    assert [row["teacher"] for row in metrics(tmp_path / "out") if row["type"] == "branch"][-1] == "t1"


def test_a_metrics_line_cut_off_by_a_crash_is_skipped(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"type": "branch", "round": 1})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"type": "bra')  # killed mid-append
    log.write({"type": "resume", "rounds_done": 0})
    assert log.read() == [{"type": "branch", "round": 1}, {"type": "resume", "rounds_done": 0}]
