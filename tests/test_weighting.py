"""teacher_weighting: each round's merge weights from the branches' own eval accuracy (weighting.py)."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset

from merge_of_thought import MoTTrainer
from merge_of_thought.demo.student import DEMO_STUDENT_DIR
from merge_of_thought.guards import BranchDivergedError
from merge_of_thought.weighting import averaging_warning, round_weights

from helpers import dense_adapter, quick_config, quick_lora
from test_reliability import PoisonBranch, max_abs_diff

MISSING_MODEL = "/nonexistent/model/that/must/not/be/loaded"


def test_round_weights():
    fixed = round_weights("fixed", ["a", "b"], [0.3, 0.7], {})
    assert fixed == [0.3, 0.7]  # the configured weights, as they are
    assert round_weights("fixed", ["a", "c"], [0.5, 0.2], {}) == pytest.approx([0.5 / 0.7, 0.2 / 0.7])  # b dropped
    records = {"a": {"eval_accuracy": 0.6}, "b": {"eval_accuracy": 0.2}, "c": {"eval_accuracy": 0.0}}
    assert round_weights("eval_accuracy", ["c", "a", "b"], [1 / 3] * 3, records) == pytest.approx([0, 0.75, 0.25])
    zeros = {t: {"eval_accuracy": 0.0} for t in "ab"}
    assert round_weights("eval_accuracy", ["a", "b"], [0.5, 0.5], zeros) == [0.5, 0.5]  # nothing scored: uniform
    with pytest.raises(RuntimeError, match=r"needs every branch's eval_accuracy.*\['b'\]"):
        round_weights("eval_accuracy", ["a", "b"], [0.5, 0.5], {"a": {"eval_accuracy": 1.0}, "b": {"eval_loss": 1}})


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(teacher_weighting="best"), "teacher_weighting must be one of"),
        (dict(teacher_weighting="eval_accuracy"), "needs eval_accuracy_samples > 0"),
        (dict(teacher_weighting="eval_accuracy", eval_accuracy_samples=4, eval_branches="loss"), "eval_branches='all'"),
        (dict(teacher_weighting="eval_accuracy", eval_accuracy_samples=4, teacher_weights={"a": 0.5, "b": 0.5}),
         "teacher_weights unset"),
    ],
)  # fmt: skip
def test_bad_weighting_settings_fail_in_the_config(config, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        quick_config(tmp_path, **config)


def test_eval_accuracy_weighting_needs_an_eval_dataset_before_the_model_is_loaded(tmp_path):
    args = quick_config(tmp_path, teacher_weighting="eval_accuracy", eval_accuracy_samples=4)
    teachers = {"a": constant_teacher("7"), "b": constant_teacher("3")}
    with pytest.raises(ValueError, match="pass an eval_dataset"):
        MoTTrainer(MISSING_MODEL, args=args, teachers=teachers, peft_config=quick_lora())
    args.teacher_weights = {"a": 0.5, "b": 0.5}  # as `mot train` sets them from a YAML's per-teacher weights
    with pytest.raises(ValueError, match="and no teacher weights"):
        MoTTrainer(MISSING_MODEL, args=args, teachers=teachers, peft_config=quick_lora(), eval_dataset=teachers["a"])


def constant_teacher(answer: str, n: int = 16) -> Dataset:
    """A teacher that answers every question with the same number: a tiny student learns it in a few steps."""
    return Dataset.from_list([{"prompt": f"Q: {k}+1=?\n", "completion": f"#### {answer}"} for k in range(n)])


def weighted_run(folder, callbacks=()) -> MoTTrainer:
    """Two teachers that always answer 7 and 3, scored on held-out questions three quarters of whose answers are 7."""
    held_out = Dataset.from_list([{"prompt": f"Q: {k}+2=?\n", "completion": f"#### {a}"} for k, a in enumerate("7737")])
    args = quick_config(folder, num_rounds=2, max_steps=40, learning_rate=3e-3, lr_scheduler_type="constant",
                        teacher_weighting="eval_accuracy", eval_accuracy_samples=4, eval_max_new_tokens=6,
                        per_device_eval_batch_size=4, merge_tolerance=0)  # fmt: skip
    teachers = {"seven": constant_teacher("7"), "three": constant_teacher("3")}
    # the demo's pre-trained student learns a constant answer in a few steps; a random one does not
    return MoTTrainer(str(DEMO_STUDENT_DIR), args=args, teachers=teachers, peft_config=quick_lora(r=16, lora_alpha=32),
                      eval_dataset=held_out, callbacks=list(callbacks))  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weighted")
    trainer = weighted_run(folder)
    trainer.train()
    return trainer, folder


def test_each_round_merges_by_the_branches_eval_accuracy(reference):
    """Each branch learns its teacher's constant, so its accuracy and its merge weight are what that teacher is
    worth on the held-out questions."""
    trainer, tmp_path = reference
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for round_idx in (1, 2):
        branches = [r for r in metrics if r["type"] == "branch" and r["round"] == round_idx]
        scores = {r["teacher"]: r["eval_accuracy"] for r in branches}
        weights = next(r for r in metrics if r["type"] == "round" and r["round"] == round_idx)["merge_weights"]
        assert weights == pytest.approx({t: s / sum(scores.values()) for t, s in scores.items()})
        recorded = json.loads((tmp_path / f"round-{round_idx:03d}" / "round.json").read_text())["teachers"]
        assert {t: info["weight"] for t, info in recorded.items()} == pytest.approx(weights)
    assert scores == {"seven": 0.75, "three": 0.25}  # each branch learnt its teacher's answer

    # the merge used those weights: round 2's update is their weighted average of its branches
    before, after = (dense_adapter(tmp_path / f"round-{r:03d}" / "merged") for r in (1, 2))
    branches = {t: dense_adapter(tmp_path / "round-002" / f"branch-{t}") for t in ("seven", "three")}
    for name, delta in after.items():
        expected = before[name] + 0.75 * branches["seven"][name] + 0.25 * branches["three"][name]
        assert (delta - expected).norm() <= 1e-5 * expected.norm()

    trainer.save_adapter(tmp_path / "adapter")
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "each round, by the branch's eval_accuracy" in card and "seven 0.75, three 0.25" in card
    assert json.loads((tmp_path / "mot_run.json").read_text())["teacher_weighting"] == "eval_accuracy"


def test_a_resumed_round_merges_with_the_scores_of_the_branches_it_reuses(reference, tmp_path):
    """Stopped in round 2 after its first branch, the run resumes with that branch's score read from its folder
    (mot_branch.json) and ends at the uninterrupted run's student."""
    trainer = weighted_run(tmp_path, callbacks=[PoisonBranch(2, "three", step=1)])
    with pytest.raises(BranchDivergedError):
        trainer.train()
    record = json.loads((tmp_path / "round-002" / "branch-seven" / "mot_branch.json").read_text())
    assert record["eval_accuracy"] == 0.75
    assert not (tmp_path / "round-002" / "branch-three" / "adapter_model.safetensors").exists()
    weighted_run(tmp_path).train(resume_from_checkpoint=True)
    assert max_abs_diff(reference[1], tmp_path) <= 1e-6


