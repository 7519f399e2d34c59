"""Exact weighted merging of LoRA deltas held as fp32 low-rank factors.

A LoRA branch changes a linear weight by ``dW = B @ A * scaling``. MoT needs ``D_{t+1} = D_t + sum_k w_k dW_k``
for every adapted layer. Summing low-rank products is exact when the factors are concatenated:

    sum_i B_i @ A_i = [B_1 | ... | B_n] @ [A_1; ...; A_n]

That product has rank up to ``sum_i r_i``. :func:`recompress` brings it back to its numerical rank (or to a rank
budget) through a QR of each factor stack and an SVD of the small core, so the full ``out x in`` matrix is never
formed, and it reports the Frobenius error of what it dropped, which is exact for a truncated SVD.

Everything here works on plain tensors, so it is shared by the trainer, the adapter export and ``mot merge``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass
class LowRankDelta:
    """A weight delta ``B @ A`` in fp32; ``B`` is ``(out, r)`` and ``A`` is ``(r, in)``; scaling is folded in."""

    B: torch.Tensor
    A: torch.Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.B.shape[0], self.A.shape[1]

    def dense(self) -> torch.Tensor:
        """The full ``out x in`` delta (for tests and small layers only)."""
        return self.B @ self.A

    def frobenius_norm(self) -> float:
        """``|B @ A|_F`` computed from the ``r x r`` Gram matrices, without forming the product."""
        gram = (self.B.T @ self.B) * (self.A @ self.A.T)
        return math.sqrt(max(gram.sum().item(), 0.0))

    def scaled(self, weight: float) -> LowRankDelta:
        return LowRankDelta(self.B * weight, self.A)


@dataclass
class MergeReport:
    """What a merge did to one layer: the rank before and after recompression and the error of the truncation."""

    rank_before: int
    rank_after: int
    dropped_norm: float  # |exact - kept|_F
    delta_norm: float  # |sum_k w_k dW_k|_F, the part of the update merged this round

    @property
    def relative_error(self) -> float:
        """Truncation error relative to this round's update (the figure the 1e-3 fidelity bound is stated in)."""
        return self.dropped_norm / self.delta_norm if self.delta_norm > 0 else 0.0


def concatenate(deltas: Sequence[LowRankDelta], weights: Sequence[float] | None = None) -> LowRankDelta:
    """Exactly ``sum_i w_i B_i @ A_i`` as one factor pair of rank ``sum_i r_i``."""
    if not deltas:
        raise ValueError("concatenate() needs at least one delta")
    weights = [1.0] * len(deltas) if weights is None else list(weights)
    if len(weights) != len(deltas):
        raise ValueError(f"got {len(deltas)} deltas but {len(weights)} weights")
    shapes = {d.shape for d in deltas}
    if len(shapes) != 1:
        raise ValueError(f"cannot sum deltas of different shapes: {sorted(shapes)}")
    B = torch.cat([d.B.float() * w for d, w in zip(deltas, weights)], dim=1)
    A = torch.cat([d.A.float() for d in deltas], dim=0)
    return LowRankDelta(B, A)


@torch.no_grad()
def recompress(
    delta: LowRankDelta, max_rank: int | None = None, max_dropped_norm: float = 0.0
) -> tuple[LowRankDelta, float]:
    """Rewrite ``B @ A`` with balanced factors of the smallest rank whose dropped part is within budget.

    Keeps the fewest singular directions such that the Frobenius norm of what is dropped is at most
    ``max_dropped_norm`` (0 keeps every non-zero direction), and at most ``max_rank`` directions. Returns the new
    delta and the norm actually dropped: exact, the root sum of squares of the dropped singular values.
    """
    B, A = delta.B.double(), delta.A.double()  # float64 for the small factorizations: cheap and removes doubt
    q_b, r_b = torch.linalg.qr(B)  # B = Qb Rb,  Qb: (out, k)
    q_a, r_a = torch.linalg.qr(A.T)  # A^T = Qa Ra, Qa: (in, k)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)  # core: (k, k)
    return _truncated(q_b @ u, s, vh @ q_a.T, max_rank, max_dropped_norm)


