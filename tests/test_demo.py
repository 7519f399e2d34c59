"""`mot demo` end to end: the shipped 4-bit student, four teachers, and learning that shows."""

from __future__ import annotations

import json

from merge_of_thought.cli import main
from merge_of_thought.demo.task import TEACHERS, extract_answer, make_problems, make_teacher_dataset


def test_mot_demo_shows_learning(cpu_4bit_repacking, tmp_path, capsys):
    """On bitsandbytes' AVX512-BF16 path (native or switched on: conftest.py), which broke it before quantization.py."""
    # one thread: the same result as two (0.83) in the same time alone, and under half the time beside the other
    # xdist process's tests (61 s against 144 s: two threads on top of its one oversubscribe two cores)
    assert main(["demo", "--output-dir", str(tmp_path), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]
    accuracies = {int(r[0]): float(r[1]) for r in rows}
    assert sorted(accuracies) == [0, 1, 2, 3, 4]
    assert accuracies[0] < 0.1 and accuracies[4] >= 0.6, accuracies
    assert "Held-out accuracy" in out
    # a full MoT run folder: 4 teachers' branches and a merged student per round
    run = json.loads((tmp_path / "mot_run.json").read_text())
    assert run["teachers"] == list(TEACHERS)
    assert (tmp_path / "round-004" / "merged" / "adapter_model.safetensors").exists()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(line["type"] == "branch" for line in lines) == 16


def test_single_digit_split_and_teachers():
    test = make_problems(30, split="test", eval_size=30, digits=1)
    train = make_problems(70, split="train", eval_size=30, digits=1)
    assert not {p.prompt for p in test} & {p.prompt for p in train}
    assert all(p.a < 10 and p.b < 10 for p in test + train)
    for teacher in TEACHERS:
        data = make_teacher_dataset(teacher, train, seed=0)
        answers = [extract_answer(row["completion"]) for row in data]
        wrong = sum(a != p.answer for a, p in zip(answers, train))
        if teacher == "noisy":
            assert 0.2 < wrong / len(train) < 0.6
        else:
            assert wrong == 0
            # every clean teacher writes the operands in the prompt's order (averaging across orders confuses)
            assert all(f"{p.a}+{p.b}=" in row["completion"] for p, row in zip(train, data))
