"""The real-student miniature's tasks: sums of three two-digit numbers (two regimes of four teachers), products of two
two-digit numbers (the second task, one regime), and a forgetting probe.

Fixed before any training run of each regime (README.md beside this file says why). Everything is chat-formatted for the
instruct student: the user asks, the assistant reasons and ends with ``#### <n>``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from datasets import Dataset

# "shared": the first design (one final-answer line, paths and lengths differ, one teacher writes sentences).
# "formats": four correct teachers whose traces differ from the first token (the toy's formats regime).
# "multiply": the second task (issue 39): products, where the skill must be learned, teachers as in "shared".
REGIMES = {"shared": ("left", "verbose", "right", "noisy"), "formats": ("left", "verbose", "column", "grouped"),
           "multiply": ("left", "verbose", "right", "noisy")}
TEACHERS = REGIMES["shared"]
NOISE = 0.35  # share of the noisy teacher's traces with one wrong step (propagated to a wrong answer)
SPLIT_SEED = 1234  # the train/held-out split of all problems, fixed for every seed


@dataclass(frozen=True)
class Problem:
    a: int
    b: int
    c: int

    @property
    def answer(self) -> int:
        return self.a + self.b + self.c

    @property
    def question(self) -> str:
        return f"What is {self.a} + {self.b} + {self.c}? Think step by step, then give the final answer after ####."


@dataclass(frozen=True)
class Product:
    """The second task: the product of two two-digit numbers (both digits of the second factor not 0 or 1, so
    each partial product is work)."""

    a: int
    b: int

    @property
    def answer(self) -> int:
        return self.a * self.b

    @property
    def question(self) -> str:
        return f"What is {self.a} × {self.b}? Think step by step, then give the final answer after ####."


SECOND_FACTORS = [b for b in range(22, 100) if b % 10 > 1 and b // 10 > 1]  # neither digit 0 or 1


HELD_OUT = 300  # problems held out of every training pool: the scored ones first, then the validation ones


def split(held_out: int = HELD_OUT, regime: str = "shared") -> tuple[list, list]:
    """(training pool, held-out problems) of the regime's task: disjoint, the same for every seed."""
    rng = random.Random(SPLIT_SEED)
    seen, problems = set(), []
    while len(problems) < (3000 if regime == "multiply" else 6000):  # 90 x 64 = 5760 distinct products
        if regime == "multiply":
            p = Product(rng.randint(11, 99), rng.choice(SECOND_FACTORS))
        else:
            p = Problem(rng.randint(10, 99), rng.randint(10, 99), rng.randint(10, 99))
        if p not in seen:
            seen.add(p)
            problems.append(p)
    return problems[held_out:], problems[:held_out]


def product_trace(teacher: str, p: Product, rng: random.Random) -> str:
    """A teacher's chain of thought for a product: the second factor split into tens and ones (left), the same in
    sentences (verbose), the first factor split instead (right), or left with a slip in 35% of the traces."""
    tens, ones = p.b // 10 * 10, p.b % 10
    if teacher in ("left", "noisy"):
        high, low = p.a * tens, p.a * ones
        if teacher == "noisy" and rng.random() < NOISE:  # one partial product off by a multiple of ten or by a
            low += rng.choice([-10, 10, -p.a, p.a])  # factor, carried to a wrong answer
        return f"{p.a} × {tens} = {high}\n{p.a} × {ones} = {low}\n{high} + {low} = {high + low}\n#### {high + low}"
    if teacher == "verbose":
        high, low = p.a * tens, p.a * ones
        return (f"First I multiply {p.a} by the tens of {p.b}: {p.a} × {tens} = {high}.\nThen by the ones: "
                f"{p.a} × {ones} = {low}.\nThen I add them: {high} + {low} = {p.answer}.\n#### {p.answer}")
    if teacher == "right":
        a_tens, a_ones = p.a // 10 * 10, p.a % 10
        high, low = a_tens * p.b, a_ones * p.b
        return f"{a_tens} × {p.b} = {high}\n{a_ones} × {p.b} = {low}\n{high} + {low} = {p.answer}\n#### {p.answer}"
    raise ValueError(f"unknown teacher {teacher!r} of the multiply task")


