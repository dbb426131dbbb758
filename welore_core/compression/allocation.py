"""Rank allocation: WeLore's global threshold τ, the uniform baseline, and their accounting.

Pure functions over singular values and shapes (no modules, no I/O).

WeLore (DESIGN.md §1): per matrix z = (s − min s)/(max s − min s); one global τ drops
p_W = #{z < τ} ranks. W is a Low-Rank Component (LRC) when p_W/r_W > min_ratio, else an
N-LRC that drops nothing. An LRC is stored as factors B·A when k·(m+n) < m·n, else as its
truncated dense Ŵ. ERR = Σ ranks removed / Σ r_W; params kept = stored target parameters /
Σ m·n. Both are monotone in τ, so τ is found by bisection over the finite set of thresholds
where anything changes (the z values themselves).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..errors import InvalidArgument

TOLERANCE = 0.005


@dataclass(frozen=True)
class MatrixPlan:
    shape: tuple[int, int]  # (m, n) = (out, in)
    rank: int  # r = min(m, n)
    kept: int  # k
    lrc: bool  # True: Low-Rank Component (truncated); False: N-LRC, dense and untouched

    @property
    def dropped(self) -> int:
        return self.rank - self.kept

    @property
    def factored(self) -> bool:
        """Stored as factors B·A (True) or as a dense matrix (False)."""
        m, n = self.shape
        return self.lrc and self.kept * (m + n) < m * n

    @property
    def params_dense(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def params_stored(self) -> int:
        m, n = self.shape
        return self.kept * (m + n) if self.factored else m * n


@dataclass(frozen=True)
class Allocation:
    method: str  # "welore" | "uniform"
    plans: list[MatrixPlan]
    tau: Optional[float]  # WeLore's threshold; None for uniform
    fraction: Optional[float]  # uniform's dropped fraction; None for WeLore
    min_ratio: Optional[float]  # None for uniform (it does not apply)

    @property
    def err(self) -> float:
        return effective_rank_reduction(self.plans)

    @property
    def params_kept(self) -> float:
        return params_kept_fraction(self.plans)

    @property
    def n_lrc(self) -> int:
        return sum(p.lrc for p in self.plans)


def effective_rank_reduction(plans: Sequence[MatrixPlan]) -> float:
    total = sum(p.rank for p in plans)
    return sum(p.dropped for p in plans if p.lrc) / total


def params_kept_fraction(plans: Sequence[MatrixPlan]) -> float:
    return sum(p.params_stored for p in plans) / sum(p.params_dense for p in plans)


def normalise(S: torch.Tensor) -> torch.Tensor:
    """z = (s − min s)/(max s − min s), in float64; a flat spectrum gives all ones (never dropped)."""
    S = S.double()
    lo, hi = S.min(), S.max()
    if hi - lo <= 0:
        return torch.ones_like(S)
    return (S - lo) / (hi - lo)


def welore_plans(z_ascending: Sequence[torch.Tensor], shapes: Sequence[tuple[int, int]],
                 tau: float, min_ratio: float) -> list[MatrixPlan]:
    plans = []
    for z, shape in zip(z_ascending, shapes):
        r = min(shape)
        p = int(torch.searchsorted(z, torch.tensor([tau], dtype=z.dtype), side="left").item())
        p = min(p, r - 1)  # always keep at least one rank
        lrc = p > 0 and p / r > min_ratio
        plans.append(MatrixPlan(tuple(shape), r, r - p if lrc else r, lrc))
    return plans


def uniform_plans(shapes: Sequence[tuple[int, int]], fraction: float) -> list[MatrixPlan]:
    plans = []
    for shape in shapes:
        r = min(shape)
        p = min(int(fraction * r + 0.5), r - 1)
        plans.append(MatrixPlan(tuple(shape), r, r - p, p > 0))
    return plans


def _target(err: Optional[float], params_kept: Optional[float]) -> tuple[str, float]:
    if (err is None) == (params_kept is None):
        raise InvalidArgument("give exactly one target: an ERR (--err, fraction of ranks removed, "
                              "0 < err < 1) or a parameter budget (--params-kept, 0 < f ≤ 1)")
    if err is not None:
        if not 0.0 < err < 1.0:
            raise InvalidArgument(f"err must be in (0, 1) (fraction of ranks removed); received {err}")
        return "err", float(err)
    if not 0.0 < params_kept <= 1.0:
        raise InvalidArgument(f"params_kept must be in (0, 1] (fraction of target-matrix parameters "
                              f"kept); received {params_kept}")
    return "params_kept", float(params_kept)


def _search(candidates: Sequence[float], measure: Callable[[float], float], goal: float,
            increasing: bool) -> float:
    """Bisection over sorted candidates for the one whose (monotone) measure is closest to goal."""
    sign = 1.0 if increasing else -1.0
    lo, hi = 0, len(candidates) - 1
    if sign * measure(candidates[hi]) < sign * goal:
        return candidates[hi]
    while lo < hi:  # first index whose measure reaches the goal
        mid = (lo + hi) // 2
        if sign * measure(candidates[mid]) >= sign * goal:
            hi = mid
        else:
            lo = mid + 1
    best = candidates[lo]
    if lo > 0 and abs(measure(candidates[lo - 1]) - goal) <= abs(measure(best) - goal):
        best = candidates[lo - 1]
    return best


def _check_reached(kind: str, goal: float, achieved: float, below: float, above: float,
                   tolerance: float, hint: str) -> None:
    if abs(achieved - goal) > tolerance:
        raise InvalidArgument(
            f"requested {kind}={goal:.4f} cannot be reached within ±{tolerance} on this model "
            f"(nearest achievable: {below:.4f} and {above:.4f}); {hint}")


def allocate_welore(spectra: Sequence[torch.Tensor], shapes: Sequence[tuple[int, int]], *,
                    err: Optional[float] = None, params_kept: Optional[float] = None,
                    min_ratio: float = 0.5, tolerance: float = TOLERANCE) -> Allocation:
    """WeLore allocation: one global τ reaching the requested ERR (or parameter fraction kept)."""
    kind, goal = _target(err, params_kept)
    if not 0.0 <= min_ratio < 1.0:
        raise InvalidArgument(f"min_ratio must be in [0, 1); received {min_ratio}")
    z_asc = [torch.flip(normalise(S), dims=[0]).contiguous() for S in spectra]
    candidates = torch.unique(torch.cat(z_asc + [torch.tensor([0.0, 1.0], dtype=torch.float64)]))
    candidates = candidates[candidates <= 1.0].tolist()

    def measure(tau: float) -> float:
        plans = welore_plans(z_asc, shapes, tau, min_ratio)
        return effective_rank_reduction(plans) if kind == "err" else params_kept_fraction(plans)

    tau = _search(candidates, measure, goal, increasing=(kind == "err"))
    alloc = Allocation("welore", welore_plans(z_asc, shapes, tau, min_ratio), tau, None, min_ratio)
    achieved = alloc.err if kind == "err" else alloc.params_kept
    i = candidates.index(tau)
    neighbours = sorted({measure(candidates[max(i - 1, 0)]), achieved, measure(candidates[min(i + 1, len(candidates) - 1)])})
    _check_reached(kind, goal, achieved, neighbours[0], neighbours[-1], tolerance,
                   "with min_ratio > 0 a matrix joins the LRCs all at once; lower --min-ratio or "
                   "request a reachable value")
    return alloc


def allocate_uniform(shapes: Sequence[tuple[int, int]], *, err: Optional[float] = None,
                     params_kept: Optional[float] = None, tolerance: float = TOLERANCE) -> Allocation:
    """The baseline: every matrix drops the same fraction of its ranks (min_ratio does not apply)."""
    kind, goal = _target(err, params_kept)
    max_r = max(min(s) for s in shapes)
    candidates = [i / (2 * max_r) for i in range(0, 2 * max_r)]

    def measure(f: float) -> float:
        plans = uniform_plans(shapes, f)
        return effective_rank_reduction(plans) if kind == "err" else params_kept_fraction(plans)

    f = _search(candidates, measure, goal, increasing=(kind == "err"))
    alloc = Allocation("uniform", uniform_plans(shapes, f), None, f, None)
    achieved = alloc.err if kind == "err" else alloc.params_kept
    _check_reached(kind, goal, achieved, achieved, achieved, tolerance,
                   "the model's matrices are too small for this precision")
    return alloc


def relative_error(S: torch.Tensor, kept: int) -> float:
    """‖W − Ŵ_k‖_F / ‖W‖_F from the singular values alone (Eckart–Young)."""
    S = S.double()
    total = float((S ** 2).sum())
    return (float((S[kept:] ** 2).sum()) / total) ** 0.5 if total > 0 else 0.0


def loss_terms(S: torch.Tensor, weight: float) -> torch.Tensor:
    """The allocation objective's term of one matrix for every rank k = 0..r: weight·Σ_{i≥k} s_i², the
    estimated loss increase of the rank-k truncation (see allocate_loss)."""
    energy = S.double() ** 2
    tail = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0])  # tail[k] = Σ_{i≥k} s_i²
    return torch.cat([tail, tail.new_zeros(1)]) * weight


def loss_plans(spectra: Sequence[torch.Tensor], shapes: Sequence[tuple[int, int]], weights: Sequence[float],
               lam: float, kind: str, min_ratio: float) -> list[MatrixPlan]:
    """For one multiplier λ, each matrix's rank minimising term(k) + λ·cost(k)/Σcost (see allocate_loss)."""
    plans = []
    total = sum(min(s) for s in shapes) if kind == "err" else sum(m * n for m, n in shapes)
    for S, (m, n), w in zip(spectra, shapes, weights):
        r = min(m, n)
        terms = loss_terms(S, w)
        k = torch.arange(r + 1, dtype=torch.float64)
        if kind == "err":
            cost = k.clone()
        else:
            cost = torch.where(k * (m + n) < m * n, k * (m + n), torch.full_like(k, float(m * n)))
        k_cap = max(1, math.ceil(r * (1.0 - min_ratio)) - 1)  # an LRC drops more than min_ratio of its ranks
        allowed = (k >= 1) & (k <= k_cap)
        allowed[r] = True  # or the matrix stays whole (an N-LRC)
        obj = torch.where(allowed, terms + lam * cost / total, torch.full_like(terms, float("inf")))
        kept = int(torch.argmin(obj))
        plans.append(MatrixPlan((m, n), r, kept, kept < r))
    return plans


