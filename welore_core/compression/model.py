"""Compression of a loaded model by a recipe: spectra → allocation → factorisation → module swap.

`compress_model` changes the model in place and returns a `CompressionReport` (everything
`welore.json` and the command line report). Each matrix is decomposed at most once (and not
at all when the spectrum cache already holds it).

Data-free (the paper): the SVD of W, ranks from WeLore's τ (or uniform). Calibrated
(calibration.py, whiten.py): each LRC is factorised from the SVD of W·S, S·Sᵀ = XᵀX over the
calibration activations; the ranks come from the spectra of W·S (method "loss") or of W.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import torch
from torch import nn

from .allocation import (TOLERANCE, Allocation, MatrixPlan, allocate_loss, allocate_uniform, allocate_welore,
                         normalise, relative_error)
from .config import METHODS, CompressConfig
from ..checkpoint import all_finite
from ..errors import InvalidArgument, NonFiniteWeights
from .factorize import factors, truncated
from ..lowrank import LowRankLinear, swap_module
from ..progress import ProgressEvent, ProgressFn, StopFn, check_stop, no_progress
from ..spectrum import Spectra, SpectrumCache, compute_spectra, leading_triplets, tensor_hash
from ..targets import short_name, target_names

SKETCH_POINTS = 64


@dataclass
class MatrixReport:
    name: str
    shape: tuple[int, int]
    rank: int
    kept_rank: int
    reduction: float  # dropped / rank
    label: str  # "LRC" | "N-LRC"
    storage: str  # "factors" | "dense"
    rel_error: float  # ‖W − Ŵ‖_F / ‖W‖_F
    calib_error: Optional[float] = None  # calibrated: ‖(W − Ŵ)·S‖_F / ‖W·S‖_F (None when plain)
    spectrum_z: list[float] = field(default_factory=list)  # normalised spectrum, ≤ SKETCH_POINTS samples


@dataclass
class CompressionReport:
    method: str
    tau: Optional[float]
    min_ratio: Optional[float]
    err_requested: Optional[float]
    err_achieved: float
    params_kept_requested: Optional[float]
    params_kept_achieved: float  # fraction of target-matrix parameters stored
    target_params_before: int
    target_params_after: int
    params_before: int  # whole model (tied weights counted once)
    params_after: int
    n_lrc: int
    n_nlrc: int
    source_hash: str
    matrices: list[MatrixReport] = field(default_factory=list)
    seconds: float = 0.0
    decomposed: int = 0  # matrices decomposed in this run (0 with a warm cache)
    factorization: str = "plain"  # "plain" | "whitened"
    calibration: Optional[dict] = None  # data, hash, samples, seq_len, sequential, compensate, damp, ...
    recipe: dict = field(default_factory=dict)  # the resolved CompressConfig.to_dict()

    def to_dict(self) -> dict:
        return asdict(self)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields tied tensors once


def model_fingerprint(model: nn.Module, spectra: Spectra) -> str:
    """SHA-256 over every weight: target matrices through their spectrum keys, the rest here."""
    h = hashlib.sha256(spectra.model_hash.encode())
    targets = set(spectra.names)
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[0] not in targets:
            h.update(name.encode())
            h.update(tensor_hash(p).encode())
    return h.hexdigest()


def check_finite(model: nn.Module, what: str) -> None:
    for name, p in model.named_parameters():
        if p.is_floating_point() and not all_finite(p):
            raise NonFiniteWeights(f"{what}: parameter {name} holds NaN or Inf values; refusing to "
                                   "continue. Check the source checkpoint (re-download or re-export it).")


def allocate(spectra: Spectra, method: str, err: Optional[float], params_kept: Optional[float],
             min_ratio: float, tolerance: float = TOLERANCE, weights: Optional[list[float]] = None,
             rank_multiple: int = 1) -> Allocation:
    """`weights`: the loss's sensitivities (method "loss", whose `spectra` are the whitened ones);
    `rank_multiple`: every LRC keeps a multiple of it."""
    if method == "welore":
        return allocate_welore(spectra.values, spectra.shapes, err=err, params_kept=params_kept,
                               min_ratio=min_ratio, tolerance=tolerance, rank_multiple=rank_multiple)
    if method == "uniform":
        return allocate_uniform(spectra.shapes, err=err, params_kept=params_kept, tolerance=tolerance,
                                rank_multiple=rank_multiple)
    if method == "loss":
        if weights is None:
            raise InvalidArgument('method "loss" allocates from calibration: give the recipe a calibration')
        return allocate_loss(spectra.values, spectra.shapes, weights, err=err, params_kept=params_kept,
                             min_ratio=min_ratio, tolerance=tolerance, rank_multiple=rank_multiple)
    raise InvalidArgument(f"method must be one of {', '.join(METHODS)}; received {method!r}")


def _swap_in(model: nn.Module, name: str, plan: MatrixPlan, U: torch.Tensor, S_k: torch.Tensor,
             Vh: torch.Tensor, device: torch.device) -> None:
    """Replace an LRC by its factors B·A (or its truncated dense Ŵ below the break-even)."""
    linear = model.get_submodule(name)
    dtype = linear.weight.dtype
    if plan.factored:
        A, B = factors(U, S_k, Vh, plan.kept)
        new = LowRankLinear.from_factors(A.to(device, dtype), B.to(device, dtype),
                                         linear.bias.detach() if linear.bias is not None else None)
        swap_module(model, name, new)
    else:
        with torch.no_grad():
            linear.weight.copy_(truncated(U, S_k, Vh, plan.kept).to(device, dtype))


def _swap_in_calibrated(model: nn.Module, name: str, plan: MatrixPlan, cache: SpectrumCache, key: str,
                        device: torch.device) -> float:
    """Swap in a calibrated LRC; returns its ‖W − Ŵ‖_F / ‖W‖_F (0 for an N-LRC, left as is)."""
    if not plan.lrc:
        return 0.0
    U, S_k, Vh = cache.factors(key, plan.kept)
    W = model.get_submodule(name).weight.detach().to("cpu", torch.float64)
    norm = float(torch.linalg.matrix_norm(W))
    rel = float(torch.linalg.matrix_norm(W - truncated(U, S_k, Vh, plan.kept).double())) / norm if norm > 0 else 0.0
    _swap_in(model, name, plan, U, S_k, Vh, device)
    return rel


def compress_model(model: nn.Module, config: CompressConfig, calibration=None, *,
                   cache: SpectrumCache | None = None, tolerance: float = TOLERANCE,
                   progress: ProgressFn = no_progress, should_stop: StopFn | None = None) -> CompressionReport:
    """Compress `model` in place by the recipe `config` (resolved here). Raises Cancelled (the model
    is then half-swapped: discard it).

    `calibration` (a calibration.Calibration: the token windows of `config.calibration.data`) is
    required when the recipe is calibrated. The achieved ERR (or parameter fraction) must land
    within `tolerance` of the request; small models, whose matrices join the LRCs in coarse
    steps, may need a looser one.

    Calibrated recipes factorise each LRC from the SVD of W·S (whitened); the ranks come from the
    spectra of W·S under the dense model's activations (method "loss") or of W (welore, uniform).
    `sequential` gathers layer L's statistics with layers 0..L−1 already compressed; `compensate`
    fits each layer's o_proj and down_proj to the dense block's outputs given its compressed other
    matrices.
    """
    t0 = time.perf_counter()
    config = config.resolve()
    cal_cfg = config.calibration
    if cal_cfg is not None and calibration is None:
        raise InvalidArgument("this recipe is calibrated: pass the calibration token windows "
                              "(compression.calibration.load_calibration) or use calibration=None")
    if cal_cfg is None and calibration is not None:
        raise InvalidArgument("calibration windows were given for a data-free recipe; set the recipe's "
                              "calibration or pass none")
    method, err, params_kept, min_ratio = config.method, config.err, config.params_kept, config.min_ratio
    multiple = config.rank_multiple
    factorization = "plain" if cal_cfg is None else cal_cfg.factorization
    names = target_names(model)
    if any(isinstance(model.get_submodule(n), LowRankLinear) for n in names):
        raise InvalidArgument("this model is already WeLore-compressed; compress its dense source "
                              "(or a merged export) instead")
    check_finite(model, "source model")
    cache = cache or SpectrumCache.configured()
    device = next(model.parameters()).device
    params_before = count_params(model)

    spectra = compute_spectra(model, cache, progress, should_stop, device=device, names=names)
    source_hash = model_fingerprint(model, spectra)
    keys, calibrated, record = spectra.keys, None, None
    applied: dict[str, float] = {}  # calibrated matrices already swapped in → ‖W − Ŵ‖/‖W‖
    if cal_cfg is None:
        alloc = allocate(spectra, method, err, params_kept, min_ratio, tolerance, rank_multiple=multiple)
    else:
        from .calibration import Calibrator

        sequential, compensate = cal_cfg.sequential, bool(cal_cfg.compensate)
        sink_weight = config.experimental.sink_weight
        t_cal = time.perf_counter()
        cal = Calibrator(model, names, spectra.keys, source_hash, calibration, factorization, cache,
                         damp=cal_cfg.damp, sink_weight=sink_weight, progress=progress, should_stop=should_stop)
        if method == "loss":  # ranks from the spectra of W·S (every matrix's, dense activations), weighted
            calibrated = cal.dense()
            alloc = allocate(replace(spectra, values=calibrated.values), method, err, params_kept, min_ratio,
                             tolerance, weights=cal.sensitivity(), rank_multiple=multiple)
        else:  # ranks from the weights first: only the LRCs need calibrated SVDs
            alloc = allocate(spectra, method, err, params_kept, min_ratio, tolerance, rank_multiple=multiple)
            if not sequential:
                calibrated = cal.dense(only={i for i, p in enumerate(alloc.plans) if p.lrc})
        if sequential:
            plans = dict(zip(names, alloc.plans))

            def apply(name: str, key: str) -> None:
                applied[name] = _swap_in_calibrated(model, name, plans[name], cache, key, device)

            calibrated = cal.sequential([p.kept for p in alloc.plans], apply,
                                        only={i for i, p in enumerate(alloc.plans) if p.lrc}, compensate=compensate)
        keys = calibrated.keys
        record = {**calibration.record(), "sequential": sequential, "compensate": compensate,
                  "damp": cal_cfg.damp, "sink_weight": sink_weight,
                  "factorized": calibrated.factorized, "layer_forwards": calibrated.forward_passes,
                  "fallbacks": calibrated.how, "seconds": time.perf_counter() - t_cal}
    check_stop(should_stop)

    matrices: list[MatrixReport] = []
    for i, (name, plan, S, key) in enumerate(zip(spectra.names, alloc.plans, spectra.values, keys)):
        check_stop(should_stop)
        calib_error = None
        if cal_cfg is None:
            if plan.lrc and not plan.factored:  # Ŵ = W − U_tail·S_tail·V_tailᵀ: m·n·(r−k), not m·n·k
                weight = model.get_submodule(name).weight
                tail = cache.tail(key, plan.kept)  # (None when the entry is compact: Ŵ from the leading k)
                with torch.no_grad():
                    if tail is not None:
                        weight.sub_(truncated(*tail, len(tail[1])).to(device, weight.dtype))
                    else:
                        weight.copy_(truncated(*leading_triplets(cache, key, weight, plan.kept, device),
                                               plan.kept).to(device, weight.dtype))
            elif plan.lrc:
                W = model.get_submodule(name).weight
                _swap_in(model, name, plan, *leading_triplets(cache, key, W, plan.kept, device), device)
            rel_error = relative_error(S, plan.kept) if plan.lrc else 0.0
        else:
            if name not in applied:
                applied[name] = _swap_in_calibrated(model, name, plan, cache, key, device)
            rel_error = applied[name]
            calib_error = relative_error(calibrated.values[i], plan.kept) if plan.lrc else None
        matrices.append(MatrixReport(
            name=short_name(name), shape=plan.shape, rank=plan.rank, kept_rank=plan.kept,
            reduction=plan.dropped / plan.rank if plan.lrc else 0.0,
            label="LRC" if plan.lrc else "N-LRC", storage="factors" if plan.factored else "dense",
            rel_error=rel_error, calib_error=calib_error, spectrum_z=spectrum_sketch(S)))
        progress(ProgressEvent("factorize", i + 1, len(names), message=name))
    return CompressionReport(
        recipe=config.to_dict(), method=method, tau=alloc.tau, min_ratio=alloc.min_ratio,
        err_requested=err, err_achieved=alloc.err,
        params_kept_requested=params_kept, params_kept_achieved=alloc.params_kept,
        target_params_before=sum(p.params_dense for p in alloc.plans),
        target_params_after=sum(p.params_stored for p in alloc.plans),
        params_before=params_before, params_after=count_params(model),
        n_lrc=alloc.n_lrc, n_nlrc=len(alloc.plans) - alloc.n_lrc,
        source_hash=source_hash,
        matrices=matrices, seconds=time.perf_counter() - t0, decomposed=spectra.decomposed,
        factorization=factorization, calibration=record)


def spectrum_sketch(S: torch.Tensor, points: int = SKETCH_POINTS) -> list[float]:
    """The normalised singular values z (descending) at ≤ `points` evenly spaced ranks 0..r−1."""
    z = normalise(S)
    r = z.numel()
    idx = torch.linspace(0, r - 1, min(points, r)).round().long()
    return [round(float(v), 4) for v in z[idx]]
