"""The low-rank merge algebra against dense recomputation."""

import pytest
import torch

from merge_of_thought.merging import LowRankDelta, concatenate, merge_round, recompress, summarize


def random_delta(out=48, inp=40, rank=4, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return LowRankDelta(torch.randn(out, rank, generator=g) * scale, torch.randn(rank, inp, generator=g))


def test_concatenate_is_the_exact_weighted_sum():
    deltas = [random_delta(seed=s) for s in range(4)]
    weights = [0.1, 0.2, 0.3, 0.4]
    expected = sum(w * d.dense() for w, d in zip(weights, deltas))
    got = concatenate(deltas, weights)
    assert got.rank == 16
    assert torch.allclose(got.dense(), expected, atol=1e-5)


def test_recompress_is_exact_at_full_rank_and_finds_the_numerical_rank():
    d = random_delta(rank=6)
    doubled = concatenate([d, d], [0.5, 0.5])  # rank-12 factors of a rank-6 matrix
    small, dropped = recompress(doubled)
    assert small.rank == 6
    assert dropped < 1e-4 * d.frobenius_norm()
    assert torch.allclose(small.dense(), d.dense(), atol=1e-4)


def test_truncation_reports_exactly_the_error_it_makes():
    d = concatenate([random_delta(seed=s) for s in range(3)])
    kept, dropped = recompress(d, max_rank=5)
    assert kept.rank == 5
    actual = (d.dense() - kept.dense()).norm().item()
    assert actual == pytest.approx(dropped, rel=1e-4)


def test_frobenius_norm_matches_dense():
    d = random_delta(rank=7)
    assert d.frobenius_norm() == pytest.approx(d.dense().norm().item(), rel=1e-5)


def test_merge_round_accumulates_rounds_exactly():
    layers = ["a", "b"]
    current = None
    dense = {name: torch.zeros(48, 40) for name in layers}
    for round_idx in range(3):
        branches = [
            {n: random_delta(seed=100 * round_idx + 10 * k + i) for i, n in enumerate(layers)} for k in range(3)
        ]
        weights = [0.5, 0.3, 0.2]
        current, reports = merge_round(current, branches, weights)
        for name in layers:
            update = sum(w * b[name].dense() for w, b in zip(weights, branches))
            dense[name] += update
            err = (current[name].dense() - dense[name]).norm() / update.norm()
            assert err < 1e-5
            assert reports[name].relative_error < 1e-5
    assert summarize(reports)["merge_rank"] == 36  # 3 rounds x 3 branches x rank 4, nothing numerically zero


def test_tolerance_drops_only_what_the_budget_allows():
    strong = random_delta(rank=4, seed=1)
    weak = random_delta(rank=4, seed=2, scale=1e-5)
    exact = concatenate([strong, weak])
    budget = 1e-3 * exact.frobenius_norm()
    kept, dropped = recompress(exact, max_dropped_norm=budget)
    assert kept.rank == 4  # the weak directions fit in the budget, the strong ones do not
    assert 0 < dropped <= budget
    assert (exact.dense() - kept.dense()).norm().item() == pytest.approx(dropped, rel=1e-3)


def test_merge_round_rejects_mismatched_input():
    with pytest.raises(ValueError, match="weights"):
        merge_round(None, [{"a": random_delta()}], [0.5, 0.5])
    with pytest.raises(ValueError, match="other layers"):
        merge_round(None, [{"a": random_delta()}, {"b": random_delta()}], [0.5, 0.5])
    with pytest.raises(ValueError, match="shapes"):
        concatenate([random_delta(out=8), random_delta(out=9)])


def test_peft_linear_combination_is_not_the_mean_of_deltas():
    """Why we do not use add_weighted_adapter(combination_type='linear'): it averages A and B separately."""
    d1, d2 = random_delta(seed=1), random_delta(seed=2)
    mean_of_deltas = 0.5 * d1.dense() + 0.5 * d2.dense()
    w = 0.5**0.5  # PEFT weights each factor by sqrt(weight)
    factor_average = (w * d1.B + w * d2.B) @ (w * d1.A + w * d2.A)
    assert (factor_average - mean_of_deltas).norm() / mean_of_deltas.norm() > 0.5
    assert torch.allclose(concatenate([d1, d2], [0.5, 0.5]).dense(), mean_of_deltas, atol=1e-5)
