"""What a streamed job will hold, known before the heavy work: the memory plan.

Streamed, memory follows the largest layer, not the depth:
  peak ≈ base (interpreter, torch, ~0.4 GB)
       + the largest decoder layer in float32 (read for its spectra / factors)
       + one SVD's working set (W, U, S, Vh and LAPACK's workspace for the largest matrix)
       + the current layer's output (shards are assembled from spilled units on disk, writer.py)
       + for evaluation and calibration: embeddings, final norm and LM head (in the compute dtype,
         or a narrower stored one), the windows' hidden states (N × L × hidden) twice (a layer's
         input and output), and one block of logits (scoring.BLOCK_ELEMENTS, float32).
The spectrum cache's disk use is planned too: every entry holds S and the leading r·(1−ρ)
triplets (`spectrum.needed_rank`); when those bytes would pass the cache's cap or half the
free disk, entries hold singular values only and factors are recomputed (`cache_mode`).

`streamable(spec)` decides which models stream at all: those whose float32 weights pass
CoreSettings.stream_above_gb (0: every safetensors model).
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from ..spectrum import SpectrumCache, entry_bytes, needed_rank
from ..scoring import BLOCK_ELEMENTS
from .source import CheckpointSource

BASE_BYTES = 400 << 20  # the interpreter with torch and transformers imported
GB = 1e9


@dataclass
class MemoryPlan:
    estimated_peak_bytes: int
    largest_layer_bytes: int  # float32, as read
    svd_bytes: int
    resident_bytes: int  # embeddings, norm, head (evaluation / calibration only)
    hidden_bytes: int  # hidden states of the windows (evaluation / calibration only)
    model_bytes: int  # the whole model in float32 (what the in-memory path would hold ×~1.5)
    layers: int
    cache_bytes: int  # bytes new cache entries may take (all missing)
    cache_mode: str  # "factors" | "values" (singular values only; factors recomputed)
    cache_cap_bytes: Optional[int]

    streamed: bool = True

    def metrics(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"streamed, {self.layers} layers: estimated peak {self.estimated_peak_bytes / GB:.2f} GB "
                f"(model {self.model_bytes / GB:.2f} GB in float32); spectrum cache up to "
                f"{self.cache_bytes / GB:.2f} GB ({self.cache_mode})")


def svd_bytes(shape: tuple[int, int]) -> int:
    m, n = shape
    r = min(m, n)
    return 4 * (2 * m * n + m * r + r * n + 4 * r * r)  # W (+ its float copy), U, Vh, gesdd work


def memory_plan(source: CheckpointSource, shapes: list[tuple[int, int]], min_ratio: Optional[float],
                cache: Optional[SpectrumCache], out_dtype: torch.dtype = torch.float32,
                compute_dtype: torch.dtype = torch.float32, tokens: int = 0, hidden: int = 0) -> MemoryPlan:
    """The plan of a streamed compression (tokens = 0) or of a calibrated / evaluation run."""
    layer = max((source.numel(source.layer_names(L)) * 4 for L in range(source.n_layers)), default=0)
    out_el = torch.empty((), dtype=out_dtype).element_size()
    comp_el = torch.empty((), dtype=compute_dtype).element_size()
    svd_b = max((svd_bytes(s) for s in shapes), default=0)
    resident = sum(source.tensors[n].numel * source.held_dtype(n, compute_dtype).itemsize
                   for n in source.other_names()) if tokens else 0
    hidden_b = 2 * tokens * hidden * comp_el + (3 * 4 * BLOCK_ELEMENTS if tokens else 0)  # + a block of logits
    out_buffer = layer // 4 * out_el  # one layer's output (the writer spills units to disk)
    peak = BASE_BYTES + layer + svd_b + out_buffer + resident + hidden_b
    need = sum(entry_bytes(s, needed_rank(s, min_ratio)) for s in shapes)
    cap = cache.max_bytes if cache is not None else None
    mode = "factors"
    if cache is not None:
        budget = shutil.disk_usage(cache.root).free // 2
        if cap is not None:
            budget = min(budget, cap)
        if need > budget:
            mode, need = "values", sum(4 * min(s) for s in shapes)
    return MemoryPlan(estimated_peak_bytes=int(peak), largest_layer_bytes=int(layer), svd_bytes=int(svd_b),
                      resident_bytes=int(resident), hidden_bytes=int(hidden_b), model_bytes=source.numel() * 4,
                      layers=source.n_layers, cache_bytes=int(need), cache_mode=mode, cache_cap_bytes=cap)


def resident_plan(model, cache: Optional[SpectrumCache] = None, compress: bool = True) -> MemoryPlan:
    """The plan of a model held whole in memory (below the streaming threshold): measured here, the
    in-memory compression peaks near 1.5× the model's own bytes."""
    from ..targets import target_names

    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    shapes = [tuple(model.get_submodule(n).weight.shape) for n in target_names(model)] if compress else []
    svd_b = max((svd_bytes(s) for s in shapes), default=0)
    layers = len(getattr(model.model, "layers", []))
    need = sum(entry_bytes(s, min(s)) for s in shapes)
    return MemoryPlan(estimated_peak_bytes=int(BASE_BYTES + (1.5 if compress else 1.0) * model_bytes + svd_b),
                      largest_layer_bytes=int(model_bytes / max(layers, 1)), svd_bytes=int(svd_b), resident_bytes=0,
                      hidden_bytes=0, model_bytes=int(model_bytes), layers=layers, cache_bytes=int(need),
                      cache_mode="factors", cache_cap_bytes=cache.max_bytes if cache is not None else None,
                      streamed=False)


def streamable(spec: str, above_gb: float | None = None):
    """The safetensors directory of `spec` when it is to be streamed layer by layer: its float32
    weights pass `stream_above_gb` (CoreSettings; 0 streams every model). None: load it whole."""
    from ..loading import gguf_to_safetensors, resolve
    from ..settings import get_core_settings

    above_gb = get_core_settings().stream_above_gb if above_gb is None else above_gb
    source = resolve(spec)
    if source.kind in ("registry", "gguf"):
        if above_gb > 0:  # a packaged GGUF is small: converting it only to measure it would cost seconds
            return None
        path = gguf_to_safetensors(Path(source.path))
    elif source.kind in ("hf_dir", "welore"):
        path = Path(source.path)
    else:
        return None
    try:
        src = CheckpointSource(path)
    except Exception:
        return None  # not safetensors (.bin weights): the in-memory loader says what is wrong
    return path if src.numel() * 4 > above_gb * 1e9 else None
