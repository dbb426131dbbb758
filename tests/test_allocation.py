"""Exact maths of the rank allocation on hand-made spectra and tiny seeded models."""

import pytest
import torch

from welore_core.allocation import (MatrixPlan, allocate_uniform, allocate_welore, effective_rank_reduction,
                                    normalise, params_kept_fraction, relative_error, uniform_plans,
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
    assert p.factored == (2 * (5 + 8) < 5 * 8)
    assert p.params_stored == 2 * 13
    # min_ratio 0.6: 3/5 = 0.6 is not > 0.6, so an N-LRC that drops nothing
    p = welore_plans(z, [(5, 8)], tau=0.3, min_ratio=0.6)[0]
    assert (p.kept, p.lrc, p.params_stored) == (5, False, 40)


def test_break_even_lrc_is_stored_dense():
    p = MatrixPlan((64, 64), 64, 40, True)  # 40·128 ≥ 64·64: factors would be larger
    assert not p.factored and p.params_stored == 64 * 64
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
