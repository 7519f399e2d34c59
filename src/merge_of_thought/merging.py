"""Exact weighted merging of LoRA deltas held as fp32 low-rank factors.

A LoRA branch changes a linear weight by ``dW = B @ A * scaling``. MoT needs ``D_{t+1} = D_t + sum_k w_k dW_k``
for every adapted layer. Summing low-rank products is exact when the factors are concatenated:

    sum_i B_i @ A_i = [B_1 | ... | B_n] @ [A_1; ...; A_n]

That product has rank up to ``sum_i r_i``. :func:`recompress` brings it back to its numerical rank (or to a rank
budget) through a QR of each factor stack and an SVD of the small core, so the full ``out x in`` matrix is never
formed, and it reports the Frobenius error of what it dropped, which is exact for a truncated SVD.

A merge adds a round's K*r new columns to factors that are an SVD already (recompress leaves ``B = U sqrt(s)`` and
``A = sqrt(s) V^T``), so :func:`add` orthogonalises only the new columns against them (Brand's incremental SVD)
instead of factoring the whole stack again. Its last step, the SVD of a core as large as the merged rank, still
grows with that rank; with fresh branches :func:`merge_round` skips it (``append``): each round's update is
recompressed alone and appended, so a merge costs the same in round 5 as in round 1, and :func:`difference` gives the
weights that hold ``D_t`` only the appended columns to add.

Everything here works on plain tensors, so it is shared by the trainer, the adapter export and ``mot merge``.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
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
    return _truncated_svd(q_b, r_b @ r_a.T, q_a, max_rank, max_dropped_norm)


@torch.no_grad()
def add(
    current: LowRankDelta,
    update: LowRankDelta,
    max_rank: int | None = None,
    max_dropped_norm: float = 0.0,
    dtype: torch.dtype = torch.float64,
) -> tuple[LowRankDelta, float]:
    """``current + update`` recompressed: the result of ``recompress(concatenate([current, update]), ...)``.

    Where ``current``'s factors are an SVD already (B's columns and A's rows orthogonal, as :func:`recompress`
    leaves them), only ``update``'s columns are projected out of them and factored; a side whose columns are not
    orthogonal (an adapter written elsewhere) or has no room left is factored whole, as :func:`recompress` does.
    ``dtype`` is the precision of the projections: float32 put the merged delta 6x further from the full
    recompression's after five rounds at SmolLM2's shapes (2.7e-6 against 4.6e-7; merge_rounds.md).
    """
    old_b, old_a = current.B.to(dtype), current.A.to(dtype).T
    live = old_b.any(dim=0) & old_a.any(dim=0)  # not the zero columns of rank-0 layers or a saved adapter's padding
    w_b, m_b = _orthonormal_basis(old_b[:, live], update.B.to(dtype))
    w_a, m_a = _orthonormal_basis(old_a[:, live], update.A.to(dtype).T)
    return _truncated_svd(w_b, m_b @ m_a.T, w_a, max_rank, max_dropped_norm)


@torch.no_grad()
def from_dense(
    delta: torch.Tensor, max_rank: int | None = None, max_dropped_norm: float = 0.0
) -> tuple[LowRankDelta, float]:
    """A full ``out x in`` delta (e.g. a TIES merge) as low-rank factors through its SVD, like :func:`recompress`."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    rank, dropped = _kept_rank(s, max_rank, max_dropped_norm)
    return _balanced(u[:, :rank], s[:rank], vh[:rank]), dropped


def full_rank(delta: LowRankDelta) -> LowRankDelta:
    """``delta`` exactly, as the factor pair of a layer whose rank is its smaller dimension: the identity on that
    side and the dense product on the other. Adding to it is a sum of products; an SVD would have nothing to drop."""
    rows, columns = delta.shape
    if rows <= columns:
        return LowRankDelta(torch.eye(rows, device=delta.B.device), delta.dense())
    return LowRankDelta(delta.dense(), torch.eye(columns, device=delta.A.device))