def test_a_merged_student_clearly_below_its_best_branch_is_warned_about():
    warning = averaging_warning(3, 0.2, {"a": 0.8, "b": 0.3}, 50)
    assert warning.startswith("Round 3: the merged student scored 0.200, below its best branch (teacher 'a', 0.800)")
    assert "teacher_weighting='eval_accuracy'" in warning
    assert averaging_warning(3, 0.7, {"a": 0.8}, 50) is None  # within two standard errors of 50 samples
    assert averaging_warning(3, 0.25, {"a": 0.5}, 4) is None  # 4 samples cannot tell 0.5 from 0.25
    assert averaging_warning(3, None, {"a": 0.8}, 50) is None and averaging_warning(3, 0.1, {}, 50) is None


def test_the_round_records_carry_the_warning_where_the_rule_says(reference):
    _, tmp_path = reference
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for round_idx in (1, 2):
        branches = [r for r in metrics if r["type"] == "branch" and r["round"] == round_idx]
        scores = {r["teacher"]: r["eval_accuracy"] for r in branches}
        record = next(r for r in metrics if r["type"] == "round" and r["round"] == round_idx)
        assert record.get("averaging_warning") == averaging_warning(round_idx, record["eval_accuracy"], scores, 4)


def test_the_model_card_carries_a_rounds_averaging_warning(reference, tmp_path):
    import shutil

    from merge_of_thought.cli import main

    run = tmp_path / "run"
    shutil.copytree(reference[1], run, ignore=shutil.ignore_patterns("adapter"))
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    warning = averaging_warning(2, 0.1, {"seven": 0.9}, 50)  # as a round whose teachers did not average writes it
    for line in lines:
        if line["type"] == "round" and line["round"] == 2:
            line["averaging_warning"] = warning
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["export", str(run), "--adapter", str(tmp_path / "a"), "--base-model", "org/tiny"]) == 0
    assert f"**Warning.** {warning}" in (tmp_path / "a" / "README.md").read_text()
