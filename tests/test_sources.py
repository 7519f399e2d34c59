"""Teachers from the data sets people have (local fixtures with the Hub sets' real column names), reasoning in the
formats that exist rendered through real chat templates, and the checks made before the model loads."""

from __future__ import annotations

import json
import logging
from importlib.resources import files

import pytest
from datasets import Dataset

from merge_of_thought import MoTConfig, MoTTrainer
from merge_of_thought.cli import main
from merge_of_thought.data import prepare_teachers
from merge_of_thought.reasoning import reasoning_style, split_think
from merge_of_thought.sources import EvalSetConfig, TeacherConfig, load_eval_set, load_teachers

from helpers import OMR, S1K, quick_config, quick_lora, write_hub_copies, write_jsonl

MISSING_MODEL = "/nonexistent/model/that/must/not/be/loaded"


# a template that reads only a 'thinking' key
THINKING_ONLY = "{% for m in messages %}{{ m.role }}: {% if m.thinking %}[{{ m.thinking }}] {% endif %}" \
    "{{ m.content }}\n{% endfor %}"


def trl_template(name: str) -> str:
    """A chat template as TRL ships it (Qwen3's, DeepSeek-R1-Distill's, gpt-oss's), or THINKING_ONLY."""
    return THINKING_ONLY if name == "thinking_only" else (files("trl") / "chat_templates" / f"{name}.jinja").read_text()


@pytest.fixture
def hub_copies(tmp_path, monkeypatch):
    """Local folders named like the Hub data sets (helpers.write_hub_copies): ``load_dataset(id)`` reads a local
    folder of that name first, so the specs are the ones a user writes."""
    monkeypatch.chdir(tmp_path)
    write_hub_copies(tmp_path)
    return tmp_path


def s1k_teacher(name, **overrides):
    values = dict(path=S1K, split="train", teacher=name, prompt_column="question",
                  reasoning_column=f"{name}_thinking_trajectory", completion_column=f"{name}_attempt")  # fmt: skip
    return TeacherConfig(**{**values, **overrides})


# ------------------------------------------------------------------------------------------- the three shapes of data
def test_teachers_in_columns_of_the_same_rows(hub_copies):
    teachers = load_teachers([s1k_teacher("deepseek"), s1k_teacher("gemini")])
    assert list(teachers) == ["deepseek", "gemini"] and all(len(t) == 10 for t in teachers.values())
    user, assistant = teachers["gemini"][3]["messages"]
    assert (user["role"], user["content"], user["reasoning_content"]) == ("user", "What is 3+7?", None)
    assert assistant["content"] == "**Answer** \\boxed{10}" and assistant["reasoning_content"] == "3+7=10"


def test_teachers_told_apart_by_a_column(hub_copies):
    spec = dict(path=OMR, split="cot", prompt_column="problem", completion_column="generated_solution")
    one = load_teachers([TeacherConfig(**spec, teacher="qwq", where={"generation_model": "QwQ-32B"})])
    assert list(one) == ["qwq"] and [m[0]["content"] for m in one["qwq"]["messages"]] == [
        "What is 1*3?", "What is 4*3?", "What is 7*3?"]  # fmt: skip
    each = load_teachers([TeacherConfig(**spec, split_by="generation_model")])
    assert {name: len(rows) for name, rows in each.items()} == {"DeepSeek-R1": 6, "QwQ-32B": 3}


def test_the_union_baseline_takes_teachers_of_every_shape(hub_copies):
    from merge_of_thought.baselines import baseline_run

    teachers = load_teachers([s1k_teacher("deepseek"), TeacherConfig(
        path=OMR, split="cot", split_by="generation_model", prompt_column="problem",
        completion_column="generated_solution")])  # fmt: skip
    data, _ = baseline_run("mtd", teachers, MoTConfig(output_dir="unused"))
    union = next(iter(data.values()))
    assert len(union) == 19 and sum(m[1]["reasoning_content"] is not None for m in union["messages"]) == 10


def test_eval_problems_from_a_question_and_an_answer_column(hub_copies):
    rows = load_eval_set(EvalSetConfig(path="HuggingFaceH4/MATH-500", split="test", prompt_column="problem",
                                       answer_column="answer"))  # fmt: skip
    assert set(rows.column_names) == {"prompt", "answer"} and rows[2] == {
        "prompt": [{"role": "user", "content": "What is 2+2?"}], "answer": "4"}  # fmt: skip


