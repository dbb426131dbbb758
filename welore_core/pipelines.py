"""End-to-end operations on model specs and directories, shared by the command line and the
service's workers: load → compress → write checkpoint; load → evaluate.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from .compress import compress_model
from .corpus import read_texts
from .evaluate import perplexity
from .loading import load_model, require_tokenizer
from .progress import ProgressEvent, ProgressFn, StopFn, check_stop, no_progress
from .checkpoint import save_checkpoint, save_merged
from .spectrum import SpectrumCache


def compress_checkpoint(model: str, out: str | Path, *, err: Optional[float] = None,
                        params_kept: Optional[float] = None, method: str = "welore",
                        min_ratio: float = 0.5, merged_out: str | Path | None = None,
                        overwrite: bool = False, device: str | None = None,
                        cache: SpectrumCache | None = None, progress: ProgressFn = no_progress,
                        should_stop: StopFn | None = None, calibration: str | None = None,
                        calib_samples: int | None = None, calib_seq_len: int | None = None,
                        factorization: str | None = None, rank_from: str = "weights",
                        sequential: bool = False, alpha: float | None = None,
                        damp: float | None = None, sink_weight: float | None = None,
                        compensate: bool = False) -> dict:
    """Compress `model` and write a WeLore checkpoint to `out` (and a merged export). Returns
    the report as a dict (what `welore compress --json` prints, minus process statistics).

    Calibrated WeLore: `calibration` names the data (a .txt/.jsonl file or a built-in name);
    its first `calib_samples` windows of `calib_seq_len` tokens are used. `factorization`
    "plain" | "whitened" | "scaled" (None: whitened with calibration, plain without);
    `rank_from` "weights" | "activations"; `sequential`; `alpha` (scaled); `damp` (whitened);
    `sink_weight` (the weight of each window's first token in the statistics); `compensate`
    (sequential whitened: o_proj/down_proj fitted to the dense blocks' outputs).
    None means the default of calibration.py / whiten.py. See compress.compress_model."""
    t0 = time.perf_counter()
    from .layerwise.plan import streamable

    streamed = streamable(model) if calibration is None else None
    if streamed is not None:  # above the size threshold: one decoder layer in memory at a time
        from .layerwise.compress import compress_spec_streamed

        return compress_spec_streamed(model, streamed, out, err=err, params_kept=params_kept, method=method,
                                      min_ratio=min_ratio, merged_out=merged_out, overwrite=overwrite,
                                      device=device, cache=cache, progress=progress, should_stop=should_stop, t0=t0)
    progress(ProgressEvent("load", 0, 1, message=str(model)))
    loaded = load_model(model, device=device)
    progress(ProgressEvent("load", 1, 1, message=str(model)))
    load_seconds = time.perf_counter() - t0
    from .layerwise.plan import resident_plan

    progress(ProgressEvent("plan", 1, 1, message=str(model), metrics=resident_plan(loaded.model, cache).metrics()))
    calib = None
    if calibration is not None:
        from .calibration import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, load_calibration

        calib = load_calibration(loaded.tokenizer, calibration, calib_samples or DEFAULT_SAMPLES,
                                 calib_seq_len or DEFAULT_SEQ_LEN)
    report = compress_model(loaded.model, err=err, params_kept=params_kept, method=method,
                            min_ratio=min_ratio, cache=cache, progress=progress, should_stop=should_stop,
                            calibration=calib, factorization=factorization, rank_from=rank_from,
                            sequential=sequential, alpha=alpha, damp=damp, sink_weight=sink_weight,
                            compensate=compensate)
    check_stop(should_stop)
    meta = {"kind": "compressed", **report.to_dict(),
            "source": {"model": str(model), "kind": loaded.source.kind, "hash": report.source_hash}}
    progress(ProgressEvent("save", 0, 1, message=str(out)))
    save_checkpoint(loaded.model, loaded.tokenizer, out, meta, overwrite=overwrite)
    if merged_out is not None:
        save_merged(loaded.model, loaded.tokenizer, merged_out, overwrite=overwrite)
    progress(ProgressEvent("save", 1, 1, message=str(out)))
    result = report.to_dict()
    result.update(out=str(out), merged_out=str(merged_out) if merged_out else None,
                  compress_seconds=report.seconds, load_seconds=load_seconds,
                  seconds=time.perf_counter() - t0)
    return result


def evaluate_model(model: str, data: str, *, seq_len: int = 512, windows: int = 24,
                   device: str | None = None, progress: ProgressFn = no_progress,
                   should_stop: StopFn | None = None) -> dict:
    """Perplexity of `model` on `data`; a model above the streaming threshold runs layer by layer."""
    from .layerwise.plan import streamable

    texts = read_texts(data)
    streamed = streamable(model)
    if streamed is not None:
        from .layerwise.evaluate import evaluate_streamed

        result, plan = evaluate_streamed(streamed, texts, seq_len, windows, device=device, progress=progress,
                                         should_stop=should_stop)
        return {"model": str(model), "data": str(data), **result.to_dict(), "streamed": True,
                "memory_plan": plan.metrics()}
    loaded = load_model(model, device=device)
    from .layerwise.plan import resident_plan

    progress(ProgressEvent("plan", 1, 1, message=str(model),
                           metrics=resident_plan(loaded.model, compress=False).metrics()))
    result = perplexity(loaded.model, require_tokenizer(loaded), texts, seq_len, windows, progress=progress,
                        should_stop=should_stop)
    return {"model": str(model), "data": str(data), **result.to_dict()}
