"""The low-rank merge algebra against dense recomputation."""

import time

import pytest
import torch

from merge_of_thought.merging import LowRankDelta, concatenate, difference, merge_round, recompress, summarize


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


def full_merge(current, branches, weights, max_rank=None, tolerance=0.0):
    """What merge_round computed before it merged incrementally: each layer's whole factor stack recompressed."""
    merged, dropped = {}, {}
    for name in branches[0]:
        update = concatenate([b[name] for b in branches], weights)
        exact = concatenate([current[name], update]) if current is not None else update
        merged[name], dropped[name] = recompress(exact, max_rank, tolerance * update.frobenius_norm())
    return merged, dropped


def realistic_branches(round_idx, teachers=4, rank=8, shapes=((96, 64), (32, 64))):
    """Branches that share most of their directions with each other and with earlier rounds, with decaying spectra
    (as trained LoRA branches do), so the merged rank stays below the sum of the branch ranks."""
    shared = torch.Generator().manual_seed(7)
    common = {shape: (torch.randn(shape[0], rank, generator=shared), torch.randn(rank, shape[1], generator=shared))
              for shape in shapes}
    branches = []
    for k in range(teachers):
        g = torch.Generator().manual_seed(1000 * round_idx + k)
        branch = {}
        for i, (out, inp) in enumerate(shapes):
            B0, A0 = common[(out, inp)]
            spectrum = torch.logspace(0, -4, rank)
            B = (B0 + 0.3 * torch.randn(out, rank, generator=g)) * spectrum
            branch[f"layer{i}"] = LowRankDelta(B * 1e-3, A0 + 0.3 * torch.randn(rank, inp, generator=g))
        branches.append(branch)
    return branches


def random_branches(round_idx, teachers=4, rank=8, shapes=((96, 64), (32, 64))):
    return [{f"layer{i}": random_delta(out, inp, rank, seed=100 * round_idx + 10 * k + i, scale=1e-3)
             for i, (out, inp) in enumerate(shapes)} for k in range(teachers)]


@pytest.mark.parametrize("make_branches", [random_branches, realistic_branches])
@pytest.mark.parametrize("max_rank,tolerance", [(None, 0.0), (None, 1e-4), (40, 1e-4)])
def test_incremental_merge_matches_the_full_recompression_over_five_rounds(make_branches, max_rank, tolerance):
    # the (32, 64) layer runs out of room on its B side in round 2 (rank 32 + 32 new columns): factored whole there
    ours = reference = None
    weights = [0.4, 0.3, 0.2, 0.1]
    for round_idx in range(5):
        branches = make_branches(round_idx)
        ours, reports = merge_round(ours, branches, weights, max_rank, tolerance)
        reference, reference_dropped = full_merge(reference, branches, weights, max_rank, tolerance)
        for name, exact in reference.items():
            assert reports[name].rank_after == exact.rank
            assert ours[name].rank == exact.rank
            dense = exact.dense().double()
            assert (ours[name].dense().double() - dense).norm() <= 1e-6 * dense.norm()
            expected = pytest.approx(reference_dropped[name], rel=1e-4, abs=1e-9 * dense.norm())
            assert reports[name].dropped_norm == expected


def count_qr_columns(monkeypatch) -> list[int]:
    """The column count of every QR merging.py factors (to see which stacks a merge factors whole)."""
    columns, qr = [], torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda x, *a, **k: columns.append(x.shape[1]) or qr(x, *a, **k))
    return columns


def test_a_merge_onto_recompressed_factors_factors_only_the_new_columns(monkeypatch):
    weights = [0.25] * 4
    merged, _ = merge_round(None, random_branches(0), weights)
    assert merged["layer0"].rank == 32
    columns = count_qr_columns(monkeypatch)
    merge_round(merged, random_branches(1), weights)
    assert columns == [32, 32, 64, 32]  # layer0: the 32 new columns per side; layer1 (32 x 64): its B side is full