# -------------------------------------------------------------------------------- reasoning through the chat template
def test_split_think():
    assert split_think("<think>\nR\n</think>\n\nA") == ("R", "A", True)
    assert split_think("R</think>A") == ("R", "A", True)  # the generation prompt opened the block
    assert split_think("<think>R and no end") == ("R and no end", "", False)
    assert split_think("just an answer") == (None, "just an answer", True)


@pytest.mark.parametrize("template, style", [
    # transformers 5 hands a template 'reasoning_content' as 'thinking' too, so the first style works for both
    ("qwen3", "reasoning_content"), ("gptoss", "reasoning_content"), ("thinking_only", "reasoning_content"),
    ("deepseek_r1_distill", None), (None, "inline")])  # fmt: skip
def test_reasoning_style_is_asked_of_the_template(template, style, tokenizer):
    assert reasoning_style(tokenizer, trl_template(template) if template else None) == style


def rendered(teachers, tokenizer, template=None):
    args = MoTConfig(output_dir="unused", max_length=None, chat_template_path=template)
    prepared, _ = prepare_teachers(teachers, tokenizer, args)
    return {name: tokenizer.apply_chat_template(rows[0]["messages"], tokenize=False,
                                                chat_template=open(template).read() if template else None)
            for name, rows in prepared.items()}  # fmt: skip


@pytest.fixture
def reasoning_formats():
    """One trace, its reasoning carried the three ways that exist."""
    question = {"role": "user", "content": "What is 2+3?"}
    return {
        "inline": Dataset.from_list([{"messages": [question, {"role": "assistant",
                                                              "content": "<think>\n2+3=5\n</think>\n\n\\boxed{5}"}]}]),
        "reasoning_content": Dataset.from_list([{"messages": [question, {
            "role": "assistant", "content": "\\boxed{5}", "reasoning_content": "2+3=5"}]}]),
        "thinking": Dataset.from_list([{"messages": [question, {
            "role": "assistant", "content": "\\boxed{5}", "thinking": "2+3=5"}]}]),
    }  # fmt: skip


@pytest.mark.parametrize("template, expected", [
    ("qwen3", "<|im_start|>assistant\n<think>\n2+3=5\n</think>\n\n\\boxed{5}<|im_end|>"),
    ("gptoss", "<|channel|>analysis<|message|>2+3=5<|end|><|start|>assistant<|channel|>final<|message|>\\boxed{5}"),
    ("thinking_only", "assistant: [2+3=5] \\boxed{5}"),
    (None, "assistant: <think>\n2+3=5\n</think>\n\n\\boxed{5}"),  # a template that only renders content
])  # fmt: skip
def test_every_reasoning_format_reaches_the_text_the_student_trains_on(
    template, expected, reasoning_formats, tokenizer, tmp_path
):
    path = None
    if template:
        path = tmp_path / f"{template}.jinja"
        path.write_text(trl_template(template))
    texts = rendered(reasoning_formats, tokenizer, str(path) if path else None)
    assert all(expected in text for text in texts.values()), texts


def test_a_template_that_drops_reasoning_is_refused_before_the_model_loads(reasoning_formats, tokenizer, tmp_path):
    path = tmp_path / "r1_distill.jinja"
    path.write_text(trl_template("deepseek_r1_distill"))
    with pytest.raises(ValueError, match=r"teacher 'inline': its traces carry reasoning \(row 0\), but the chat "
                                         r"template .* drops it \(as DeepSeek-R1-Distill's does"):  # fmt: skip
        MoTTrainer(MISSING_MODEL, args=quick_config(tmp_path / "out", chat_template_path=str(path)),
                   teachers=reasoning_formats, processing_class=tokenizer, peft_config=quick_lora())  # fmt: skip


