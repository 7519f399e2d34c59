"""An outer optimizer for MoT rounds, as an experiment (the MoT-wins issue): DiLoCo's Nesterov outer step.

Every round MoTTrainer adds the branches' weighted average ``U_t = sum_k w_k dW_k`` to the student. Averaging
branches that went different ways shrinks that step (``merge_kept_norm`` ~ 0.5 for four fresh branches), and an
equal-compute MTD run makes K times more sequential steps. DiLoCo (Douillard et al., arXiv 2311.08105) treats
``-U_t`` as an outer gradient and takes an SGD step with Nesterov momentum:

    m_t = mu * m_{t-1} + U_t
    D_t = D_{t-1} + lr * (U_t + mu * m_t)

exactly, as low-rank factors (the momentum's rank grows by K*r a round, like the merged delta of fresh branches).
``lr = 1, mu = 0`` is the paper's average. DiLoCo's values are ``lr = 0.7, mu = 0.9``. This lives in benchmark code
until it wins somewhere measured; only then does it become a MoTConfig option.
"""

from __future__ import annotations

from merge_of_thought import MoTCallback
from merge_of_thought.merging import LowRankDelta, merge_round

Delta = dict[str, LowRankDelta]


class NesterovOuterStep(MoTCallback):
    """Replaces each round's plain average by DiLoCo's outer Nesterov step (after the merge, before the eval)."""

    def __init__(self, lr: float = 0.7, momentum: float = 0.9):
        self.lr, self.momentum = lr, momentum
        self.previous: Delta | None = None  # D_{t-1}, as applied
        self.velocity: Delta | None = None  # m_{t-1}

    def after_merge(self, trainer, round_idx: int, metrics: dict) -> None:
        tolerance = trainer.args.merge_tolerance
        if self.previous is None:
            update = dict(trainer.merged)
        else:  # U_t: what this round's average added
            update, _ = merge_round(None, [trainer.merged, self.previous], [1.0, -1.0], tolerance=tolerance)
        velocity = update if self.velocity is None else merge_round(
            None, [self.velocity, update], [self.momentum, 1.0], tolerance=tolerance)[0]  # fmt: skip
        step = [self.lr, self.lr * self.momentum]
        merged, reports = merge_round(self.previous, [update, velocity], step, tolerance=tolerance)
        trainer.merged = merged
        trainer.model = trainer.frozen_delta.install(trainer.model, merged)  # where the trainer keeps D_t
        self.previous, self.velocity = merged, velocity
        metrics["outer_rank"] = max(delta.rank for delta in merged.values())