ORTHOGONALITY_TOLERANCE = 1e-5
"""How far from orthonormal (``|Q^T Q - I|_F``, estimated) columns may be and still count as an SVD's: the fp32
factors :func:`recompress` and :func:`add` write are within ~5e-8 * rank / sqrt(rows) (2e-7 to 5e-7 at SmolLM2's
shapes); a LoRA branch's are ~1e-1. Closeness only decides the basis: the merged product is exact either way."""


def _orthonormal_basis(old: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal ``W`` and a square ``M`` with ``[old | new] = W @ M`` (float64).

    With ``old``'s columns orthogonal, ``W`` is them normalised plus an orthonormal basis of what ``new`` adds:
    ``new`` projected out of them twice (classical Gram-Schmidt with reorthogonalisation, which keeps ``W``
    orthonormal when ``new`` nearly lies in their span) and the residual's QR. Otherwise a QR of the whole stack.
    """
    (n, k), m = old.shape, new.shape[1]
    norms = old.norm(dim=0)
    U = old / norms
    if k + m > n or not _is_orthonormal(U):
        return torch.linalg.qr(torch.cat([old, new], dim=1))
    coefficients = U.T @ new
    residual = new - U @ coefficients
    again = U.T @ residual
    residual -= U @ again
    q, r = torch.linalg.qr(residual)
    M = torch.zeros(k + m, k + m, dtype=old.dtype)
    M[:k, :k] = torch.diag(norms)
    M[:k, k:] = coefficients + again
    M[k:, k:] = r
    return torch.cat([U, q], dim=1), M


def _is_orthonormal(Q: torch.Tensor, probes: int = 4) -> bool:
    """Whether ``Q^T Q`` is the identity within :data:`ORTHOGONALITY_TOLERANCE`, from a few random probes:
    ``|(Q^T Q - I) x|`` over Gaussian ``x`` estimates the Frobenius norm at the cost of a product, not a Gram."""
    x = torch.randn(Q.shape[1], probes, generator=torch.Generator().manual_seed(0), dtype=Q.dtype)
    error = (Q.T @ (Q @ x) - x).norm() / probes**0.5
    return bool(error <= ORTHOGONALITY_TOLERANCE)


def _truncated_svd(
    left: torch.Tensor, core: torch.Tensor, right: torch.Tensor, max_rank: int | None, max_dropped_norm: float
) -> tuple[LowRankDelta, float]:
    """``left @ core @ right^T`` (``left``, ``right`` orthonormal) through the SVD of the small core, cut to the fewest
    directions whose dropped norm fits the budget; only the kept columns are rotated into the big factors."""
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    rank, dropped = _kept_rank(s, max_rank, max_dropped_norm)
    return _balanced(left @ u[:, :rank], s[:rank], vh[:rank] @ right.T), dropped


def _kept_rank(s: torch.Tensor, max_rank: int | None, max_dropped_norm: float) -> tuple[int, float]:
    """How many of the singular values ``s`` (descending) to keep: the fewest whose dropped norm fits the budget
    (and ``max_rank``), never 0; and the norm dropped, exact (root sum of squares)."""
    tail = (s.flip(0) ** 2).cumsum(0).flip(0).sqrt()  # tail[k] = |s[k:]|, the error of keeping k directions
    tail = torch.cat([tail, tail.new_zeros(1)])
    numerically_zero = 1e-12 * s[0].item() if s.numel() else 0.0
    keep = int((tail > max(max_dropped_norm, numerically_zero)).sum().item())
    if max_rank is not None:
        keep = min(keep, max_rank)
    keep = max(keep, 1)  # a rank-0 adapter cannot be expressed in PEFT; a zero column is harmless
    return keep, float(tail[keep])


def _balanced(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> LowRankDelta:
    """``u diag(s) vh`` as fp32 factors with ``sqrt(s)`` on each side (what :func:`add` recognises as an SVD)."""
    root_s = s.sqrt()
    return LowRankDelta((u * root_s).float().contiguous(), (root_s[:, None] * vh).float().contiguous())


@torch.no_grad()
def merge_round(
    current: Mapping[str, LowRankDelta] | None,
    branches: Sequence[Mapping[str, LowRankDelta]],
    weights: Sequence[float],
    max_rank: int | None = None,
    tolerance: float = 0.0,
    append: bool = False,
    workers: int = 1,
) -> tuple[dict[str, LowRankDelta], dict[str, MergeReport]]:
    """One MoT merge: ``D_{t+1} = D_t + sum_k w_k dW_k`` for every layer, recompressed.

    ``current`` is ``D_t`` (``None`` before the first merge), ``branches`` the per-teacher deltas of this round.
    Recompression may drop at most ``tolerance * |sum_k w_k dW_k|_F`` per layer (and must fit ``max_rank``).

    ``append`` recompresses only the round's update and appends it to ``D_t``'s factors, leaving them as they are:
    the same product, at a cost that does not grow with the merged rank. The merged rank is then the sum of the
    rounds' ranks, which is the numerical rank when each round adds new directions (fresh branches: their ranks
    were 64, 128, ... 320 either way at T=5, K=4, r=16), but not when rounds undo each other (persistent branches'
    updates, :func:`merge_of_thought.branches.round_update`), and it cannot honour a rank budget. A layer whose
    rank would reach its smaller dimension (SmolLM2's 192-row k and v projections from round 3) is held whole
    instead (:func:`full_rank`): exact, its rank never exceeds what the layer can hold, and no factorization at all.

    ``workers`` merges that many layers at a time, one torch thread each (:func:`_one_thread_per_layer`); reads of
    ``current`` stay one at a time, so it may be a view that reads layers from a file (``SavedDelta``).
    """
    if len(branches) != len(weights):
        raise ValueError(f"got {len(branches)} branches but {len(weights)} weights")
    if append and max_rank is not None:
        raise ValueError("append=True keeps every earlier direction: it cannot cut the merged delta to max_rank")
    layers = list(branches[0])
    for i, branch in enumerate(branches[1:], start=1):
        if set(branch) != set(layers):
            raise ValueError(f"branch {i} adapts other layers than branch 0")
    reading = threading.Lock()

    def merge_layer(name: str) -> tuple[LowRankDelta, MergeReport]:
        update = concatenate([b[name] for b in branches], weights)
        update_norm = update.frobenius_norm()
        budget = tolerance * update_norm
        with reading:
            previous = current[name] if current is not None and name in current else None
        if previous is None:
            rank_before = update.rank
            layer, dropped = recompress(update, max_rank, budget)
        else:
            rank_before = previous.rank + update.rank
            if append and rank_before < min(previous.shape):
                block, dropped = recompress(update, None, budget)
                layer = concatenate([previous, block])
            elif append:  # as many directions as the layer has: its dense sum, with nothing to factor or drop
                layer, dropped = full_rank(concatenate([previous, update])), 0.0
            else:
                layer, dropped = add(previous, update, max_rank, budget)
        return layer, MergeReport(rank_before, layer.rank, dropped, update_norm)

    if workers > 1:
        with _one_thread_per_layer(workers) as pool:
            results = list(pool.map(merge_layer, layers))
    else:
        results = [merge_layer(name) for name in layers]
    merged = {name: layer for name, (layer, _) in zip(layers, results)}
    return merged, {name: report for name, (_, report) in zip(layers, results)}


@contextlib.contextmanager
def _one_thread_per_layer(workers: int) -> Iterator[ThreadPoolExecutor]:
    """A pool of ``workers`` threads with torch's intra-op threads at 1 for the block: a layer's factorizations are
    too small to split (a round's 300 float64 QRs at SmolLM2's shapes took 0.23 s on two torch threads, 0.17 s on
    one, and 0.09 s as two layers at a time on one thread each)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="mot-merge") as pool:
            yield pool
    finally:
        torch.set_num_threads(before)


def difference(new: LowRankDelta, old: LowRankDelta) -> LowRankDelta:
    """``new - old`` as one factor pair: only ``new``'s extra columns where ``new`` is ``old`` with columns appended
    (an ``append`` merge), else ``old`` negated beside ``new``. The first is exact, not a rounding of the second."""
    k = old.rank
    if new.rank > k and torch.equal(new.B[:, :k], old.B) and torch.equal(new.A[:k], old.A):
        return LowRankDelta(new.B[:, k:], new.A[k:])
    return concatenate([new, old.scaled(-1.0)])


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