def test_an_append_merge_factors_only_the_round_and_keeps_the_full_merges_product_and_rank(monkeypatch):
    """Fresh branches (merge_round(append=True)): each round's update is recompressed alone, so every round factors
    the same 32 columns per side however large the merged rank; the product and rank match the full recompression."""
    ours = reference = None
    weights = [0.4, 0.3, 0.2, 0.1]
    columns = count_qr_columns(monkeypatch)
    for round_idx in range(5):
        branches = random_branches(round_idx, shapes=((256, 320),))
        columns.clear()
        ours, reports = merge_round(ours, branches, weights, tolerance=1e-4, append=True)
        assert columns == [32, 32], round_idx  # the update's columns only, in round 5 as in round 1
        reference, _ = full_merge(reference, branches, weights, tolerance=1e-4)
        exact = reference["layer0"].dense().double()
        assert ours["layer0"].rank == reference["layer0"].rank == 32 * (round_idx + 1)
        assert (ours["layer0"].dense().double() - exact).norm() <= 1e-6 * exact.norm()
        assert reports["layer0"].rank_before == 32 * (round_idx + 1) and reports["layer0"].dropped_norm == 0.0
    with pytest.raises(ValueError, match="max_rank"):
        merge_round(ours, random_branches(5, shapes=((256, 320),)), weights, max_rank=40, append=True)


def test_an_append_merge_holds_a_layer_with_no_room_left_whole_and_exact(monkeypatch):
    """A layer whose rank would reach its smaller dimension (32 rows: full after one round of 4 x 8 columns) is held
    as the identity and its dense sum: no QR or SVD, nothing dropped, the exact product at the layer's full rank."""
    weights, exact, merged = [0.4, 0.3, 0.2, 0.1], 0, None
    columns = count_qr_columns(monkeypatch)
    for round_idx in range(3):
        branches = random_branches(round_idx, shapes=((32, 64), (96, 80)))
        columns.clear()
        merged, reports = merge_round(merged, branches, weights, tolerance=1e-4, append=True)
        exact = exact + sum(w * b["layer0"].dense().double() for b, w in zip(branches, weights))
        delta = merged["layer0"]
        assert (delta.dense().double() - exact).norm() <= 1e-6 * exact.norm(), round_idx
        if round_idx:
            assert torch.equal(delta.B, torch.eye(32)) and delta.rank == 32 and reports["layer0"].dropped_norm == 0
            assert columns == ([32, 32] if round_idx == 1 else [])  # layer1 (80 columns): appended, then full
            assert torch.equal(merged["layer1"].A, torch.eye(80)) == (round_idx == 2)


