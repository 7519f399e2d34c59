"""Branch state across rounds: a fresh LoRA branch every round (the paper), or one that persists.

``branch_state="fresh"``: every round each teacher's branch starts a new adapter (B = 0, new A) and a new optimizer,
so every round pays LoRA's restart cost again.

``branch_state="persistent"``: branch k keeps its LoRA factors ``P_k = B_k A_k`` and its optimizer state from
round to round. It is re-based onto the student by a frozen offset: in round t it trains on top of
``D_t - P_k^{t-1}`` (in the frozen merged adapter), so its effective weights start exactly at the student
``base + D_t``. Its update this round is ``P_k^t - P_k^{t-1}``, and the merge

    D_{t+1} = D_t + s * sum_k w_k (P_k^t - P_k^{t-1})

telescopes for a constant outer step ``s`` to ``D_t = s * sum_k w_k P_k^t``: the exact merged delta stays at rank
K*r. With one teacher and ``s = 1`` the student after every round is the branch itself, trained without restarts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from transformers import TrainerCallback

from .adapters import read_adapter_weights
from .merging import LowRankDelta, concatenate

BRANCH_STATES = ("fresh", "persistent")
OPTIMIZER_FILE = "optimizer.pt"


@dataclass
class BranchState:
    """Where a persistent branch of this process stopped: its LoRA factors (PEFT's saved keys) and optimizer state."""

    factors: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None

    @classmethod
    def read(cls, adapter_dir: Path, optimizer_dir: Path) -> BranchState:
        """A branch's state from disk: its saved adapter and the optimizer state saved beside it (if any)."""
        optimizer = optimizer_dir / OPTIMIZER_FILE
        state = torch.load(optimizer, map_location="cpu", weights_only=True) if optimizer.exists() else None
        return cls(read_adapter_weights(adapter_dir), state)


def negated(deltas: Mapping[str, LowRankDelta]) -> dict[str, LowRankDelta]:
    return {name: d.scaled(-1.0) for name, d in deltas.items()}


def rebased_offset(
    merged: Mapping[str, LowRankDelta] | None, start: Mapping[str, LowRankDelta] | None
) -> dict[str, LowRankDelta] | None:
    """The frozen delta a branch trains above: ``D_t - P_k^{t-1}`` (exact, as concatenated factors)."""
    if start is None:
        return dict(merged) if merged is not None else None
    offset = negated(start)
    if merged is None:
        return offset
    return {name: concatenate([merged[name], offset[name]]) if name in merged else offset[name] for name in offset}


def round_update(
    end: Mapping[str, LowRankDelta], start: Mapping[str, LowRankDelta] | None
) -> dict[str, LowRankDelta]:
    """What a branch changed in this round: ``P_k^t - P_k^{t-1}`` (its whole product for a fresh branch)."""
    if start is None:
        return dict(end)
    back = negated(start)
    return {name: concatenate([end[name], back[name]]) for name in end}


def load_factors(model: PeftModel, adapter_name: str, state: BranchState) -> None:
    """Put a persistent branch's factors into a freshly added adapter of the same shape."""
    result = set_peft_model_state_dict(model, state.factors, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise RuntimeError(f"the saved branch does not fit the model's adapter: {unexpected[:3]} ...")


class CarryOptimizerState(TrainerCallback):
    """Loads a persistent branch's optimizer state (moments and step counts) when its trainer starts.

    Only the per-parameter state is carried; learning rate and schedule come from this round's trainer.
    """

    def __init__(self, state: dict[str, Any] | None):
        self.state = state

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.state is None or optimizer is None:
            return
        current = optimizer.state_dict()
        optimizer.load_state_dict({"state": self.state["state"], "param_groups": current["param_groups"]})


def optimizer_state(optimizer: torch.optim.Optimizer | None) -> dict[str, Any] | None:
    """An optimizer's per-parameter state on the CPU (what :class:`CarryOptimizerState` loads again)."""
    if optimizer is None:
        return None
    state = optimizer.state_dict()
    cpu = {
        index: {key: value.detach().cpu().clone() if torch.is_tensor(value) else value for key, value in s.items()}
        for index, s in state["state"].items()
    }
    return {"state": cpu, "param_groups": state["param_groups"]}
