"""evaluation.py: final-answer extraction, answer matching, and batched generation accuracy on a tiny model."""

from __future__ import annotations

import pytest
from datasets import Dataset
from transformers import AutoModelForCausalLM

from merge_of_thought.evaluation import answers_match, extract_final_answer, generation_accuracy, prompts_and_answers


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
                                 pattern=first_char, disable_tqdm=True)
    gold = [r["predicted"] for r in single.records[:2]] + ["not-it", "not-it"]
    batched = generation_accuracy(model, tokenizer, prompts, gold, batch_size=4, max_new_tokens=6,
                                  pattern=first_char, disable_tqdm=True)
    # Left padding: the batch generates exactly what each prompt generates alone.
    assert [r["completion"] for r in batched.records] == [r["completion"] for r in single.records]
    assert batched.accuracy == 0.5 and [r["correct"] for r in batched.records] == [True, True, False, False]
    assert batched.records[2]["prompt"].endswith("assistant: ")  # chat prompt rendered with the generation prompt
    assert tokenizer.padding_side == "right" and model.training is False
