"""Perplexity of a model streamed from its checkpoint one decoder layer at a time.

Memory: the embeddings, final norm and LM head, one decoder layer, and the windows' hidden
states (N × L × hidden) — not the model. The windows and the scoring are evaluate.py's, so the
result equals `evaluate.perplexity` of the same model loaded whole (up to float rounding).
"""

from __future__ import annotations

from pathlib import Path

from ..evaluate import EvalResult, token_windows
from ..evaluate_config import SEQ_LEN, WINDOWS
from ..progress import ProgressFn, ProgressEvent, StopFn, no_progress
from .hidden import layered_perplexity
from .layers import StreamedLayers
from .plan import MemoryPlan, memory_plan
from .source import CheckpointSource


def evaluate_streamed(path: Path | str, texts: list[str], seq_len: int = SEQ_LEN, windows: int = WINDOWS, *,
                      device: str | None = None, progress: ProgressFn = no_progress,
                      should_stop: StopFn | None = None) -> tuple[EvalResult, MemoryPlan]:
    """Perplexity of the (dense or WeLore) checkpoint directory `path` on `texts`, layer by layer."""
    from ..modelfiles import read_config

    from ..checkpoint import META, read_meta, verify_checkpoint
    from ..loading import load_tokenizer, pick_device, pick_dtype, require_tokenizer, LoadedModel, ModelSource

    path = Path(path)
    meta = read_meta(path) if (path / META).is_file() else None
    if meta is not None:
        verify_checkpoint(path, meta)  # a damaged weight file is refused before anything is computed
    factored = meta["factored"] if meta is not None else {}
    tokenizer = load_tokenizer(str(path))
    require_tokenizer(LoadedModel(None, tokenizer, ModelSource(str(path), "hf_dir", str(path))))
    tokens = token_windows(tokenizer, texts, seq_len, windows)
    dev = pick_device(device)
    dtype = pick_dtype(dev)
    source = CheckpointSource(path)
    config = read_config(path)
    plan = memory_plan(source, [], None, None, compute_dtype=dtype, tokens=tokens.numel(),
                       hidden=config.hidden_size)
    progress(ProgressEvent("plan", 1, 1, message=str(path), metrics=plan.metrics()))
    store = StreamedLayers(path, config=config, factored=factored, device=dev, dtype=dtype, source=source)
    return layered_perplexity(store, tokens, progress, should_stop), plan