def trace(teacher: str, p: Problem | Product, rng: random.Random) -> str:
    """One teacher's chain of thought for ``p``; every teacher ends with the same ``#### <n>`` line."""
    if isinstance(p, Product):
        return product_trace(teacher, p, rng)
    if teacher == "left":  # left to right, terse
        ab = p.a + p.b
        return f"{p.a} + {p.b} = {ab}\n{ab} + {p.c} = {ab + p.c}\n#### {p.answer}"
    if teacher == "verbose":  # the same path, in sentences (longer)
        ab = p.a + p.b
        return (f"First I add the first two numbers: {p.a} + {p.b} = {ab}.\nThen I add the last number: "
                f"{ab} + {p.c} = {ab + p.c}.\nSo the sum is {p.answer}.\n#### {p.answer}")
    if teacher == "right":  # another path: the last two first (the distribution-shifted teacher)
        bc = p.b + p.c
        return f"{p.b} + {p.c} = {bc}\n{p.a} + {bc} = {p.a + bc}\n#### {p.answer}"
    if teacher == "noisy":  # left to right, but some traces slip in the first step and carry the slip through
        ab = p.a + p.b
        if rng.random() < NOISE:
            ab += rng.choice([-10, -1, 1, 10])
        return f"{p.a} + {p.b} = {ab}\n{ab} + {p.c} = {ab + p.c}\n#### {ab + p.c}"
    if teacher == "column":  # column addition, ones first, with the carry written out
        ones = p.a % 10 + p.b % 10 + p.c % 10
        tens = p.a // 10 + p.b // 10 + p.c // 10 + ones // 10
        return (f"Ones: {p.a % 10} + {p.b % 10} + {p.c % 10} = {ones}, write {ones % 10}, carry {ones // 10}.\n"
                f"Tens: {p.a // 10} + {p.b // 10} + {p.c // 10} + {ones // 10} = {tens}, write {tens}.\n"
                f"#### {p.answer}")
    if teacher == "grouped":  # place value in one line: the tens, then the ones, then both
        tens, ones = p.a // 10 * 10 + p.b // 10 * 10 + p.c // 10 * 10, p.a % 10 + p.b % 10 + p.c % 10
        return (f"({p.a // 10 * 10} + {p.b // 10 * 10} + {p.c // 10 * 10}) + ({p.a % 10} + {p.b % 10} + {p.c % 10})"
                f" = {tens} + {ones} = {p.answer}\n#### {p.answer}")
    raise ValueError(f"unknown teacher {teacher!r}")


def teacher_dataset(teacher: str, problems: list[Problem] | list[Product], seed: int) -> Dataset:
    """Conversational prompt-completion rows of one teacher on the given prompts (loss on the completion only)."""
    rng = random.Random(f"{teacher}-{seed}")
    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": p.question}],
         "completion": [{"role": "assistant", "content": trace(teacher, p, rng)}]}
        for p in problems
    ])  # fmt: skip


def held_out_dataset(problems: list[Problem] | list[Product]) -> Dataset:
    """Rows MoTConfig's per-round accuracy reads: a ``prompt`` (chat messages) and the ``answer``."""
    return Dataset.from_list([{"prompt": [{"role": "user", "content": p.question}], "answer": str(p.answer)}
                              for p in problems])  # fmt: skip


# What the pretrained student already does: short general questions. Forgetting is measured on the untrained
# student's own greedy answers to them (its NLL on those answers, end minus start), so it needs no reference data.
GENERAL_PROMPTS = (
    "What is the capital of France?", "Name three primary colors.", "What do bees make?",
    "Translate 'thank you' into Spanish.", "What is the opposite of hot?", "How many days are in a week?",
    "What gas do plants take in from the air?", "Write one sentence about the sea.", "What is H2O?",
    "Who wrote Romeo and Juliet?", "What is the largest planet in the solar system?", "Give a synonym for happy.",
    "What do you call a baby cat?", "What color is the sky on a clear day?", "What is the boiling point of water?",
    "Name a fruit that is yellow.", "What language is spoken in Brazil?", "What is the freezing point of water?",
    "How many legs does a spider have?", "What is the main ingredient of bread?",
)  # fmt: skip

# The second forgetting probe (README.md): facts the pretrained student states, none of them a GENERAL_PROMPTS
# question. Each answer is a regular expression matched with word boundaries, in any case.
FACT_QUESTIONS = (
    ("What is the capital of Japan?", "tokyo"), ("What is the capital of Italy?", "rome"),
    ("What is the capital of Germany?", "berlin"), ("What is the capital of Spain?", "madrid"),
    ("What is the capital of the United Kingdom?", "london"), ("What is the capital of Russia?", "moscow"),
    ("What is the capital of Egypt?", "cairo"), ("What is the capital of China?", "beijing"),
    ("What is the capital of Canada?", "ottawa"), ("What is the capital of Australia?", "canberra"),
    ("What is the capital of Greece?", "athens"), ("What is the capital of Portugal?", "lisbon"),
    ("Which planet is known as the Red Planet?", "mars"), ("What is the chemical symbol for gold?", "au"),
    ("What is the closest star to Earth?", "sun"), ("Which metal is liquid at room temperature?", "mercury"),
    ("Which organ pumps blood through the body?", "heart"), ("What is the hardest natural substance?", "diamonds?"),
    ("What is the largest mammal?", "(blue )?whales?"), ("What force keeps us on the ground?", "gravity"),
    ("What is the largest ocean on Earth?", "pacific"), ("What is the tallest mountain in the world?", "everest"),
    ("What is the longest river in Africa?", "nile"), ("How many continents are there?", "seven|7"),
    ("In which country are the pyramids of Giza?", "egypt"), ("What language is mainly spoken in Mexico?", "spanish"),
    ("What is the currency of Japan?", "yen"), ("In which country is the Eiffel Tower?", "france"),
    ("What is the largest country by area?", "russia"),
    ("Who was the first president of the United States?", "washington"),
    ("Who painted the Mona Lisa?", "leonardo|da vinci"), ("Who developed the theory of relativity?", "einstein"),
    ("Who discovered penicillin?", "fleming"), ("Who wrote the Odyssey?", "homer"),
    ("Which animal is known as the king of the jungle?", "lions?"), ("How many hours are in a day?", "24|twenty-four"),
    ("Which animal says moo?", "cows?"), ("How many minutes are in an hour?", "60|sixty"),
    ("What does a caterpillar turn into?", "butterfly|butterflies|moth"), ("What do cows drink as calves?", "milk"),
)  # fmt: skip
