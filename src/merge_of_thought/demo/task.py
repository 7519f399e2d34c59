"""Synthetic reasoning task for the embedded demo: addition with chain-of-thought teachers.

Every problem is ``a+b`` with two-digit operands (``10 <= a, b <= 99``, the harder task) or single digits
(``digits=1``, what ``mot demo`` distils in about a minute). The prompt is ``"47+25=?\\n"`` and every teacher ends
its trace with the shared final-answer line ``"#### 72"``. The four synthetic teachers reach that answer along different
reasoning paths, with different lengths and verbosity:

- ``"column"``: terse column addition, ones first (``7+5=12`` / ``4+2+1=7``).
- ``"verbose"``: the same algorithm spelled out in words (``ones 7+5=12, carry 1`` / ``tens 4+2+1=7`` / ``so 72``).
- ``"split"``: place-value decomposition, tens first (``40+20=60`` / ``7+5=12`` / ``60+12=72``); single digits have
  nothing to split, so it names the operands first (``add 7 and 5`` / ``7+5=12``).
- ``"noisy"``: column style, but a fraction of its traces contain a wrong step (a dropped carry or an off-by-one
  digit fact) that propagates to a wrong final answer.

One more teacher, outside the demo's four: ``"commuted"`` writes column addition with the operands swapped
(``5+7=12`` / ``2+4+1=7``): the column format, another order. With column, split and noisy it makes a set of
teachers that share the surface format (``x+y=z`` lines) and differ in path, length and accuracy.

Each step of every trace is a single-digit fact, a carry fact or a round-tens fact, i.e. exactly the primitives that
the demo student learns in pre-training (see [`~merge_of_thought.demo.student.pretraining_corpus`]); the student has
never seen multi-digit addition nor the ``####`` answer format before distillation.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from datasets import Dataset

from ..evaluation import Prompt, is_correct
from ..evaluation import generate_completions as generate_completions_


ANSWER_PREFIX = "#### "
TEACHERS: tuple[str, ...] = ("column", "verbose", "split", "noisy")
ALL_TEACHERS: tuple[str, ...] = (*TEACHERS, "commuted")
DEFAULT_NOISE_RATE = 0.4
_ANSWER_RE = re.compile(r"####\s*(-?\d+)")
ANSWER_PATTERN = r"(?s)\A.*?####\s*(-?\d+)"  # the number after the FIRST "####" (what extract_answer reads)
_NUMBER_RE = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Problem:
    """One addition problem ``a + b``."""

    a: int
    b: int

    @property
    def answer(self) -> int:
        return self.a + self.b

    @property
    def prompt(self) -> str:
        return f"{self.a}+{self.b}=?\n"

    @property
    def messages(self) -> list[dict[str, str]]:
        """The prompt as a chat (one user message), for students with a chat template."""
        return [{"role": "user", "content": self.prompt.strip()}]


_OPERAND_RANGES = {1: (0, 10), 2: (10, 100), 3: (100, 1000)}


@functools.lru_cache(maxsize=4)
def _shuffled_problems(digits: int) -> tuple[Problem, ...]:
    """Every problem with ``digits``-digit operands, in one fixed random order (cached: 810000 at three digits)."""
    if digits not in _OPERAND_RANGES:
        raise ValueError(f"digits must be one of {sorted(_OPERAND_RANGES)}, got {digits!r}")
    low, high = _OPERAND_RANGES[digits]
    pool = [Problem(a, b) for a in range(low, high) for b in range(low, high)]
    random.Random(1234).shuffle(pool)
    return tuple(pool)


def make_problems(
    n: int, seed: int = 0, split: str = "train", eval_size: int = 500, digits: int = 2
) -> list[Problem]:
    """Sample ``n`` distinct problems from a fixed train / held-out partition.

    All problems (100 with one-digit operands, 8100 with two, 810000 with three) are shuffled once with a fixed seed;
    the first ``eval_size`` form the held-out pool and the rest the training pool, so held-out prompts never appear
    in training data whatever ``n`` and ``seed`` are.

    Args:
        n: Number of problems to return.
        seed: Seed for sampling within the pool.
        split: ``"train"`` or ``"test"`` (held-out).
        eval_size: Size of the held-out pool (must be the same for train and test calls).
        digits: Digits per operand: 1 (0..9, what ``mot demo`` distils in its few minutes), 2 (10..99) or 3
            (100..999, the quality benchmark's task).

    Returns:
        A list of ``n`` distinct [`Problem`]s.
    """
    pool = _shuffled_problems(digits)
    if split == "test":
        pool = pool[:eval_size]
    elif split == "train":
        pool = pool[eval_size:]
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n > len(pool):
        raise ValueError(f"Requested {n} problems but the {split} pool only has {len(pool)}.")
    return random.Random(seed).sample(pool, n)


_PLACES = ("ones", "tens", "hundreds", "thousands")


def _digits(n: int, width: int) -> list[int]:
    """The ``width`` decimal digits of ``n``, least significant first."""
    return [(n // 10**i) % 10 for i in range(width)]


def _column(a: int, b: int, *, verbose: bool, rng: random.Random | None = None, noise_rate: float = 0.0) -> str:
    """Column addition, ones first: one line per place (``4+2+1=7``), the last place's sum written whole."""
    width = max(len(str(a)), len(str(b)))
    a_digits, b_digits = _digits(a, width), _digits(b, width)
    # Noisy teacher: sometimes gets the ones fact wrong by one, sometimes forgets the first carry.
    error = None
    if rng is not None and rng.random() < noise_rate:
        has_carry = width > 1 and a_digits[0] + b_digits[0] >= 10  # a single-digit sum has no carry to drop
        error = "drop_carry" if has_carry and rng.random() < 0.5 else "off_by_one"
    lines, result, carry = [], 0, 0
    for place in range(width):
        total = a_digits[place] + b_digits[place] + carry
        if place == 0 and error == "off_by_one":
            total += rng.choice([-1, 1]) if total > 0 else 1
        expr = f"{a_digits[place]}+{b_digits[place]}" + ("+1" if carry else "")
        last = place == width - 1
        carry = total // 10 if not last else 0
        if place == 0 and error == "drop_carry":
            carry = 0
        result += (total if last else total % 10) * 10**place
        if verbose:
            lines.append(f"{_PLACES[place]} {expr}={total}" + (", carry 1" if carry else ""))
        else:
            lines.append(f"{expr}={total}")
    if verbose:
        lines.append(f"so {result}")
    return "\n".join(lines + [f"{ANSWER_PREFIX}{result}"])


def _split(a: int, b: int) -> str:
    """Place-value decomposition, largest place first, then a running total (``40+20=60`` / ... / ``60+12=72``)."""
    if a < 10 and b < 10:  # nothing to split: it names the operands first
        return f"add {a} and {b}\n{a}+{b}={a + b}\n{ANSWER_PREFIX}{a + b}"
    width = max(len(str(a)), len(str(b)))
    a_digits, b_digits = _digits(a, width), _digits(b, width)
    lines, partials = [], []
    for place in reversed(range(width)):
        x, y = a_digits[place] * 10**place, b_digits[place] * 10**place
        lines.append(f"{x}+{y}={x + y}")
        partials.append(x + y)
    running = partials[0]
    for partial in partials[1:]:
        lines.append(f"{running}+{partial}={running + partial}")
        running += partial
    return "\n".join(lines + [f"{ANSWER_PREFIX}{a + b}"])


def teacher_trace(
    teacher: str, problem: Problem, rng: random.Random | None = None, noise_rate: float = DEFAULT_NOISE_RATE
) -> str:
    """Chain-of-thought completion written by ``teacher`` for ``problem`` (ends with ``"#### <answer>"``)."""
    a, b = problem.a, problem.b
    if teacher == "column":
        return _column(a, b, verbose=False)
    if teacher == "verbose":
        return _column(a, b, verbose=True)
    if teacher == "split":
        return _split(a, b)
    if teacher == "noisy":
        return _column(a, b, verbose=False, rng=rng or random.Random(0), noise_rate=noise_rate)
    if teacher == "commuted":
        return _column(b, a, verbose=False)
    raise ValueError(f"Unknown teacher {teacher!r}; choose from {ALL_TEACHERS}.")


def make_teacher_dataset(
    teacher: str,
    problems: Sequence[Problem],
    seed: int = 0,
    noise_rate: float = DEFAULT_NOISE_RATE,
    conversational: bool = False,
) -> Dataset:
    """Distillation data of one teacher in TRL prompt-completion format.

    Args:
        teacher: One of [`ALL_TEACHERS`].
        problems: Prompts to answer (all teachers share them).
        seed: Seed for the noisy teacher's mistakes.
        noise_rate: Fraction of the noisy teacher's traces that contain a wrong step.
        conversational: If ``True``, ``prompt`` / ``completion`` are lists of chat messages instead of strings.

    Returns:
        A [`~datasets.Dataset`] with columns ``"prompt"`` and ``"completion"``.
    """
    rng = random.Random(seed)
    prompts, completions = [], []
    for problem in problems:
        trace = teacher_trace(teacher, problem, rng=rng, noise_rate=noise_rate)
        if conversational:
            prompts.append(problem.messages)
            completions.append([{"role": "assistant", "content": trace}])
        else:
            prompts.append(problem.prompt)
            completions.append(trace)
    return Dataset.from_dict({"prompt": prompts, "completion": completions})


def make_teacher_datasets(
    problems: Sequence[Problem], teachers: Sequence[str] = TEACHERS, seed: int = 0, **kwargs
) -> dict[str, Dataset]:
    """One prompt-completion dataset per teacher, all on the same prompts."""
    return {t: make_teacher_dataset(t, problems, seed=seed, **kwargs) for t in teachers}


def extract_answer(text: str, strict: bool = True) -> int | None:
    """Final answer of a completion: the number after the first ``"####"``.

    With ``strict=False``, falls back to the last integer in the text when there is no ``"####"`` line.
    """
    match = _ANSWER_RE.search(text)
    if match:
        return int(match.group(1))
    if not strict:
        numbers = _NUMBER_RE.findall(text)
        return int(numbers[-1]) if numbers else None
    return None


def generate_completions(
    model, tokenizer, prompts: Sequence[Prompt], batch_size: int = 128, max_new_tokens: int = 64
) -> list[str]:
    """Greedy, batched, left-padded completions (special tokens dropped), stopping at the tokenizer's EOS; chat
    prompts are rendered with the tokenizer's chat template."""
    return generate_completions_(
        model, tokenizer, list(prompts), batch_size, max_new_tokens, disable_tqdm=True,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip


def accuracy(
    model,
    tokenizer,
    problems: Sequence[Problem],
    batch_size: int = 128,
    max_new_tokens: int = 64,
    return_completions: bool = False,
    conversational: bool = False,
) -> float | tuple[float, list[str]]:
    """Accuracy of the model's greedy final answers (the number after the first ``"####"``, compared as a number by
    :func:`~merge_of_thought.evaluation.is_correct`) on ``problems``, asked as plain prompts or, with
    ``conversational=True``, as the chat messages the conversational teacher data uses."""
    prompts = [p.messages if conversational else p.prompt for p in problems]
    completions = generate_completions(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens)
    correct = sum(bool(is_correct(c, str(p.answer), "numeric", ANSWER_PATTERN)) for c, p in zip(completions, problems))
    acc = correct / max(len(problems), 1)
    return (acc, completions) if return_completions else acc