@torch.no_grad()
def from_dense(
    delta: torch.Tensor, max_rank: int | None = None, max_dropped_norm: float = 0.0
) -> tuple[LowRankDelta, float]:
    """A full ``out x in`` delta (e.g. a TIES merge) as low-rank factors through its SVD, like :func:`recompress`."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return _truncated(u, s, vh, max_rank, max_dropped_norm)


def _truncated(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, max_rank: int | None, max_dropped_norm: float
) -> tuple[LowRankDelta, float]:
    """``u diag(s) vh`` cut to the fewest directions whose dropped norm fits the budget (and ``max_rank``).

    Factors are balanced as ``sqrt(s)`` on each side; the dropped norm is exact (root sum of squares).
    """
    tail = (s.flip(0) ** 2).cumsum(0).flip(0).sqrt()  # tail[k] = |s[k:]|, the error of keeping k directions
    tail = torch.cat([tail, tail.new_zeros(1)])
    numerically_zero = 1e-12 * s[0].item() if s.numel() else 0.0
    keep = int((tail > max(max_dropped_norm, numerically_zero)).sum().item())
    if max_rank is not None:
        keep = min(keep, max_rank)
    keep = max(keep, 1)  # a rank-0 adapter cannot be expressed in PEFT; a zero column is harmless
    dropped = float(tail[keep])
    root_s = s[:keep].sqrt()
    new_B = u[:, :keep] * root_s
    new_A = root_s[:, None] * vh[:keep]
    return LowRankDelta(new_B.float().contiguous(), new_A.float().contiguous()), dropped


@torch.no_grad()
def merge_round(
    current: Mapping[str, LowRankDelta] | None,
    branches: Sequence[Mapping[str, LowRankDelta]],
    weights: Sequence[float],
    max_rank: int | None = None,
    tolerance: float = 0.0,
) -> tuple[dict[str, LowRankDelta], dict[str, MergeReport]]:
    """One MoT merge: ``D_{t+1} = D_t + sum_k w_k dW_k`` for every layer, recompressed.

    ``current`` is ``D_t`` (``None`` before the first merge), ``branches`` the per-teacher deltas of this round.
    Recompression may drop at most ``tolerance * |sum_k w_k dW_k|_F`` per layer (and must fit ``max_rank``).
    """
    if len(branches) != len(weights):
        raise ValueError(f"got {len(branches)} branches but {len(weights)} weights")
    layers = list(branches[0])
    for i, branch in enumerate(branches[1:], start=1):
        if set(branch) != set(layers):
            raise ValueError(f"branch {i} adapts other layers than branch 0")
    merged: dict[str, LowRankDelta] = {}
    reports: dict[str, MergeReport] = {}
    for name in layers:
        update = concatenate([b[name] for b in branches], weights)
        parts = [update] if current is None or name not in current else [current[name], update]
        exact, update_norm = concatenate(parts), update.frobenius_norm()
        merged[name], dropped = recompress(exact, max_rank, max_dropped_norm=tolerance * update_norm)
        reports[name] = MergeReport(exact.rank, merged[name].rank, dropped, update_norm)
    return merged, reports


def summarize(reports: Mapping[str, MergeReport]) -> dict[str, float]:
    """Totals over layers for logging: worst and overall relative error, and the largest kept rank."""
    dropped = math.sqrt(sum(r.dropped_norm**2 for r in reports.values()))
    total = math.sqrt(sum(r.delta_norm**2 for r in reports.values()))
    return {
        "merge_rank": max((r.rank_after for r in reports.values()), default=0),
        "merge_rel_error_max": max((r.relative_error for r in reports.values()), default=0.0),
        "merge_rel_error_total": dropped / total if total > 0 else 0.0,
        "update_norm": total,
    }


def kept_norm(branches: Sequence[Mapping[str, LowRankDelta]], weights: Sequence[float]) -> float:
    """How much of the branch updates' norm their weighted average keeps: ``|sum_k w_k u_k| / sum_k w_k |u_k|``
    over all layers (Frobenius). 1 when the branches agree; ``1/sqrt(K)`` for K orthogonal updates of equal norm."""
    kept = spent = 0.0
    for name in branches[0]:
        kept += concatenate([b[name] for b in branches], weights).frobenius_norm() ** 2
        spent += sum(w * b[name].frobenius_norm() for b, w in zip(branches, weights)) ** 2
    return math.sqrt(kept / spent) if spent > 0 else 1.0
