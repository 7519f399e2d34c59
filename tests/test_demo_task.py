"""Fast checks of the embedded demo ingredients (tokenizer, synthetic task and teachers, shipped student)."""

import pytest
import torch
from transformers import AutoTokenizer

from merge_of_thought.demo.student import DEMO_STUDENT_DIR, load_demo_student
from merge_of_thought.demo.task import (
    ANSWER_PREFIX,
    TEACHERS,
    accuracy,
    extract_answer,
    make_problems,
    make_teacher_dataset,
    teacher_trace,
)
from merge_of_thought.demo.tokenizer import build_char_tokenizer


def test_tokenizer_round_trip(tmp_path):
    tokenizer = build_char_tokenizer()
    assert len(tokenizer) < 128
    text = "47+25=?\n7+5=12\n4+2+1=7\n#### 72"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and len(ids) == len(text) + 1  # BOS + one token per character
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer(text, add_special_tokens=False).input_ids == ids[1:]

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text).input_ids == ids
    assert reloaded.decode(ids + [reloaded.eos_token_id], skip_special_tokens=True) == text
    assert reloaded.bos_token_id == tokenizer.bos_token_id
    assert (reloaded.pad_token_id, reloaded.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert reloaded.pad_token_id != reloaded.eos_token_id

    messages = [{"role": "user", "content": "47+25=?"}, {"role": "assistant", "content": "#### 72"}]
    rendered = reloaded.apply_chat_template(messages, tokenize=False)
    assert rendered.startswith(reloaded.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True))
    assert "#### 72" + reloaded.eos_token in rendered


def test_tokenizer_is_deterministic():
    assert build_char_tokenizer().get_vocab() == build_char_tokenizer().get_vocab()


@pytest.mark.parametrize("teacher", TEACHERS)
def test_teacher_formats(teacher):
    problems = make_problems(50, seed=0)
    dataset = make_teacher_dataset(teacher, problems, seed=0)
    assert dataset.column_names == ["prompt", "completion"]
    assert dataset[0]["prompt"] == problems[0].prompt
    for row in dataset:
        last_line = row["completion"].split("\n")[-1]
        assert last_line.startswith(ANSWER_PREFIX)
        assert extract_answer(row["completion"]) is not None
    if teacher != "noisy":
        assert all(extract_answer(row["completion"]) == p.answer for row, p in zip(dataset, problems))


def test_teachers_differ():
    problem = make_problems(1, seed=3)[0]
    traces = {t: teacher_trace(t, problem) for t in ("column", "verbose", "split")}
    assert len(set(traces.values())) == 3
    assert len(traces["verbose"]) > len(traces["column"])


def test_noisy_teacher_is_noisy():
    problems = make_problems(400, seed=0)
    dataset = make_teacher_dataset("noisy", problems, seed=0, noise_rate=0.4)
    wrong = sum(extract_answer(row["completion"]) != p.answer for row, p in zip(dataset, problems))
    assert 0.25 < wrong / len(problems) < 0.55
    clean = make_teacher_dataset("noisy", problems, seed=0, noise_rate=0.0)
    assert all(extract_answer(row["completion"]) == p.answer for row, p in zip(clean, problems))


def test_extract_answer():
    assert extract_answer("7+5=12\n#### 72") == 72
    assert extract_answer("#### -3") == -3
    assert extract_answer("7+5=12") is None
    assert extract_answer("7+5=12", strict=False) == 12
    assert extract_answer("") is None


def test_held_out_disjoint_from_training():
    test = make_problems(500, seed=0, split="test")
    train_prompts = {p.prompt for seed in (0, 1) for p in make_problems(3000, seed=seed, split="train")}
    assert not train_prompts & {p.prompt for p in test}
    assert make_problems(20, seed=1) == make_problems(20, seed=1)
    assert len(set(make_problems(200, seed=0))) == 200


@pytest.fixture(scope="module")
def student_4bit():
    torch.manual_seed(0)
    return load_demo_student(load_in_4bit=True)


def test_student_loads_in_4bit(student_4bit):
    import bitsandbytes as bnb

    model, tokenizer = student_4bit
    assert (DEMO_STUDENT_DIR / "model.safetensors").is_file()
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 7 * model.config.num_hidden_layers
    assert linears[0].weight.quant_state.quant_type == "nf4"
    assert len(tokenizer) <= model.config.vocab_size


def test_student_has_prior_but_not_the_task(student_4bit):
    model, tokenizer = student_4bit
    # The pre-trained prior knows its single-digit facts ...
    facts = ["7+5=", "3+4=", "8+6+1=", "40+20="]
    completions = [c.split("\n")[0] for c in _greedy(model, tokenizer, facts, 4)]
    assert sum(c == str(eval(f[:-1])) for c, f in zip(completions, facts)) >= 3
    # ... but cannot solve the held-out task before distillation.
    assert accuracy(model, tokenizer, make_problems(32, seed=0, split="test"), max_new_tokens=24) < 0.1


def _greedy(model, tokenizer, prompts, max_new_tokens):
    from merge_of_thought.demo.task import generate_completions

    return generate_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
