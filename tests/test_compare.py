"""``mot compare``: a MoT run and its MTD baseline read from their folders into one table and one plot."""

from __future__ import annotations

import json

import pytest

from merge_of_thought import MoTTrainer
from merge_of_thought.baselines import baseline_run
from merge_of_thought.cli import main
from merge_of_thought.hub import table

from conftest import make_teacher
from helpers import quick_config, quick_lora

EVAL = dict(eval_accuracy_samples=2, eval_max_new_tokens=4, max_steps=1)


@pytest.fixture(scope="module")
def runs(qwen3_dir, tokenizer, tmp_path_factory):
    """A MoT run (2 teachers, 2 rounds, 1 step per branch) and its MTD baseline, both evaluated every round."""
    root = tmp_path_factory.mktemp("compare")
    teachers = {f"teacher{k}": make_teacher(k, n=8, seed=k) for k in range(2)}
    held_out = make_teacher(0, n=4, seed=9)
    args = quick_config(root / "mot", **EVAL)
    MoTTrainer(qwen3_dir, args=args, teachers=teachers, processing_class=tokenizer, peft_config=quick_lora(),
               eval_dataset=held_out).train()  # fmt: skip
    data, mtd = baseline_run("mtd", teachers, quick_config(root / "mtd", **EVAL))
    MoTTrainer(qwen3_dir, args=mtd, teachers=data, processing_class=tokenizer, peft_config=quick_lora(),
               eval_dataset=held_out).train()  # fmt: skip
    return root


def rounds(folder):
    return [r for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if r["type"] == "round"]


def test_one_table_of_both_runs_and_the_curves(runs, tmp_path, capsys, monkeypatch):
    before = {p: p.stat().st_mtime_ns for p in runs.rglob("*")}
    monkeypatch.chdir(tmp_path)
    assert main(["compare", str(runs / "mot"), str(runs / "mtd")]) == 0
    out = capsys.readouterr().out
    mot, mtd = rounds(runs / "mot"), rounds(runs / "mtd")
    best = {name: max(r, key=lambda x: (x["eval_accuracy"], -x["round"]))["round"]  # the first of the most accurate
            for name, r in (("mot", mot), ("mtd", mtd))}  # fmt: skip
    expected = table(
        ["run", "kind", "teachers", "SFT steps", "eval loss", "eval accuracy", "best round", "last round"],
        [["mot", "mot", "teacher0, teacher1", 4, mot[-1]["eval_loss"], mot[-1]["eval_accuracy"], best["mot"], 2],
         ["mtd", "mtd", "union of teacher0, teacher1", 4, mtd[-1]["eval_loss"], mtd[-1]["eval_accuracy"], best["mtd"],
          1]],
    )  # fmt: skip
    assert out.startswith(expected + "\n")
    assert f"Curves per round: {tmp_path / 'mot_compare.png'}, {tmp_path / 'mot_compare-accuracy.png'}\n" in out
    for png in ("mot_compare.png", "mot_compare-accuracy.png"):
        assert (tmp_path / png).read_bytes().startswith(b"\x89PNG"), png
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*")} == before  # reading wrote nothing into the runs


def test_a_folder_without_a_run_is_named_in_one_line(runs, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["compare", str(runs / "mot"), str(tmp_path)])
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        f"mot: error: {tmp_path} is not a MoT run folder (no mot_run.json): pass a `mot train` output_dir.\n"
    )
