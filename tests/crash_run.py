"""A small MoT run for the crash tests, importable in the test and runnable in its own process, which it can kill.

    python tests/crash_run.py MODEL_DIR OUTPUT_DIR [--kill-branch ROUND TEACHER STEP | --kill-merge ROUND] [--resume]
        [--rounds N] [--branch-state fresh|persistent]

``--kill-branch`` sends SIGKILL to the process at the end of a branch's training step; ``--kill-merge`` right after
a round's merged adapter weights are written, before the round is recorded as complete.
"""

from __future__ import annotations

import argparse
import os
import signal

import torch
from transformers import TrainerCallback

from conftest import make_teacher
from helpers import quick_trainer

torch.set_num_threads(1)  # as in the tests, so results are bit-comparable


def small_run(model_dir: str, output_dir, **config):
    """Two teachers, two rounds, three steps per branch: the run every reliability test interrupts."""
    teachers = {f"teacher{k}": make_teacher(k, n=16, seed=k) for k in range(2)}
    values = dict(num_rounds=2, max_steps=3)
    values.update(config)
    return quick_trainer(model_dir, teachers, output_dir, **values)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAtStep(TrainerCallback):
    def __init__(self, round_idx: int, teacher: str, step: int):
        self.run_name, self.step = f"round{round_idx}/{teacher}", step

    def on_step_end(self, args, state, control, **kwargs):
        if args.run_name == self.run_name and state.global_step == self.step:
            _die()


def kill_after_merged_weights(round_idx: int) -> None:
    """SIGKILL once round ``round_idx``'s merged adapter file is written, before ``round.json``."""
    import merge_of_thought.adapters as adapters

    save_merged, calls = adapters.save_merged, []

    def save_then_die(merged, folder, base_model_name_or_path):
        save_merged(merged, folder, base_model_name_or_path)
        calls.append(folder)
        if len(calls) == round_idx:
            _die()

    adapters.save_merged = save_then_die


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("output_dir")
    parser.add_argument("--kill-branch", nargs=3)
    parser.add_argument("--kill-merge", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--branch-state", default="fresh")
    options = parser.parse_args()
    trainer = small_run(options.model_dir, options.output_dir, num_rounds=options.rounds,
                        branch_state=options.branch_state)
    if options.kill_branch:
        round_idx, teacher, step = options.kill_branch
        trainer.callbacks.append(KillAtStep(int(round_idx), teacher, int(step)))
    if options.kill_merge:
        kill_after_merged_weights(options.kill_merge)
    trainer.train(resume_from_checkpoint=options.resume)


if __name__ == "__main__":
    main()
