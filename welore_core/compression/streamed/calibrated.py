"""Calibrated WeLore compression streamed one decoder layer at a time.

The calibration windows' hidden states (N × L × hidden) stay in memory; everything else streams:
the embeddings, final norm and LM head are resident (layers.StreamedLayers), and each decoder
layer is read when the Calibrator (compression/calibration.py, the same code as in memory) opens
it: its statistics gathered, its matrices factorised (cached), its outputs computed for the next
layer, and the layer dropped. On a GPU one layer is on the device at a time.

  ranks from the weights, not sequential: allocate from pass 1's spectra → one calibration pass
      (dense inputs) caches the LRCs' whitened SVDs → each layer read again, its LRCs swapped in,
      written;
  method "loss": one dense calibration pass over every matrix first, then the loss's sensitivities
      (one more pass forward and one back, compression/sensitivity.py), ranks from both;
  sequential (and compensate): each layer is compressed while open, written as it closes, and
      its compressed outputs feed the next layer.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..allocation import relative_error
from ...progress import ProgressEvent, check_stop
from ...layerwise.layers import StreamedLayers


class WritingLayers(StreamedLayers):
    """StreamedLayers whose `close(L)` first hands layer L (as compressed while open) to `on_close`."""

    on_close = None

    def close(self, layer: int) -> None:
        if layer in self._open and self.on_close is not None:
            self.on_close(layer, self.layers[layer])
        super().close(layer)


def layer_state(layer: int, module: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors of an open decoder layer under their checkpoint names, in the output dtype."""
    return {f"model.layers.{layer}.{k}": v.detach().to("cpu", dtype) for k, v in module.state_dict().items()}


def run_calibrated(job, journal, merged, spectra, source_hash: str, calibration, cal_cfg, sink_weight: float,
                   compute_device: torch.device, compute_dtype: torch.dtype):
    """The calibrated passes of a StreamedCompression `job`: returns (allocation, matrix report
    dicts by layer, calibration record pieces)."""
    from ..calibration import Calibrator
    from ..model import _swap_in_calibrated, allocate
    from ...layerwise.writer import merge_factors

    store = WritingLayers(job.path, config=job.config, device=compute_device, dtype=compute_dtype,
                          source=job.source)
    cal = Calibrator(store.model, job.names, spectra.keys, source_hash, calibration, cal_cfg.factorization,
                     job.cache, damp=cal_cfg.damp, sink_weight=sink_weight, progress=job.progress,
                     should_stop=job.should_stop, store=store)
    method, lrc_only = job.method, None
    if method == "loss":  # ranks from the whitened spectra of every matrix (dense inputs), weighted
        calibrated = cal.dense()
        alloc = allocate(replace(spectra, values=calibrated.values), method, job.err, job.params_kept,
                         job.min_ratio, job.tolerance, weights=cal.sensitivity(), rank_multiple=job.rank_multiple)
    else:
        alloc = allocate(spectra, method, job.err, job.params_kept, job.min_ratio, job.tolerance,
                         rank_multiple=job.rank_multiple)
        lrc_only = {i for i, p in enumerate(alloc.plans) if p.lrc}
        calibrated = None if cal_cfg.sequential else cal.dense(only=lrc_only)
    journal.plan(job._units(alloc.plans), job.shard_bytes)
    if merged is not None:
        merged.plan(job._units(alloc.plans, merged=True), job.shard_bytes)
    plans = dict(zip(job.names, alloc.plans))
    applied: dict[str, float] = {}

    def apply(name: str, key: str) -> None:
        applied[name] = _swap_in_calibrated(store.model, name, plans[name], job.cache, key, compute_device)

    def write(L: int, module) -> None:
        tensors = layer_state(L, module, job.dtype)
        journal.add(f"layer.{L}", tensors)
        if merged is not None:
            merged.add(f"layer.{L}", merge_factors(tensors))
        job.progress(ProgressEvent("factorize", L + 1, store.n_layers, message=f"layer {L}"))

    store.on_close = write
    if cal_cfg.sequential:
        calibrated = cal.sequential([p.kept for p in alloc.plans], apply,
                                    only={i for i, p in enumerate(alloc.plans) if p.lrc},
                                    compensate=bool(cal_cfg.compensate))
    else:
        for L in range(store.n_layers):
            check_stop(job.should_stop)
            if journal.done(f"layer.{L}") and (merged is None or merged.done(f"layer.{L}")):
                continue
            store.open(L)
            for i in job.by_layer.get(L, []):
                name = job.names[i]
                apply(name, calibrated.keys[i])
            store.close(L)
    matrices: dict[str, list[dict]] = {}
    for i, (name, plan) in enumerate(zip(job.names, alloc.plans)):
        S = spectra.values[i]
        matrices.setdefault(str(int(name.split(".")[2])), []).append(dict(
            name=job.short(name), shape=list(plan.shape), rank=plan.rank, kept_rank=plan.kept,
            reduction=plan.dropped / plan.rank if plan.lrc else 0.0, label="LRC" if plan.lrc else "N-LRC",
            storage="factors" if plan.factored else "dense", rel_error=applied.get(name, 0.0),
            calib_error=relative_error(calibrated.values[i], plan.kept) if plan.lrc else None,
            **job.sketch(S)))
    record = {"factorized": calibrated.factorized, "layer_forwards": calibrated.forward_passes,
              "fallbacks": calibrated.how}
    return alloc, matrices, record
