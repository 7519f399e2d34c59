"""evaluation.py: judging completions (math-verify after the reasoning, numeric, exact), pass@1 over samples on a
tiny model, the eval rows it reads, and what a MoT run writes and prints from its evaluations."""

from __future__ import annotations

import json
import logging

import pytest
from datasets import Dataset
from transformers import AutoModelForCausalLM

from merge_of_thought import MoTTrainer

from merge_of_thought.evaluation import (
    Judgement,
    answers_match,
    ends_in_think,
    extract_final_answer,
    generation_accuracy,
    is_correct,
    judge,
    prompts_and_answers,
)

from conftest import make_teacher
from helpers import quick_config, quick_lora


@pytest.mark.parametrize(
    "text, pattern, expected",
    [
        (r"so \boxed{\frac{1}{2}} and finally \boxed{x^{2}+1}.", None, "x^{2}+1"),  # last box, nested braces
        ("step\n#### 1,234\n", None, "1,234"),
        (r"#### 3 then \boxed{4}", None, "4"),  # a box wins over ####
        ("The answer is 17.", r"answer is (\-?\d+)", "17"),
        ("no final answer here", None, None),
        (r"\boxed{unclosed", None, None),
    ],
)
def test_extract_final_answer(text, pattern, expected):
    assert extract_final_answer(text, pattern) == expected


def test_answers_match():
    assert answers_match("1,000", "1000.0") and answers_match(r"\frac{1}{2}", "0.5") and answers_match("$5", "5")
    assert not answers_match("1,000", "1000.0", numeric=False) and answers_match(" x+1 ", "x+1", numeric=False)
    assert not answers_match("7", "8") and not answers_match(None, "8")


R1 = r"<think>Halve it: maybe \boxed{3}? No.</think> The answer is $\boxed{\frac{1}{2}}$."


@pytest.mark.parametrize(
    "completion, gold, expected",
    [
        (R1, "0.5", True),  # after </think>: a boxed fraction equals the decimal, as math-verify decides
        (R1, r"\frac{1}{2}", True),
        (R1, "3", False),  # the boxed 3 inside the reasoning is not scored
        (r"<think>so \boxed{0.5}", "0.5", False),  # reasoning opened and never closed: 0
        (r"no tags at all, \boxed{0.5}", "0.5", True),  # scored whole
        ("3+4=7\n#### 7", "7", True),  # a plain number after ####
        ("3+4=7\n#### 8", "7", False),
        (r"\boxed{(3, \pi/2)}", r"\left( 3, \frac{\pi}{2} \right)", True),  # a bare LaTeX gold (MATH-500's answers)
        (r"\boxed{6 - 5i}", "6 - 5i", True),
        (r"\boxed{5}", "6 - 5i", False),  # read raw, math-verify would take this gold for 5
        (r"\boxed{1+x}", r"The solution: $x+1$.", True),  # a gold with delimiters is parsed as it is
        ("no answer", "12", False),
    ],
)
def test_math_judging_scores_the_text_after_the_reasoning(completion, gold, expected):
    assert is_correct(completion, gold) is expected


def test_a_prompt_that_opens_the_reasoning_makes_the_completion_start_in_it():
    prompt = "<|im_start|>user\n1/2?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert ends_in_think(prompt) and not ends_in_think(prompt + "ok</think>\n") and not ends_in_think("Q: 1/2?")
    assert is_correct(r"\boxed{0.5}", "0.5", in_think=True) is False  # still reasoning: 0
    assert is_correct(r"halve</think> \boxed{0.5}", "0.5", in_think=True) is True


def test_a_gold_math_verify_cannot_parse_is_skipped_not_wrong():
    assert is_correct(r"\boxed{2}", r"\frac{") is None and is_correct(r"\boxed{2}", "") is None
    assert judge("#### 2", "}{").correct is None
    assert is_correct(r"\boxed{2}", r"\frac{", answer_match="exact") is False  # text modes never skip


def test_answer_pattern_and_the_text_modes():
    assert judge("Result: 1/2 (done)", "0.5", answer_pattern=r"Result: (\S+)") == Judgement(True, "1/2")
    assert judge(r"Result: 3 but \boxed{0.5}", "0.5", answer_pattern=r"Result: (\S+)").correct is False
    assert judge("#### 1,000", "1000.0", "numeric") == Judgement(True, "1,000")
    assert judge("#### 1,000", "1000.0", "exact") == Judgement(False, "1,000")
    assert is_correct("<think>#### 7", "7", "numeric") is False  # the reasoning convention holds in every mode
    with pytest.raises(ValueError, match="answer_match must be one of"):
        is_correct("1", "1", "fuzzy")


