"""Exact maths of the rank allocation on hand-made spectra and tiny seeded models."""

import pytest
import torch

from welore_core.compression.allocation import (TOLERANCE, MatrixPlan, allocate_loss, allocate_uniform,
                                                allocate_welore, effective_rank_reduction, matrix_multiple, normalise,
                                                params_kept_fraction, relative_error, round_rank, stores_factors, dense_from,
                                                uniform_plans,
                                                welore_plans)
from welore_core.errors import InvalidArgument


def _spectra(seed=0, shapes=((64, 64), (32, 64), (160, 64), (64, 160)) * 3):
    g = torch.Generator().manual_seed(seed)
    values = []
    for i, (m, n) in enumerate(shapes):
        r = min(m, n)
        decay = 0.5 + 4.0 * torch.rand(1, generator=g).item()  # each matrix its own decay
        s = torch.exp(-decay * torch.linspace(0, 1, r)) + 0.01 * torch.rand(r, generator=g)
        values.append(torch.sort(s, descending=True).values.float())
    return values, list(shapes)


def test_normalise_maps_to_unit_interval_and_flat_spectrum_to_ones():
    z = normalise(torch.tensor([4.0, 3.0, 1.0]))
    assert torch.allclose(z, torch.tensor([1.0, 2 / 3, 0.0], dtype=torch.float64))
    assert torch.equal(normalise(torch.tensor([2.0, 2.0])), torch.ones(2, dtype=torch.float64))


def test_plan_counts_match_formulas():
    z = [torch.tensor([0.0, 0.1, 0.2, 0.5, 1.0], dtype=torch.float64)]  # ascending
    plans = welore_plans(z, [(5, 8)], tau=0.3, min_ratio=0.0)
    p = plans[0]
    assert (p.rank, p.kept, p.dropped, p.lrc) == (5, 2, 3, True)
    assert p.factored == (2 * (5 + 8) < 0.75 * 5 * 8)
    assert p.params_stored == 2 * 13
    # min_ratio 0.6: 3/5 = 0.6 is not > 0.6, so an N-LRC that drops nothing
    p = welore_plans(z, [(5, 8)], tau=0.3, min_ratio=0.6)[0]
    assert (p.kept, p.lrc, p.params_stored) == (5, False, 40)


def test_break_even_lrc_is_stored_dense():
    p = MatrixPlan((64, 64), 64, 40, True)  # 40·128 ≥ 64·64: factors would be larger
    assert not p.factored and p.params_stored == 64 * 64
    p = MatrixPlan((64, 64), 64, 28, True)  # 28·128 < 64·64 but not < 0.75·64·64: factors not faster
    assert not p.factored and p.params_stored == 64 * 64 and not stores_factors(28, 64, 64)
    assert stores_factors(23, 64, 64) and MatrixPlan((64, 64), 64, 23, True).factored
    q = MatrixPlan((64, 64), 64, 20, True)
    assert q.factored and q.params_stored == 20 * 128


@pytest.mark.parametrize("min_ratio", [0.0, 0.5])
def test_err_is_monotone_in_tau_and_requested_err_is_reached(min_ratio):
    values, shapes = _spectra()
    z = [torch.flip(normalise(s), [0]) for s in values]
    errs = [effective_rank_reduction(welore_plans(z, shapes, t, min_ratio)) for t in torch.linspace(0, 1, 101).tolist()]
    assert all(a <= b for a, b in zip(errs, errs[1:]))
    taus = []
    for goal in (0.1, 0.3, 0.5):
        alloc = allocate_welore(values, shapes, err=goal, min_ratio=min_ratio, tolerance=0.02)
        assert abs(alloc.err - goal) <= 0.02
        taus.append(alloc.tau)
    assert taus == sorted(taus)


def test_err_counts_only_lrc_drops():
    plans = [MatrixPlan((8, 8), 8, 2, True), MatrixPlan((8, 8), 8, 8, False), MatrixPlan((4, 8), 4, 4, False)]
    assert effective_rank_reduction(plans) == pytest.approx(6 / 20)
    assert params_kept_fraction(plans) == pytest.approx((2 * 16 + 64 + 32) / (64 + 64 + 32))