def _between(short: list[MatrixPlan], over: list[MatrixPlan], spectra, weights, kind: str,
             goal: float) -> list[MatrixPlan]:
    """Between the plans of two close multipliers (`short` of the budget, `over` it), move matrices from
    their `short` rank to their `over` rank, cheapest loss per unit of budget first, and stop at the
    plan closest to the goal (the relaxation alone can jump over the requested budget)."""
    def value(plans):
        return effective_rank_reduction(plans) if kind == "err" else params_kept_fraction(plans)

    moves = [i for i, (a, b) in enumerate(zip(short, over)) if a != b]
    def rate(i):
        spent = abs(value(short[:i] + [over[i]] + short[i + 1:]) - value(short)) or 1e-300
        terms = loss_terms(spectra[i], weights[i])
        return float(terms[over[i].kept] - terms[short[i].kept]) / spent
    plans, best = list(short), list(short)
    for i in sorted(moves, key=rate):
        plans[i] = over[i]
        if abs(value(plans) - goal) < abs(value(best) - goal):
            best = list(plans)
    return best


def allocate_loss(spectra: Sequence[torch.Tensor], shapes: Sequence[tuple[int, int]], weights: Sequence[float], *,
                  err: Optional[float] = None, params_kept: Optional[float] = None, min_ratio: float = 0.5,
                  tolerance: float = TOLERANCE) -> Allocation:
    """Ranks that minimise the estimated loss increase Σ_W c_W·Σ_{i≥k_W} σ_i² under the budget.

    `spectra` are the singular values σ of W·S (whitened: Σ_{i≥k} σ_i² is the output error energy
    ‖(W − Ŵ_k)·Xᵀ‖² of the rank-k truncation on the calibration activations, plus the damping's
    δ·‖W − Ŵ_k‖², whiten.py) and `weights` the loss's sensitivity c_W to each matrix's output
    error (sensitivity.py): to second order the loss grows by ½·c_W·‖ΔY‖². The weights carry what
    the spectra cannot: an error in q_proj's outputs (through a softmax) moves the loss far less
    than the same error in v_proj's or o_proj's. Measured on SmolLM2 against the unweighted relative
    objective Σ e_W² it replaced: better on every held-out corpus (params kept 0.8: 1.47–2.04× the dense
    perplexity against 2.19–4.46×; docs/research/allocation-objective.md). The budget is the ranks
    kept (an ERR target) or the parameters stored (params_kept), counting an N-LRC whole and a
    factored LRC at k·(m+n).
    Solved by Lagrangian relaxation: for a multiplier λ every matrix independently picks the k
    minimising its term + λ·cost_W(k)/Σcost; λ is bisected (on a log scale) until the budget is met.
    Like WeLore, a matrix is either an N-LRC or drops more than `min_ratio` of its ranks.
    """
    kind, goal = _target(err, params_kept)
    if not 0.0 <= min_ratio < 1.0:
        raise InvalidArgument(f"min_ratio must be in [0, 1); received {min_ratio}")
    if len(weights) != len(spectra) or not all(math.isfinite(w) and w >= 0 for w in weights):
        raise InvalidArgument(f"the loss allocation needs one finite weight ≥ 0 per matrix; received {len(weights)} "
                              f"for {len(spectra)} matrices")
    total = sum(w * float((S.double() ** 2).sum()) for S, w in zip(spectra, weights))
    weights = [w / total for w in weights] if total > 0 else [1.0] * len(spectra)  # Σ terms(0) = 1: λ's scale

    def measure(lam: float) -> float:
        plans = loss_plans(spectra, shapes, weights, lam, kind, min_ratio)
        return effective_rank_reduction(plans) if kind == "err" else params_kept_fraction(plans)

    increasing = kind == "err"  # a larger λ removes more
    lo, hi = -12.0, 6.0  # log10 λ
    if (measure(10 ** hi) < goal) if increasing else (measure(10 ** hi) > goal):
        hi = 9.0
    for _ in range(60):
        mid = (lo + hi) / 2
        reached = measure(10 ** mid) >= goal if increasing else measure(10 ** mid) <= goal
        lo, hi = (lo, mid) if reached else (mid, hi)
    plans = _between(loss_plans(spectra, shapes, weights, 10 ** lo, kind, min_ratio),
                     loss_plans(spectra, shapes, weights, 10 ** hi, kind, min_ratio), spectra, weights, kind, goal)
    alloc = Allocation("loss", plans, None, None, min_ratio)
    achieved = alloc.err if kind == "err" else alloc.params_kept
    _check_reached(kind, goal, achieved, measure(10 ** lo), measure(10 ** hi), tolerance,
                   "the model's matrices join the LRCs in steps too coarse for this target; lower "
                   "min_ratio or request a reachable value")
    return alloc
