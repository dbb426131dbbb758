"""Evaluation of a model spec, shared by the command line and the service's workers (compression's
pipeline lives in compression/pipeline.py)."""

from __future__ import annotations

from pathlib import Path

from .corpus import read_texts
from .evaluate import perplexity
from .evaluate_config import SEQ_LEN, WINDOWS, EvaluateConfig
from .loading import load_model, require_tokenizer
from .progress import ProgressEvent, ProgressFn, StopFn, no_progress


def evaluate_model(model: str, data: str, *, seq_len: int = SEQ_LEN, windows: int = WINDOWS,
                   device: str | None = None, progress: ProgressFn = no_progress,
                   should_stop: StopFn | None = None) -> dict:
    """Perplexity of `model` on `data`; a model above the streaming threshold runs layer by layer."""
    from .layerwise.plan import streamable

    EvaluateConfig(seq_len=seq_len, windows=windows)  # the ranges of evaluate_config.OPTIONS
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