def test_params_kept_target_is_reached():
    values, shapes = _spectra()
    alloc = allocate_welore(values, shapes, params_kept=0.6, min_ratio=0.5, tolerance=0.03)
    assert abs(alloc.params_kept - 0.6) <= 0.03
    assert alloc.err > 0


def test_uniform_drops_the_same_fraction_everywhere_and_ignores_min_ratio():
    shapes = [(64, 64), (32, 64), (160, 64)]
    alloc = allocate_uniform(shapes, err=0.25, tolerance=0.01)
    assert [p.dropped for p in alloc.plans] == [16, 8, 16]
    assert all(p.lrc for p in alloc.plans)
    assert alloc.min_ratio is None and alloc.tau is None


def test_welore_allocation_is_non_uniform_and_differs_from_uniform():
    values, shapes = _spectra()
    w = allocate_welore(values, shapes, err=0.3, min_ratio=0.0, tolerance=0.01)
    u = allocate_uniform(shapes, err=0.3, tolerance=0.01)
    ratios = {round(p.dropped / p.rank, 3) for p in w.plans}
    assert len(ratios) > 3  # one τ, many different per-matrix ranks
    assert [p.kept for p in w.plans] != [p.kept for p in u.plans]
    # one global τ: a matrix keeps exactly the singular values whose z ≥ τ
    for s, p in zip(values, w.plans):
        assert p.kept == max(int((normalise(s) >= w.tau).sum()), 1)


def test_bad_targets_are_refused_with_clear_messages():
    values, shapes = _spectra()
    with pytest.raises(InvalidArgument, match="exactly one target"):
        allocate_welore(values, shapes)
    with pytest.raises(InvalidArgument, match="exactly one target"):
        allocate_welore(values, shapes, err=0.2, params_kept=0.5)
    with pytest.raises(InvalidArgument, match=r"err must be in \(0, 1\)"):
        allocate_welore(values, shapes, err=1.5)
    with pytest.raises(InvalidArgument, match="min_ratio"):
        allocate_welore(values, shapes, err=0.2, min_ratio=1.0)
    with pytest.raises(InvalidArgument, match="cannot be reached"):  # coarse jumps on 2 matrices
        allocate_welore(values[:2], shapes[:2], err=0.2, min_ratio=0.9)


def test_relative_error_from_spectrum():
    s = torch.tensor([3.0, 2.0, 1.0])
    assert relative_error(s, 1) == pytest.approx((5 / 14) ** 0.5)
    assert relative_error(s, 3) == 0.0


def test_uniform_plans_keep_at_least_one_rank():
    assert all(p.kept >= 1 for p in uniform_plans([(4, 4), (2, 8)], 0.99))


# -- the truncation-loss allocation (method "loss": the spectra are those of W·S) --------------