class OneReadAtATime(dict):
    """A merged delta that records how many reads overlap (a SavedDelta's open file takes one at a time)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.reading, self.most = 0, 0

    def __getitem__(self, name):
        self.reading += 1
        self.most = max(self.most, self.reading)
        time.sleep(0.01)  # long enough for another worker's read to overlap, were reads not kept apart
        self.reading -= 1
        return super().__getitem__(name)


def test_a_merge_on_two_workers_is_the_one_thread_merge_reading_one_layer_at_a_time():
    shapes = ((96, 64), (32, 64), (64, 80), (40, 72))
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the intra-op threads a worker runs with: the same arithmetic, bit for bit
    try:
        first, _ = merge_round(None, random_branches(0, shapes=shapes), [0.25] * 4)
        alone, alone_reports = merge_round(first, random_branches(1, shapes=shapes), [0.25] * 4, append=True)
    finally:
        torch.set_num_threads(before)
    current = OneReadAtATime(first)
    pooled, pooled_reports = merge_round(current, random_branches(1, shapes=shapes), [0.25] * 4, append=True,
                                         workers=2)
    assert current.most == 1 and torch.get_num_threads() == before
    assert list(pooled) == list(alone) and pooled_reports == alone_reports
    assert all(torch.equal(pooled[n].B, alone[n].B) and torch.equal(pooled[n].A, alone[n].A) for n in alone)


SHAPE = ((160, 192),)  # room for every round's 32 columns


def test_difference_is_the_appended_columns_after_an_append_and_new_minus_old_otherwise():
    weights = [0.25] * 4
    first, _ = merge_round(None, random_branches(0, shapes=SHAPE), weights)
    second, _ = merge_round(first, random_branches(1, shapes=SHAPE), weights, append=True)
    change = difference(second["layer0"], first["layer0"])
    assert change.rank == 32  # the round's columns, not the 64 + 32 of new and negated old
    assert torch.equal(change.B, second["layer0"].B[:, 32:]) and torch.equal(change.A, second["layer0"].A[32:])
    refactored, _ = merge_round(first, random_branches(1, shapes=SHAPE), weights)  # the whole SVD: no shared columns
    change = difference(refactored["layer0"], first["layer0"])
    assert change.rank == 64 + 32
    exact = refactored["layer0"].dense() - first["layer0"].dense()
    assert (change.dense() - exact).norm() <= 1e-5 * exact.norm()


def test_factors_that_are_not_an_svd_are_recompressed_whole(monkeypatch):
    """An adapter written elsewhere (a plain LoRA's B and A) is not mistaken for an SVD: a rank budget then still
    keeps the best directions and reports the error it makes."""
    current = {"layer0": random_delta(96, 64, rank=24, seed=5, scale=1e-3)}
    branches = [{"layer0": random_delta(96, 64, rank=8, seed=6 + k, scale=1e-3)} for k in range(2)]
    columns = count_qr_columns(monkeypatch)
    merged, reports = merge_round(current, branches, [0.5, 0.5], max_rank=20)
    assert columns == [40, 40]
    reference, dropped = full_merge(current, branches, [0.5, 0.5], max_rank=20)
    exact = reference["layer0"].dense()
    assert (merged["layer0"].dense() - exact).norm() <= 1e-6 * exact.norm()
    assert reports["layer0"].dropped_norm == pytest.approx(dropped["layer0"], rel=1e-6)


def test_zero_columns_of_a_saved_merge_are_skipped():
    """A merged layer of rank 0 is kept as one zero column, and a saved adapter pads every layer to one rank."""
    weights = [0.5, 0.5]
    zero = [{"layer0": LowRankDelta(torch.zeros(96, 4), torch.randn(4, 64))} for _ in weights]
    merged, reports = merge_round(None, zero, weights)
    assert merged["layer0"].rank == 1 and not merged["layer0"].B.any()
    one_layer = dict(teachers=2, shapes=((96, 64),))
    merged, reports = merge_round(merged, random_branches(0, **one_layer), weights)
    padded = {"layer0": LowRankDelta(torch.cat([merged["layer0"].B, torch.zeros(96, 5)], dim=1),
                                     torch.cat([merged["layer0"].A, torch.zeros(5, 64)]))}
    again, reports = merge_round(padded, random_branches(1, **one_layer), weights)
    reference, _ = full_merge(padded, random_branches(1, **one_layer), weights)
    assert again["layer0"].rank == reference["layer0"].rank == 32 and reports["layer0"].rank_before == 37
    assert torch.allclose(again["layer0"].dense(), reference["layer0"].dense(), atol=1e-9)


def test_persistent_branch_updates_keep_the_merged_rank():
    """A persistent branch's update is its new product minus its last one, whose columns lie in the merged delta
    (branches.round_update): the merge telescopes and its rank stays at K * r, as the full recompression's does."""
    from merge_of_thought.branches import round_update

    weights = [0.5, 0.5]
    products = [{"layer0": random_delta(96, 64, rank=8, seed=k, scale=1e-3)} for k in range(2)]
    merged, _ = merge_round(None, products, weights, tolerance=1e-4)
    reference = merged
    for round_idx in range(1, 4):
        new = [{"layer0": random_delta(96, 64, rank=8, seed=10 * round_idx + k, scale=1e-3)} for k in range(2)]
        updates = [round_update(n, p) for n, p in zip(new, products)]
        merged, reports = merge_round(merged, updates, weights, tolerance=1e-4)
        reference, _ = full_merge(reference, updates, weights, tolerance=1e-4)
        products = new
        assert merged["layer0"].rank == reference["layer0"].rank == 16
        exact = sum(w * p["layer0"].dense() for w, p in zip(weights, products))
        assert (merged["layer0"].dense() - exact).norm() <= 1e-4 * exact.norm()
