"""compress_checkpoint's streamed branch: a model above the size threshold (plan.streamable),
compressed by its recipe one decoder layer at a time, with the same quality check (perplexity of
dense and compressed on the shipped held-out slice, both streamed) and the same result keys.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


from ...errors import InvalidArgument
from ...progress import ProgressEvent, ProgressFn, StopFn, no_progress
from ...spectrum import SpectrumCache
from .compress import compress_streamed
from ...layerwise.hidden import layered_perplexity
from ...layerwise.layers import StreamedLayers
from ...layerwise.source import CheckpointSource

def compress_spec_streamed(model: str, path: Path, out: str | Path, config, *, merged_out=None, overwrite: bool = False,
                           recover: int = 0, device: str | None = None, cache: SpectrumCache | None = None,
                           progress: ProgressFn = no_progress, should_stop: StopFn | None = None,
                           t0: float | None = None) -> dict:
    """Compress `model` (the spec; its safetensors directory `path`) by `config` into `out`, streamed."""
    from ..quality import SEQ_LEN, WINDOWS, QUALITY_DATA, Quality, advice
    from ...corpus import read_texts
    from ...evaluate import token_windows
    from ...loading import load_tokenizer, output_dtype, pick_device, pick_dtype, resolve

    t0 = time.perf_counter() if t0 is None else t0
    if recover:
        raise InvalidArgument(f"--recover fine-tunes with the dense teacher in memory, and {model} is above the "
                              "streaming threshold (WELORE_STREAM_ABOVE_GB), so it is compressed layer by layer; "
                              "compress without --recover, then run `welore finetune` on a machine that holds it")
    config = config.resolve()
    dev = pick_device(device)
    compute = pick_dtype(dev)
    if cache is None:
        cache = SpectrumCache.configured()
    source = CheckpointSource(path)
    tokenizer = load_tokenizer(str(path))
    calib = None
    if config.calibrated:
        from ..calibration import load_calibration

        calib = load_calibration(tokenizer, config.calibration)

    def held_out(directory: Path, factored=None) -> tuple[float, int]:
        store = StreamedLayers(directory, factored=factored, device=dev, dtype=compute)
        seq_len = min(SEQ_LEN, getattr(store.config, "max_position_embeddings", SEQ_LEN) or SEQ_LEN)
        tokens = token_windows(tokenizer, read_texts(QUALITY_DATA), seq_len, WINDOWS)
        r = layered_perplexity(store, tokens, should_stop=should_stop)
        return r.perplexity, r.tokens

    ppl_dense = tokens = None
    if tokenizer is not None:
        progress(ProgressEvent("quality", 0, 2, message="dense model (streamed)"))
        ppl_dense, tokens = held_out(path)
    report, extra = compress_streamed(
        path, out, config, calibration=calib, cache=cache, dtype=output_dtype(config.dtype, resolve(model)),
        device=dev, compute_dtype=compute, overwrite=overwrite, merged_out=merged_out, progress=progress,
        should_stop=should_stop, tokenizer=tokenizer, source={"model": str(model), "kind": resolve(model).kind})
    quality = None
    if tokenizer is not None:
        progress(ProgressEvent("quality", 1, 2, message="compressed model (streamed)"))
        meta_path = Path(out) / "welore.json"
        meta = json.loads(meta_path.read_text())
        ppl, _ = held_out(Path(out), meta["factored"])
        quality = Quality(ppl_dense, ppl, ppl / ppl_dense, tokens)
        meta["quality"] = quality.to_dict()
        tmp = meta_path.with_name(".welore.json.tmp")
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, meta_path)
        progress(ProgressEvent("quality", 2, 2, metrics={"ratio": quality.ratio}))
    result = report.to_dict()
    result.update(out=str(out), merged_out=str(merged_out) if merged_out else None, compress_seconds=report.seconds,
                  load_seconds=0.0, quality=quality.to_dict() if quality else None,
                  warning=advice(config, quality.ratio, False) if quality else None, recovery=None,
                  seconds=time.perf_counter() - t0, streamed=True, memory_plan=extra["memory_plan"],
                  cache=extra["cache"], resumed_layers=extra["resumed_layers"])
    return result