def _weights(values, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [float(w) for w in 0.1 + 10 * torch.rand(len(values), generator=g)]  # sensitivities, two decades


def _total_loss(values, weights, plans):  # Σ c_W · Σ_{i≥k} σ_i²
    return sum(w * float((s.double()[p.kept:] ** 2).sum()) for s, w, p in zip(values, weights, plans))


@pytest.mark.parametrize("min_ratio", [0.0, 0.5])
@pytest.mark.parametrize("kind, goal", [("err", 0.1), ("err", 0.3), ("err", 0.5), ("params_kept", 0.8),
                                        ("params_kept", 0.6)])
def test_loss_allocation_meets_the_budget_and_respects_min_ratio(kind, goal, min_ratio):
    values, shapes = _spectra(seed=1)
    alloc = allocate_loss(values, shapes, _weights(values), **{kind: goal}, min_ratio=min_ratio, tolerance=0.02)
    assert alloc.method == "loss" and alloc.min_ratio == min_ratio and alloc.tau is None
    achieved = alloc.err if kind == "err" else alloc.params_kept
    assert abs(achieved - goal) <= 0.02, (achieved, goal)
    assert alloc.n_lrc > 0
    for p in alloc.plans:
        assert 1 <= p.kept <= p.rank
        if p.lrc:
            assert p.dropped / p.rank > min_ratio, (p, min_ratio)
        else:
            assert p.kept == p.rank


def test_loss_allocation_minimises_its_weighted_truncation_loss_under_its_budget():
    """Lagrangian optimality: no allocation keeping at most as many ranks (WeLore's, uniform's) has a
    lower Σ c_W·Σ_{i≥k} σ_i²."""
    values, shapes = _spectra(seed=2)
    weights = _weights(values, seed=2)
    compared = 0
    for goal in (0.2, 0.4):
        loss = allocate_loss(values, shapes, weights, err=goal, min_ratio=0.0, tolerance=0.02)
        for other in (allocate_welore(values, shapes, err=goal, min_ratio=0.0, tolerance=0.02),
                      allocate_uniform(shapes, err=goal, tolerance=0.02)):
            if other.err >= loss.err:
                compared += 1
                ours, theirs = _total_loss(values, weights, loss.plans), _total_loss(values, weights, other.plans)
                assert ours <= theirs * (1 + 1e-9)
        assert [p.kept for p in loss.plans] != [p.kept for p in allocate_uniform(shapes, err=goal, tolerance=0.02).plans]
    assert compared == 4  # every alternative removed at least as many ranks here


def test_loss_allocation_takes_more_ranks_from_a_steep_spectrum_than_from_a_flat_one():
    """A steep whitened spectrum holds its energy in a few directions, so its tail costs little
    output error; a flat one loses 1/r of its energy per rank and keeps more of them."""
    r = 64
    steep = torch.exp(-8.0 * torch.linspace(0, 1, r))
    flat = torch.linspace(1.0, 0.8, r)
    shapes = [(r, r), (r, r)]
    for goal in (0.2, 0.4, 0.6):
        alloc = allocate_loss([steep, flat], shapes, [1.0, 1.0], err=goal, min_ratio=0.0, tolerance=0.02)
        s, f = alloc.plans
        assert s.dropped > f.dropped, (goal, s, f)
    # the ordering follows the spectra, not their position
    alloc = allocate_loss([flat, steep], shapes, [1.0, 1.0], err=0.4, min_ratio=0.0, tolerance=0.02)
    assert alloc.plans[1].dropped > alloc.plans[0].dropped


def test_loss_allocation_keeps_more_of_the_matrix_the_loss_is_more_sensitive_to():
    """Two identical spectra: the one whose output error moves the loss 10× more keeps more ranks;
    only the weights' ratios matter."""
    r = 64
    s = torch.exp(-3.0 * torch.linspace(0, 1, r))
    shapes = [(r, r), (r, r)]
    alloc = allocate_loss([s, s.clone()], shapes, [1.0, 10.0], err=0.4, min_ratio=0.0, tolerance=0.02)
    assert alloc.plans[1].kept > alloc.plans[0].kept
    scaled = allocate_loss([s, s.clone()], shapes, [1e-7, 1e-6], err=0.4, min_ratio=0.0, tolerance=0.02)
    assert scaled.plans == alloc.plans
    even = allocate_loss([s, s.clone()], shapes, [3.0, 3.0], err=0.4, min_ratio=0.0, tolerance=0.02)
    assert abs(even.plans[0].kept - even.plans[1].kept) <= 1


def test_loss_allocation_is_deterministic():
    values, shapes = _spectra(seed=3)
    weights = _weights(values, seed=3)
    runs = [allocate_loss(values, shapes, weights, params_kept=0.7, min_ratio=0.5, tolerance=0.02) for _ in range(3)]
    assert all(r.plans == runs[0].plans for r in runs)
    again = allocate_loss([v.clone() for v in values], list(shapes), list(weights), params_kept=0.7, min_ratio=0.5,
                          tolerance=0.02)
    assert again.plans == runs[0].plans


def test_loss_allocation_refuses_bad_targets():
    values, shapes = _spectra()
    weights = _weights(values)
    with pytest.raises(InvalidArgument, match="exactly one target"):
        allocate_loss(values, shapes, weights)
    with pytest.raises(InvalidArgument, match="min_ratio"):
        allocate_loss(values, shapes, weights, err=0.2, min_ratio=1.0)
    with pytest.raises(InvalidArgument, match="cannot be reached"):  # two matrices, all-or-nothing steps
        allocate_loss(values[:2], shapes[:2], weights[:2], err=0.2, min_ratio=0.9)
    with pytest.raises(InvalidArgument, match="one finite weight"):
        allocate_loss(values, shapes, weights[:-1], err=0.2)
    with pytest.raises(InvalidArgument, match="one finite weight"):
        allocate_loss(values, shapes, [float("nan")] + weights[1:], err=0.2)


# -- hardware-friendly ranks: every LRC keeps a multiple of rank_multiple ------------------------

_BIG = ((256, 256), (128, 256), (512, 256), (256, 512)) * 8


def _allocate(method, values, shapes, multiple, **target):
    if method == "loss":
        return allocate_loss(values, shapes, _weights(values), rank_multiple=multiple, **target)
    if method == "welore":
        return allocate_welore(values, shapes, rank_multiple=multiple, **target)
    return allocate_uniform(shapes, rank_multiple=multiple, **target)


@pytest.mark.parametrize("multiple", [8, 32])
@pytest.mark.parametrize("kind, goal", [("err", 0.5), ("err", 0.3), ("params_kept", 0.6)])
@pytest.mark.parametrize("method", ["loss", "welore", "uniform"])
def test_rank_multiple_keeps_the_target_and_the_multiple(method, kind, goal, multiple):
    values, shapes = _spectra(seed=2, shapes=_BIG)
    alloc = _allocate(method, values, shapes, multiple, **{kind: goal})
    achieved = alloc.err if kind == "err" else alloc.params_kept
    assert abs(achieved - goal) <= TOLERANCE, (achieved, goal)
    assert alloc.n_lrc > 0
    for p in alloc.plans:
        assert p.kept <= p.rank
        if p.factored:
            assert p.kept % multiple == 0 and p.kept >= multiple, p
        if p.lrc:
            if method != "uniform":
                assert p.dropped / p.rank > 0.5, p  # min_ratio still holds
        else:
            assert p.kept == p.rank
    ranks = {(p.shape, p.kept) for p in alloc.plans if p.factored}
    assert len(ranks) <= 4 * (256 // multiple)  # 4 shapes, each rank a multiple below its cap


def test_rank_multiple_gives_far_fewer_shapes_than_unrounded():
    values, shapes = _spectra(seed=3, shapes=_BIG)
    plain, rounded = (allocate_welore(values, shapes, err=0.5, rank_multiple=m) for m in (1, 32))
    shapes_of = lambda a: len({(p.shape, p.kept) for p in a.plans if p.factored})  # noqa: E731
    assert shapes_of(rounded) * 2 <= shapes_of(plain)


def test_rank_multiple_1_is_the_unrounded_allocation():
    values, shapes = _spectra(seed=2)
    t = {"err": 0.4, "tolerance": 0.05}
    for method in ("loss", "welore", "uniform"):
        assert _allocate(method, values, shapes, 1, **t).plans == (
            allocate_loss(values, shapes, _weights(values), **t) if method == "loss" else
            allocate_welore(values, shapes, **t) if method == "welore" else allocate_uniform(shapes, **t)).plans


def test_round_rank_and_small_matrices():
    sq = (256, 256)  # stored dense from rank 96 (96·512 = 0.75·256²)
    assert dense_from(256, 256) == 96 and not stores_factors(96, 256, 256) and stores_factors(95, 256, 256)
    assert round_rank(45, sq, 32, 127) == 32 and round_rank(50, sq, 32, 127) == 64
    assert round_rank(3, sq, 32, 127) == 32  # at least one multiple
    assert round_rank(81, sq, 32, 127) == 96 and round_rank(110, sq, 32, 127) == 110  # a dense Ŵ keeps its rank
    assert round_rank(10, (40, 40), 32, 19) == 15  # no multiple under the cap, but a dense Ŵ from rank 15
    assert round_rank(10, (40, 400), 32, 19) == 40  # no allowed rank under the cap: kept whole
    assert round_rank(17, (40, 40), 1, 19) == 17
    assert matrix_multiple(127, 32) == 1 and matrix_multiple(128, 32) == 32
    values, shapes = _spectra(seed=2)  # ranks 32 and 64 < 4·32: not rounded, the same plans as unrounded
    assert allocate_welore(values, shapes, err=0.4, tolerance=0.05, rank_multiple=32).plans == allocate_welore(
        values, shapes, err=0.4, tolerance=0.05).plans


def test_rank_multiple_is_validated():
    values, shapes = _spectra()
    for bad in (0, -8, 2.5, True):
        with pytest.raises(InvalidArgument, match="rank_multiple"):
            allocate_welore(values, shapes, err=0.3, rank_multiple=bad)