def test_prompts_and_answers_reads_prompt_answer_and_messages():
    plain = Dataset.from_list([{"prompt": "Q: 1+1=?\n", "answer": "Some work\n#### 2"}])
    assert prompts_and_answers(plain) == (["Q: 1+1=?\n"], ["2"])
    chat = Dataset.from_list(
        [{"messages": [{"role": "user", "content": "1+2?"}, {"role": "assistant", "content": "#### 3"}]}] * 3
    )
    prompts, answers = prompts_and_answers(chat, limit=2)
    assert prompts == [[{"role": "user", "content": "1+2?"}]] * 2 and answers == ["3", "3"]


def test_generation_accuracy_batched_left_padding_matches_one_by_one(qwen3_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(qwen3_dir)
    prompts = ["Q: 1+2=?\n", "Q: 13+29=?\n", [{"role": "user", "content": "Q: 5+5=?"}], "Q: 7=?\n"]
    first_char = r"(?s)^\s*(\S)"  # the first generated character: a deterministic "answer" of a random model
    single = generation_accuracy(model, tokenizer, prompts, ["?"] * 4, batch_size=1, max_new_tokens=6,
                                 pattern=first_char, answer_match="exact", disable_tqdm=True)
    gold = [r["extracted"] for r in single.records[:2]] + ["not-it", "not-it"]
    batched = generation_accuracy(model, tokenizer, prompts, gold, batch_size=4, max_new_tokens=6,
                                  pattern=first_char, answer_match="exact", disable_tqdm=True)
    # Left padding: the batch generates exactly what each prompt generates alone.
    assert [r["completion"] for r in batched.records] == [r["completion"] for r in single.records]
    assert batched.accuracy == 0.5 and [r["correct"] for r in batched.records] == [True, True, False, False]
    assert batched.records[2]["prompt"].endswith("assistant: ")  # chat prompt rendered with the generation prompt
    assert tokenizer.padding_side == "right" and model.training is False


def test_pass_at_1_averages_seeded_samples(qwen3_dir, tokenizer):
    """Four sampled completions per problem: accuracy is the mean over the samples, the same seed draws the same
    completions, another seed others; a problem whose gold cannot be parsed is left out and counted."""
    model = AutoModelForCausalLM.from_pretrained(qwen3_dir)
    prompts = ["Q: 1+2=?\n", "Q: 13+29=?\n", "Q: 5+5=?\n"]
    sample = dict(batch_size=4, max_new_tokens=6, pattern=r"(?s)^\s*(\S)", answer_match="exact", num_samples=4,
                  disable_tqdm=True)  # fmt: skip
    first = generation_accuracy(model, tokenizer, prompts, ["?"] * 3, seed=1, **sample)
    again = generation_accuracy(model, tokenizer, prompts, ["?"] * 3, seed=1, **sample)
    other = generation_accuracy(model, tokenizer, prompts, ["?"] * 3, seed=2, **sample)
    completions = [r["completion"] for r in first.records]
    assert completions == [r["completion"] for r in again.records] != [r["completion"] for r in other.records]
    assert [(r["index"], r["sample"]) for r in first.records] == [(i, s) for i in range(3) for s in range(4)]
    assert len(set(completions[:4])) > 1  # sampled, not greedy

    # gold = the first sample's answer of problem 0: right in every sample that starts the same way
    gold = [first.records[0]["extracted"], "never", "never"]
    scored = generation_accuracy(model, tokenizer, prompts, gold, seed=1, **sample)
    hits = [r["extracted"] == gold[0] for r in first.records[:4]]
    assert scored.accuracy == pytest.approx(sum(hits) / 12) and scored.skipped == 0

    math = generation_accuracy(model, tokenizer, prompts, ["1", r"\frac{", "2"], seed=1, **{**sample,
                               "answer_match": "math", "pattern": None})  # fmt: skip
    assert math.skipped == 1 and [r["correct"] for r in math.records[4:8]] == [None] * 4
    assert math.accuracy == sum(bool(r["correct"]) for r in math.records) / 8  # the 8 scored samples


# ------------------------------------------------------------------------------------ what a MoT run does with it
MISSING_MODEL = "/nonexistent/model/that/must/not/be/loaded"


def held_out_with_completions():
    return make_teacher(0, n=4, seed=9).map(lambda r: {"answer": r["completion"].split("#### ")[1]})


def evaluated_run(model, tokenizer, folder, eval_dataset, **config) -> MoTTrainer:
    args = quick_config(folder, num_rounds=1, max_steps=2, eval_accuracy_samples=3, eval_max_new_tokens=4,
                        per_device_eval_batch_size=4, **config)  # fmt: skip
    teachers = {"a": make_teacher(0, n=8), "b": make_teacher(1, n=8)}
    return MoTTrainer(model, args=args, teachers=teachers, processing_class=tokenizer, peft_config=quick_lora(),
                      eval_dataset=eval_dataset)  # fmt: skip


def test_each_student_eval_writes_its_generations_and_branches_get_their_loss(qwen3_dir, tokenizer, tmp_path):
    """By default: the merged student's pass@1 over 2 samples with every sample in round-XXX/eval.jsonl; each branch
    its eval loss only."""
    trainer = evaluated_run(qwen3_dir, tokenizer, tmp_path, held_out_with_completions(), eval_num_samples=2)
    assert trainer.args.eval_branches == "loss"
    trainer.train()
    records = trainer.metrics.read()
    branches = [r for r in records if r["type"] == "branch"]
    assert len(branches) == 2 and all("eval_loss" in r and "eval_accuracy" not in r for r in branches)
    rounds = [r for r in records if r["type"] == "round"]
    assert [r["round"] for r in rounds] == [0, 1]
    for record in rounds:
        lines = [json.loads(line) for line in (tmp_path / f"round-{record['round']:03d}" / "eval.jsonl").open()]
        assert [(r["index"], r["sample"]) for r in lines] == [(i, s) for i in range(3) for s in range(2)]
        assert set(lines[0]) == {"index", "sample", "prompt", "completion", "extracted", "gold", "correct"}
        assert [r["gold"] for r in lines[::2]] == held_out_with_completions()["answer"][:3]
        assert all(r["correct"] is is_correct(r["completion"], r["gold"]) for r in lines)  # as judged, reproducible
        assert record["eval_accuracy"] == sum(r["correct"] for r in lines) / 6 and record["eval_skipped"] == 0
    assert trainer.last_eval_records == lines  # round 1's
    assert not list(tmp_path.glob("round-001/branch-*/eval.jsonl"))  # branch evals write no generations


def test_a_prompt_answer_eval_set_scores_accuracy_without_a_loss(qwen3_dir, tokenizer, tmp_path, caplog):
    """The README's accuracy-only eval set: chat prompts and bare answers, one of which math-verify cannot parse."""
    answers = ["1", "}{", "3"]
    rows = [{"prompt": [{"role": "user", "content": f"Q: {k}+1=?"}], "answer": a} for k, a in enumerate(answers)]
    with caplog.at_level(logging.INFO, logger="merge_of_thought"):
        trainer = evaluated_run(qwen3_dir, tokenizer, tmp_path, Dataset.from_list(rows), eval_branches="all")
        assert "1 of 3 eval answers cannot be parsed by math-verify (first: row 1, '}{')" in caplog.text
        trainer.train()
    assert caplog.text.count("no eval loss, accuracy only") == 1  # logged once, not per evaluation
    for record in trainer.metrics.read():
        if record["type"] in ("round", "branch"):
            assert "eval_loss" not in record and record["eval_skipped"] == 1 and 0 <= record["eval_accuracy"] <= 1
    lines = [json.loads(line) for line in (tmp_path / "round-001" / "eval.jsonl").open()]
    assert [r["correct"] is None for r in lines] == [False, True, False]


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"prompt": "Q: 1?", "answer": "1"}, {"prompt": "Q: 2?", "answer": None}],
         r"eval row 1 has no answer to score against \(columns: \['answer', 'prompt'\]\)"),
        ([{"prompt": "Q: 1?", "answer": "  "}], r"eval row 0 has no answer"),
        ([{"messages": [{"role": "user", "content": "Q: 1?"}]}], r"eval row 0 has no answer .*\['messages'\]"),
        ([{"question": "Q: 1?", "answer": "1"}], "needs a 'prompt' or 'messages' column"),
    ],
)  # fmt: skip
def test_an_eval_row_without_an_answer_fails_before_the_model_loads(rows, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        evaluated_run(MISSING_MODEL, None, tmp_path, Dataset.from_list(rows))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_eval_settings_in_the_config(tmp_path):
    assert quick_config(tmp_path).eval_branches == "loss" and quick_config(tmp_path).answer_match == "math"
    weighted = quick_config(tmp_path, teacher_weighting="eval_accuracy", eval_accuracy_samples=2)
    assert weighted.eval_branches == "all"  # the weighting reads every branch's accuracy
    assert quick_config(tmp_path, eval_branches=True).eval_branches == "all"  # an older config's boolean
    assert quick_config(tmp_path, eval_branches=False).eval_branches == "none"
    for field, value, message in [
        ("eval_branches", "some", "eval_branches must be one of"),
        ("answer_match", "fuzzy", "answer_match must be one of"),
        ("eval_num_samples", 0, "eval_num_samples must be at least 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            quick_config(tmp_path, **{field: value})
    with pytest.raises(ValueError, match="eval_temperature > 0"):
        quick_config(tmp_path, eval_num_samples=4, eval_temperature=0.0)
