"""The ``mot`` command line: ``mot train`` from a TRL-style YAML with one data set per teacher, and what a first
run meets: errors as one line before the model loads, interrupts that say how to resume, no library noise."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import yaml

import merge_of_thought
from merge_of_thought.cli import main
from merge_of_thought.scripts.train import make_parser

from conftest import make_teacher

MISSING_MODEL = "/nonexistent/model/that/must/not/be/loaded"


def write_config(tmp_path: Path, teachers: list[dict] | None = None, **values) -> Path:
    """A two-teacher `mot train` YAML on local JSONL files; ``values`` override or add keys."""
    if teachers is None:
        teachers = []
        for k in range(2):
            path = tmp_path / f"t{k}.jsonl"
            make_teacher(k, n=8, seed=k).to_json(str(path))
            teachers.append({"teacher": f"t{k}", "path": "json", "data_files": str(path)})
    config = dict(model_name_or_path=MISSING_MODEL, teachers=teachers, lora_r=4, lora_alpha=8, num_rounds=1,
                  max_steps=1, report_to="none", output_dir=str(tmp_path / "out"))  # fmt: skip
    config.update(values)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "cfg.yaml"


def mot_error(capsys, *argv: str, code: int = 2) -> str:
    """Run a command that must fail; return its stderr (one `mot: error:` line unless --verbose)."""
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    assert info.value.code == code
    return capsys.readouterr().err


def test_mot_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "train" in out
    assert main(["nope"]) == 2


def test_mot_train_from_yaml_with_flag_override(qwen3_dir, tmp_path):
    teachers = []
    for k in range(2):
        path = tmp_path / f"teacher{k}.jsonl"
        make_teacher(k).to_json(str(path))
        teachers.append({"path": "json", "data_files": str(path), "teacher": f"style{k}", "weight": [0.75, 0.25][k]})
    config = {
        "model_name_or_path": qwen3_dir,
        "teachers": teachers,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_modules": ["q_proj", "v_proj"],
        "num_rounds": 1,
        "max_steps": 1,
        "per_device_train_batch_size": 4,
        "report_to": "none",
        "gradient_checkpointing": False,
        "output_dir": str(tmp_path / "out"),
        "learning_rate": 1e-3,
    }
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(cfg), "--max_steps", "2"]) == 0
    run = json.loads((tmp_path / "out" / "mot_run.json").read_text())
    assert run["teachers"] == ["style0", "style1"] and run["teacher_weights"] == [0.75, 0.25]
    assert run["steps_per_branch"] == 2  # the flag won over the YAML
    assert sorted(run["lora"]["target_modules"]) == ["q_proj", "v_proj"] and run["lora"]["r"] == 4
    assert (tmp_path / "out" / "round-001" / "branch-style1" / "adapter_model.safetensors").exists()

    # One target module on the command line arrives as a bare string; it still means that module, not a regex.
    out = str(tmp_path / "one-target")
    assert main(["train", "--config", str(cfg), "--lora_target_modules", "q_proj", "--output_dir", out]) == 0
    run = json.loads((tmp_path / "one-target" / "mot_run.json").read_text())
    assert run["lora"]["target_modules"] == ["q_proj"]


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("key", ["datasets", "dataset_name"])
def test_mot_train_refuses_trl_training_set_and_points_to_teachers(key, tmp_path):
    value = [{"path": "json", "data_files": "a.jsonl"}] if key == "datasets" else "trl-lib/Capybara"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model_name_or_path": "x", key: value, "output_dir": str(tmp_path)}))
    with pytest.raises(ValueError, match="teachers:"):
        make_parser().parse_args_and_config(args=["--config", str(cfg)])


def test_qwen3_8b_example_config_parses():
    # bf16 is overridden only because this machine has no GPU (TrainingArguments refuses bf16 on it).
    script_args, training_args, model_args = make_parser().parse_args_and_config(
        args=["--config", str(EXAMPLES / "configs" / "qwen3_8b_4teachers.yaml"), "--bf16", "false"]
    )
    assert len(script_args.teachers) == 4 and len({t.teacher for t in script_args.teachers}) == 4
    assert model_args.model_name_or_path == "Qwen/Qwen3-8B" and model_args.load_in_4bit and model_args.use_peft
    assert model_args.bnb_4bit_quant_type == "nf4" and model_args.lora_r == 16
    assert model_args.lora_target_modules == "all-linear"
    assert training_args.num_rounds == 5 and training_args.max_steps == 50 and training_args.gradient_checkpointing
    assert yaml.safe_load((EXAMPLES / "configs" / "qwen3_8b_4teachers.yaml").read_text())["bf16"] is True


def test_tiny_example_config_runs_without_library_noise(tmp_path, monkeypatch, caplog, capsys):
    spec = importlib.util.spec_from_file_location("make_tiny_assets", EXAMPLES / "make_tiny_assets.py")
    assets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(assets)
    monkeypatch.chdir(tmp_path)  # the YAML's paths are relative to the working directory
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    assets.main("mot-tiny-data", n=8)
    # The shipped YAML as is; flags only shorten the run.
    argv = ["train", "--config", str(EXAMPLES / "configs" / "demo_tiny.yaml"), "--num_rounds", "1",
            "--max_steps", "1", "--eval_accuracy_samples", "2", "--eval_max_new_tokens", "4", "--disable_tqdm", "true"]
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        assert main(argv) == 0
    # What a user could do nothing about stays out: the YAML's own gradient_checkpointing key, PEFT reading
    # is_gradient_checkpointing, pin_memory on a CPU, and TRL ignoring model_init_kwargs in every branch.
    noise = [str(w.message) for w in caught if "checkpointing" in str(w.message) or "pin_memory" in str(w.message)]
    assert noise == [] and "model_init_kwargs" not in caplog.text
    out = tmp_path / "mot-tiny-output"
    assert not (out / "eval").exists()  # the per-round evaluation writes no folder
    rounds = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "round"]
    assert [r["round"] for r in rounds] == [0, 1] and all("eval_accuracy" in r and "eval_loss" in r for r in rounds)
    assert [len((out / f"round-00{r}" / "eval.jsonl").read_text().splitlines()) for r in (0, 1)] == [2, 2]
    # the run ends with its rounds as a table, read from metrics.jsonl
    printed = capsys.readouterr().out.splitlines()
    header = printed.index("  round  eval loss  accuracy  skipped  merge rank  merge s")
    start, merged = printed[header + 1].split(), printed[header + 2].split()
    assert start[0] == "0" and start[4:] == ["-", "-"] and float(start[1]) == pytest.approx(rounds[0]["eval_loss"],
                                                                                         abs=1e-4)  # fmt: skip
    assert merged[0] == "1" and float(merged[2]) == pytest.approx(rounds[1]["eval_accuracy"], abs=1e-3)
    assert int(merged[4]) == rounds[1]["merge_rank"]
    assert json.loads((out / "mot_run.json").read_text())["teachers"] == ["left-to-right", "commuted", "verbal"]
    assert (out / "adapter_model.safetensors").exists()  # the student, written by save_model
    assert list((out / "runs" / "round-001" / "verbal").glob("events.out.tfevents.*"))


# ---------------------------------------------------------------------------------------------- errors, one line each
def test_errors_are_one_line_and_verbose_adds_the_traceback(tmp_path, capsys):
    cfg = write_config(tmp_path, num_rounds=0)
    err = mot_error(capsys, "train", "--config", str(cfg))
    lines = [line for line in err.splitlines() if line.startswith("mot: error:")]
    assert lines == ["mot: error: num_rounds must be at least 1, got 0."] and "Traceback" not in err
    err = mot_error(capsys, "train", "--config", str(cfg), "--verbose")
    assert "Traceback (most recent call last)" in err and err.rstrip().endswith("num_rounds must be at least 1, got 0.")
    assert not (tmp_path / "out").exists()
    (tmp_path / "a-file").write_text("")  # not bad input but a failure (exit 1): one line and where to see more
    err = mot_error(capsys, "train", "--config", str(write_config(tmp_path, output_dir=str(tmp_path / "a-file" / "o"))),
                    code=1)  # fmt: skip
    assert "mot: error: output_dir '" in err and "is not writable" in err and "Traceback" not in err
    assert err.rstrip().endswith("mot: run the command again with --verbose for the traceback.")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--verbose" in capsys.readouterr().out


def test_unknown_teacher_key_names_the_teacher_and_the_valid_keys(tmp_path, capsys):
    teachers = [{"teacher": "r1", "path": "json", "data_file": "r1.jsonl"}]
    err = mot_error(capsys, "train", "--config", str(write_config(tmp_path, teachers=teachers)))
    assert "mot: error: teachers[0] (teacher 'r1'): unknown key 'data_file' (did you mean 'data_files'?)" in err
    assert "A teacher entry takes: path, name, data_dir, data_files, split" in err
    err = mot_error(capsys, "train", "--config", str(write_config(tmp_path, teachers=[{"data_files": "a.jsonl"}])))
    assert "teachers[0]: 'path' is required" in err


def test_a_misspelt_key_is_named_with_the_closest_one(tmp_path, capsys):
    cfg = write_config(tmp_path, num_round=3)
    err = mot_error(capsys, "train", "--config", str(cfg))
    assert "unknown key in the config file: 'num_round' (did you mean 'num_rounds'?)" in err
    err = mot_error(capsys, "train", "--config", str(write_config(tmp_path)), "--merge_tolerence", "0")
    assert "unknown key on the command line: 'merge_tolerence' (did you mean 'merge_tolerance'?)" in err


def test_an_empty_teacher_file_is_named_before_the_model_loads(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    cfg = write_config(tmp_path)
    config = yaml.safe_load(cfg.read_text())
    config["teachers"][1]["data_files"] = str(tmp_path / "empty.jsonl")
    cfg.write_text(yaml.safe_dump(config))
    err = mot_error(capsys, "train", "--config", str(cfg))  # the model path does not exist: it was never loaded
    assert f"mot: error: teacher 't1': its data set is empty (data_files='{tmp_path / 'empty.jsonl'}'" in err
    assert not (tmp_path / "out").exists()


NO_MARKERS = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}\n{% endfor %}"


def test_assistant_only_loss_needs_generation_markers_before_the_model_loads(tokenizer, tmp_path, capsys):
    """The issue's SmolLM2 case: a chat template without {% generation %} markers that TRL cannot patch."""
    folder = tmp_path / "tokenizer-only"  # a tokenizer and no model weights: loading the model would fail
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(NO_MARKERS)
    rows = [{"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}] * 4
    teachers = []
    for k in range(2):
        (tmp_path / f"chat{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        teachers.append({"teacher": f"c{k}", "path": "json", "data_files": str(tmp_path / f"chat{k}.jsonl")})
    cfg = write_config(tmp_path, teachers=teachers, model_name_or_path=str(folder), assistant_only_loss=True)
    err = mot_error(capsys, "train", "--config", str(cfg))
    assert f"mot: error: assistant_only_loss=True: the chat template of '{folder}' has no {{% generation %}}" in err
    assert "chat_template_path" in err and "assistant_only_loss=False" in err
    assert not (tmp_path / "out").exists()  # a failed start leaves no folder behind
    (folder / "chat_template.jinja").unlink()  # no template at all: conversational data cannot be tokenized
    err = mot_error(capsys, "train", "--config", str(cfg), "--assistant_only_loss", "false")
    assert "teacher 'c0' is conversational ('messages'), but the tokenizer of" in err and "has no chat template" in err


# ---------------------------------------------------------------------------------------------- interrupts
def run_in_subprocess(argv: list[str], tmp_path: Path) -> subprocess.Popen:
    """`mot ...` in its own process, with Python's own Ctrl-C handling even where the test runner ignores SIGINT."""
    src = Path(merge_of_thought.__file__).parents[1]
    code = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from merge_of_thought.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    env = dict(os.environ, PYTHONPATH=str(src), HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-c", code, *argv], env=env, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_says_how_to_resume_and_resumes(signum, code, qwen3_dir, tmp_path, capsys, caplog):
    cfg = write_config(tmp_path, model_name_or_path=qwen3_dir, max_steps=60, per_device_train_batch_size=2,
                       disable_tqdm=True)  # fmt: skip
    argv = ["train", "--config", str(cfg)]
    process = run_in_subprocess(argv, tmp_path)
    first = tmp_path / "out" / "round-001" / "branch-t0" / "adapter_model.safetensors"
    deadline = time.monotonic() + 240
    while not (tmp_path / "out" / "mot_run.json").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # inside the first branch (60 steps)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err[-3000:]
    name = signal.Signals(signum).name
    hint = f"mot: interrupted ({name}). Completed branches are saved; `mot train --config {cfg} --resume` continues"
    assert hint in err
    assert "Traceback" not in err and not first.exists()
    if signum != signal.SIGTERM:
        return  # the resume is the same after either signal: shown once
    with caplog.at_level(logging.INFO, logger="merge_of_thought"):
        assert main([*argv, "--resume"]) == 0
    assert "Resuming the MoT run in" in caplog.text and "reusing 0 of 1 rounds and 0 of 2 branches" in caplog.text
    assert first.exists() and (tmp_path / "out" / "round-001" / "round.json").exists()


# ---------------------------------------------------------------------------------------------- no library noise
def test_mot_help_loads_no_library(tmp_path):
    src = Path(merge_of_thought.__file__).parents[1]
    code = "import sys; from merge_of_thought.cli import main; main(['--help']); print(sorted(set(sys.modules) & " \
        "{'torch', 'transformers', 'trl', 'peft', 'bitsandbytes'}))"
    result = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(src)),
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip().endswith("[]") and result.stderr == "", result.stderr
    assert "usage: mot <command>" in result.stdout


def test_the_bitsandbytes_kernels_notice_alone_is_dropped(caplog):
    from merge_of_thought import library_noise

    logger = logging.getLogger(library_noise.BNB_CPU_LOGGER)  # bitsandbytes' own logger, as it logs at import
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
                       "already `pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
        logger.warning("some other bitsandbytes warning")
    assert "kernels-community" not in caplog.text and "some other bitsandbytes warning" in caplog.text


def test_the_kernels_trust_notice_for_bitsandbytes_alone_is_dropped(caplog):
    from merge_of_thought import library_noise

    logger = logging.getLogger(library_noise.KERNELS_HUB_LOGGER)  # kernels' logger, as bitsandbytes' import reaches it
    with caplog.at_level(logging.WARNING):
        logger.warning("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because "
                       "Hugging Face Hub is in offline mode.")
        logger.warning("Skipping publisher trust check for 'someone/else' because Hugging Face Hub is in offline mode.")
    assert "quantization-bitsandbytes" not in caplog.text and "someone/else" in caplog.text
    imported = subprocess.run([sys.executable, "-c", "import merge_of_thought, peft, bitsandbytes"], text=True,
                              capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True)  # fmt: skip
    assert "publisher trust" not in imported.stderr and "kernels-community" not in imported.stderr


def test_no_peft_notice_when_mot_deletes_its_branches(qwen3_dir, tokenizer, teachers, tmp_path):
    from helpers import quick_trainer

    trainer = quick_trainer(qwen3_dir, teachers, tmp_path, tokenizer, num_rounds=2, max_steps=1,
                            frozen_delta="adapter")  # the merged adapter stays while branches come and go
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [str(w.message) for w in caught if "was active which is now deleted" in str(w.message)]


def test_data_set_bars_only_where_a_teacher_is_first_tokenized(qwen3_dir, tokenizer, teachers, tmp_path, capsys):
    from helpers import quick_trainer

    quick_trainer(qwen3_dir, teachers, tmp_path, tokenizer, num_rounds=2, max_steps=1).train()
    err = capsys.readouterr().err
    # TRL re-truncates a tokenized set in every branch; those bars are off, the first tokenization keeps its own
    assert err.count("Tokenizing train dataset: 100%") == len(teachers)
    assert err.count("Truncating train dataset: 100%") == len(teachers)


def test_train_help_leads_with_mot_settings_and_help_all_lists_everything(capsys):
    from merge_of_thought.mot_config import mot_settings

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    short = capsys.readouterr().out
    assert len(short.splitlines()) < 150 and "--learning_rate" not in short and "--help_all" in short
    assert all(f"--{name} " in short for name in mot_settings()), [n for n in mot_settings() if f"--{n} " not in short]
    assert "--dry_run" in short and "--verbose" in short and "docs/configuration.md" in short
    with pytest.raises(SystemExit):
        main(["train", "--help_all"])
    assert "--learning_rate" in capsys.readouterr().out


def test_lora_rank_suggests_lora_r_not_local_rank(tmp_path, capsys):
    err = mot_error(capsys, "train", "--config", str(write_config(tmp_path, lora_rank=8)))
    assert "unknown key in the config file: 'lora_rank' (did you mean 'lora_r'?)" in err


def test_a_missing_model_path_is_named_and_leaves_no_folder(tmp_path, capsys):
    cfg = write_config(tmp_path, output_dir=str(tmp_path / "new" / "out"))
    capsys.readouterr()  # the data sets' own progress bars
    err = mot_error(capsys, "train", "--config", str(cfg))
    assert err.endswith(
        f"\nmot: error: model {MISSING_MODEL!r} is neither a local folder (none exists there) nor a Hub model id "
        "(org/name): check model_name_or_path.\n"
    )
    assert "No GPU found" not in err  # MoTConfig's CPU default is documented, not printed before every error
    assert not (tmp_path / "new").exists()  # the output folder the failed start probed is gone again


def test_the_single_teacher_hint_is_yaml_for_a_yaml_user(tmp_path, capsys):
    one = [{"teacher": "t0", "path": "json", "data_files": str(tmp_path / "t0.jsonl")}]
    make_teacher(0, n=8).to_json(str(tmp_path / "t0.jsonl"))
    err = mot_error(capsys, "train", "--config", str(write_config(tmp_path, teachers=one)))
    assert "allow_single_teacher: true in the YAML" in err