# ----------------------------------------------------------------------------------- checks before the model loads
def test_a_row_without_messages_is_named_before_the_model_loads(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}] * 29
    write_jsonl(tmp_path / "r1.jsonl", [*rows, {"text": "a row in another format"}])
    file = str(tmp_path / "r1.jsonl")
    teachers = load_teachers([TeacherConfig(path="json", data_files=file),
                              TeacherConfig(path="json", data_files=file, teacher="b")])  # fmt: skip
    with pytest.raises(ValueError, match=r"teacher 'r1', row 29: no 'messages' \(this data set is conversational\); "
                                         r"the row has the columns \['text'\]"):  # fmt: skip
        MoTTrainer(MISSING_MODEL, args=quick_config(tmp_path / "out"), teachers=teachers, processing_class=tokenizer,
                   peft_config=quick_lora())  # fmt: skip
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_traces_cut_off_mid_thought_are_counted_and_left_out(tokenizer, caplog):
    question = {"role": "user", "content": "Q"}
    rows = [{"messages": [question, {"role": "assistant", "content": f"<think>step {i}</think>\\boxed{{{i}}}"}]}
            for i in range(9)]  # fmt: skip
    cut = {"messages": [question, {"role": "assistant", "content": "<think>step and then the budget ran out"}]}
    teachers = {"a": Dataset.from_list([*rows[:4], cut, *rows[4:]]), "b": Dataset.from_list(rows)}
    with caplog.at_level(logging.WARNING, logger="merge_of_thought"):
        prepared, _ = prepare_teachers(teachers, tokenizer, MoTConfig(output_dir="unused", max_length=None))
    assert len(prepared["a"]) == 9 and len(prepared["b"]) == 9
    assert "teacher 'a': 1 of 10 traces open <think> and never close it (rows 4)" in caplog.text
    with pytest.raises(ValueError, match="teacher 'c': every trace opens <think> and never closes it"):
        prepare_teachers({"c": Dataset.from_list([cut])}, tokenizer, MoTConfig(output_dir="unused"))


def test_lengths_are_reported_and_a_large_cut_is_refused(hub_copies, tokenizer, caplog):
    teachers = load_teachers([s1k_teacher("deepseek"), s1k_teacher("gemini")])
    args = MoTConfig(output_dir="unused", max_length=200)
    with caplog.at_level(logging.INFO, logger="merge_of_thought"), pytest.raises(ValueError) as refused:
        prepare_teachers(teachers, tokenizer, args)
    report = caplog.text
    assert "Trace lengths in tokens of the student's tokenizer (max_length=200)" in report
    deepseek = next(line.split() for line in report.splitlines() if line.strip().startswith("deepseek"))
    rows, median, p95, most, cut = int(deepseek[1]), int(deepseek[2]), int(deepseek[3]), int(deepseek[4]), deepseek[5]
    assert rows == 10 and median < p95 <= most and int(cut) >= 1
    assert f"Set max_length to {p95} (keeps 95%) or {most} (keeps all)" in str(refused.value)
    assert str(refused.value).startswith(f"teacher 'deepseek': {cut} of 10 traces")
    args.max_truncated_fraction = 1.0  # the user allows the cut
    _, stats = prepare_teachers(teachers, tokenizer, args)
    assert [s.teacher for s in stats] == ["deepseek", "gemini"] and stats[1].cut == 0


@pytest.mark.parametrize("spec, message", [
    (s1k_teacher("deepseek", reasoning_column="r1_trajectory"),
     r"teacher 'deepseek': no column 'r1_trajectory' in its data set; its columns are \['solution', 'question'"),
    (TeacherConfig(path=OMR, split="cot", teacher="x", where={"generation_model": "o3"}, prompt_column="problem",
                   completion_column="generated_solution"),
     r"teacher 'x': no row has \{'generation_model': 'o3'\}; the values there are generation_model: "
     r"'DeepSeek-R1' \(6\), 'QwQ-32B' \(3\)"),
    (TeacherConfig(path=OMR, split="cot", split_by="model"), r"no column 'model' in its data set"),
    (s1k_teacher("gemini", completion_column=None), "needs both prompt_column .* and completion_column"),
])  # fmt: skip
def test_bad_specs_are_named(spec, message, hub_copies):
    with pytest.raises(ValueError, match=message):
        load_teachers([spec])


def test_a_teacher_file_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "r1.jsonl").write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"teacher 'r1': data_files='.*r1.jsonl' is not UTF-8 text \(.*Invalid UTF8"):
        load_teachers([TeacherConfig(path="json", data_files=str(tmp_path / "r1.jsonl"))])


