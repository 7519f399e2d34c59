"""One process of the multi-process MoT run in test_distributed.py, started by torchrun.

    torchrun --nproc_per_node 2 tests/distributed_worker.py MODEL_DIR OUT RESULT_JSON [ROUNDS [resume [BRANCHES]]]

Process 0 writes RESULT_JSON: what every process saw (its branches, the world transformers saw, a hash of its
merged student), gathered over MoT's own process group.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch

from conftest import make_teacher
from helpers import quick_trainer


def build(model_dir: str, output_dir: str, num_rounds: int = 2, branch_state: str = "fresh"):
    """The run both test_distributed.py's single process and every torchrun process start."""
    teachers = {f"teacher{k}": make_teacher(k, seed=k) for k in range(3)}
    return quick_trainer(model_dir, teachers, output_dir, use_cpu=True, num_rounds=num_rounds,
                         branch_state=branch_state)


def merged_hash(merged) -> str:
    digest = hashlib.sha256()
    for name in sorted(merged):
        digest.update(name.encode())
        digest.update(merged[name].B.numpy().tobytes())
        digest.update(merged[name].A.numpy().tobytes())
    return digest.hexdigest()


def main(model_dir: str, output_dir: str, result_path: str, num_rounds: str = "2", resume: str = "",
         branch_state: str = "fresh") -> None:
    torch.set_num_threads(1)
    trainer = build(model_dir, output_dir, int(num_rounds), branch_state)
    trainer.train(resume_from_checkpoint=resume == "resume")
    seen = {
        "rank": trainer.dist.rank,
        "branches": trainer.dist.my_branches(len(trainer.teacher_names)),
        "transformers_world_size": trainer.args.world_size,
        "default_group_initialized": torch.distributed.is_initialized(),
        "launcher_env_visible": "WORLD_SIZE" in os.environ,
        "merged_hash": merged_hash(trainer.merged),
    }
    everyone = trainer.dist.all_gather_object(seen)
    if trainer.dist.is_main:
        with open(result_path, "w") as f:
            json.dump({"world_size": trainer.dist.world_size, "processes": everyone}, f, indent=2)


if __name__ == "__main__":
    main(*sys.argv[1:])
