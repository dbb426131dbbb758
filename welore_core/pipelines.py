"""Evaluation of a model spec, shared by the command line and the service's workers (compression's
pipeline lives in compression/pipeline.py)."""

from __future__ import annotations

from pathlib import Path

from .corpus import read_texts
from .evaluate import perplexity
from .loading import load_model, require_tokenizer
from .progress import ProgressFn, StopFn, no_progress


def evaluate_model(model: str, data: str, *, seq_len: int = 512, windows: int = 24,
                   device: str | None = None, progress: ProgressFn = no_progress,
                   should_stop: StopFn | None = None) -> dict:
    texts = read_texts(data)
    loaded = load_model(model, device=device)
    result = perplexity(loaded.model, require_tokenizer(loaded), texts, seq_len, windows, progress=progress,
                        should_stop=should_stop)
    return {"model": str(model), "data": str(data), **result.to_dict()}