def test_a_row_that_breaks_the_mapping_is_named(hub_copies):
    rows = [json.loads(line) for line in (hub_copies / S1K / "train.jsonl").read_text().splitlines()]
    rows[6]["gemini_attempt"] = None
    write_jsonl(hub_copies / S1K / "train.jsonl", rows)
    with pytest.raises(ValueError, match=r"teacher 'gemini', row 6: 'gemini_attempt' is missing; the row has the "
                                         r"columns \['solution', 'question'"):  # fmt: skip
        load_teachers([s1k_teacher("gemini")])


def test_an_eval_row_without_an_answer_is_named(hub_copies):
    path = hub_copies / "HuggingFaceH4/MATH-500/test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[1]["answer"] = ""
    write_jsonl(path, rows)
    with pytest.raises(ValueError, match=r"eval_dataset, row 1: 'answer' is empty"):
        load_eval_set(EvalSetConfig(path="HuggingFaceH4/MATH-500", split="test", prompt_column="problem",
                                    answer_column="answer"))  # fmt: skip


# ------------------------------------------------------------------------------------------------ the command line
def test_dry_run_checks_the_data_and_reports_lengths_without_a_model(hub_copies, qwen3_dir, capsys):
    config = hub_copies / "mot.yaml"
    config.write_text(json.dumps({
        "model_name_or_path": qwen3_dir, "output_dir": str(hub_copies / "out"), "max_length": 4096,
        "teachers": [vars(s1k_teacher("deepseek")), vars(s1k_teacher("gemini")),
                     {"path": OMR, "split": "cot", "split_by": "generation_model", "prompt_column": "problem",
                      "completion_column": "generated_solution"}],
        "eval_dataset": {"path": "HuggingFaceH4/MATH-500", "split": "test", "prompt_column": "problem",
                         "answer_column": "answer"}}))  # fmt: skip
    assert main(["train", "--config", str(config), "--dry_run"]) == 0
    captured = capsys.readouterr()
    assert "Trace lengths in tokens of the student's tokenizer (max_length=4096)" in captured.err
    assert ("Teachers: deepseek (10 rows), gemini (10 rows), DeepSeek-R1 (6 rows), QwQ-32B (3 rows); held-out "
            "problems: 4. 5 rounds x 4 teachers x 50 steps = 1000 SFT steps; no model was loaded.") in captured.out
    assert not (hub_copies / "out").exists()


def test_weight_with_split_by_is_refused(hub_copies, capsys):
    config = hub_copies / "mot.yaml"
    config.write_text(json.dumps({"model_name_or_path": "x", "teachers": [
        {"path": OMR, "split_by": "generation_model", "weight": 0.5}, {"path": S1K}]}))  # fmt: skip
    with pytest.raises(SystemExit):
        main(["train", "--config", str(config)])
    assert "'weight' with 'split_by' would give every teacher it makes the same weight" in capsys.readouterr().err


def test_dry_run_of_a_gpu_recipe_on_a_machine_without_one(hub_copies, qwen3_dir, capsys):
    """A dry run trains nothing: the recipe's bf16 (which a CPU-only TrainingArguments refuses) is not checked."""
    recipe = hub_copies.parent / "recipe.yaml"  # bf16: true, as a GPU recipe has it
    recipe.write_text(json.dumps({"model_name_or_path": qwen3_dir, "bf16": True, "max_length": 4096,
                                  "output_dir": str(hub_copies / "out"), "teachers": [
                                      vars(s1k_teacher("deepseek")), vars(s1k_teacher("gemini"))]}))  # fmt: skip
    assert main(["train", "--config", str(recipe), "--dry_run"]) == 0
    assert "Dry run: the data passed every check" in capsys.readouterr().out


def test_dry_run_makes_the_trainers_own_checks(hub_copies, qwen3_dir, capsys):
    """--dry_run calls the functions MoTTrainer checks its data with: a setting the trainer would refuse before
    loading the model (weights from eval scores, with no held-out problems) is refused by the dry run too."""
    config = hub_copies / "mot.yaml"
    config.write_text(json.dumps({"model_name_or_path": qwen3_dir, "output_dir": str(hub_copies / "out"),
                                  "max_length": 4096, "teacher_weighting": "eval_accuracy", "eval_accuracy_samples": 4,
                                  "teachers": [vars(s1k_teacher("deepseek")), vars(s1k_teacher("gemini"))]}))
    with pytest.raises(SystemExit):
        main(["train", "--config", str(config), "--dry_run"])
    assert "teacher_weighting='eval_accuracy' weighs each round's branches" in capsys.readouterr().err
