"""`compress_checkpoint`: a model spec and a recipe in, a checkpoint out — load, (calibrate,) compress,
check the quality on held-out text, write, and optionally recover with distilled WeLore-COFT.

Shared by the command line and the service's workers. Output paths are checked before any work;
writes are atomic (checkpoint.py), so a failure or a cancel leaves nothing half-written.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint import save_checkpoint, save_merged
from ..errors import InvalidArgument
from ..dtypes import short_name
from ..loading import load_model, output_dtype
from ..outputs import check_outputs
from ..progress import ProgressEvent, ProgressFn, StopFn, check_stop, no_progress
from ..spectrum import SpectrumCache
from .config import RECOVER_DATA, RECOVER_OPTIONS, CompressConfig
from .model import compress_model
from .quality import Quality, advice, held_out_perplexity


def compress_checkpoint(model: str, out: str | Path, config: CompressConfig, *, merged_out: str | Path | None = None,
                        overwrite: bool = False, recover: int = 0, recover_data: Optional[str] = None,
                        device: str | None = None, cache: SpectrumCache | None = None,
                        progress: ProgressFn = no_progress, should_stop: StopFn | None = None) -> dict:
    """Compress `model` by `config`, write a WeLore checkpoint to `out` (and a merged export), and return
    the report as a dict (what `welore compress --json` prints, minus process statistics), with
    `quality` = {perplexity_dense, perplexity, ratio, tokens} on held-out text and `warning` when
    the ratio is poor. `recover` > 0 follows with that many steps of WeLore-COFT distilled from the
    dense source on `recover_data` (default: the shipped general text)."""
    t0 = time.perf_counter()
    out = Path(out)
    check_outputs({"--out": out, "--merged-out": merged_out}, overwrite)
    if recover < 0:
        raise InvalidArgument(f"recover must be ≥ 0 (fine-tuning steps after compression); received {recover}")
    config = config.resolve()
    from ..layerwise.plan import resident_plan, streamable
    from ..loading import resolve

    if resolve(model).kind == "welore":
        raise InvalidArgument(f"{model} is already a WeLore checkpoint; compress its dense source instead")
    streamed = streamable(model)
    if streamed is not None:  # above the size threshold: one decoder layer in memory at a time
        from .streamed.pipeline import compress_spec_streamed

        return compress_spec_streamed(model, streamed, out, config, merged_out=merged_out, overwrite=overwrite,
                                      recover=recover, device=device, cache=cache, progress=progress,
                                      should_stop=should_stop, t0=t0)
    progress(ProgressEvent("load", 0, 1, message=str(model)))
    loaded = load_model(model, device=device)
    progress(ProgressEvent("load", 1, 1, message=str(model)))
    load_seconds = time.perf_counter() - t0
    progress(ProgressEvent("plan", 1, 1, message=str(model), metrics=resident_plan(loaded.model, cache).metrics()))
    tokenizer = loaded.tokenizer
    calib = None
    if config.calibration is not None:
        from .calibration import load_calibration

        calib = load_calibration(tokenizer, config.calibration)
    ppl_dense = tokens = None
    if tokenizer is not None:
        progress(ProgressEvent("quality", 0, 2, message="dense model"))
        ppl_dense, tokens = held_out_perplexity(loaded.model, tokenizer, should_stop)
    report = compress_model(loaded.model, config, calib, cache=cache, progress=progress, should_stop=should_stop)
    check_stop(should_stop)
    dtype = output_dtype(config.dtype, loaded.source)
    if not recover:  # the quality check measures the weights as written (recovery keeps fp32 factors)
        round_weights(loaded.model, dtype)
    quality = None
    if tokenizer is not None:
        progress(ProgressEvent("quality", 1, 2, message="compressed model"))
        ppl, _ = held_out_perplexity(loaded.model, tokenizer, should_stop)
        quality = Quality(ppl_dense, ppl, ppl / ppl_dense, tokens)
        progress(ProgressEvent("quality", 2, 2, metrics={"ratio": quality.ratio}))
    meta = {"kind": "compressed", **report.to_dict(), "quality": quality.to_dict() if quality else None,
            "source": {"model": str(model), "kind": loaded.source.kind, "hash": report.source_hash}}
    progress(ProgressEvent("save", 0, 1, message=str(out)))
    target = out if not recover else out.with_name(f".{out.name}.compressed")
    save_checkpoint(loaded.model, tokenizer, target, meta, overwrite=True if recover else overwrite,
                    dtype=None if recover else dtype)  # before recovery, the fp32 factors are kept
    if merged_out is not None and not recover:
        save_merged(loaded.model, tokenizer, merged_out, overwrite=overwrite, dtype=dtype)
    progress(ProgressEvent("save", 1, 1, message=str(out)))
    del loaded
    training = None
    if recover:
        try:
            training, quality = _recover(str(model), target, out, recover, recover_data or RECOVER_DATA, quality,
                                         merged_out, overwrite, device, progress, should_stop, dtype)
        finally:
            shutil.rmtree(target, ignore_errors=True)
    result = report.to_dict()
    result.update(out=str(out), merged_out=str(merged_out) if merged_out else None, compress_seconds=report.seconds,
                  load_seconds=load_seconds, quality=quality.to_dict() if quality else None,
                  warning=advice(config, quality.ratio, bool(recover)) if quality else None,
                  recovery=training, dtype=short_name(dtype), seconds=time.perf_counter() - t0)
    return result


def _recover(source: str, compressed: Path, out: Path, steps: int, data: str, quality: Optional[Quality],
             merged_out, overwrite: bool, device, progress: ProgressFn, should_stop,
             dtype) -> tuple[dict, Optional[Quality]]:
    """Distilled WeLore-COFT from the dense `source` (the teacher) on `data`, written to `out`."""
    from ..finetune.pipeline import finetune_checkpoint

    r = finetune_checkpoint(str(compressed), out, data=data, steps=steps, teacher=source, overwrite=overwrite,
                            device=device, progress=progress, should_stop=should_stop, dtype=short_name(dtype),
                            **RECOVER_OPTIONS)
    lm = load_model(str(out), device=device)
    if merged_out is not None:
        save_merged(lm.model, lm.tokenizer, merged_out, overwrite=overwrite, dtype=dtype)
    if quality is not None:
        ppl, _ = held_out_perplexity(lm.model, lm.tokenizer, should_stop)
        quality = Quality(quality.perplexity_dense, ppl, ppl / quality.perplexity_dense, quality.tokens,
                          perplexity_before_recovery=quality.perplexity)
    keep = ("steps", "tokens_per_s", "seconds", "val", "loss_curve")
    return {k: r[k] for k in keep if k in r} | {"data": data, "teacher": source}, quality


def round_weights(model, dtype) -> None:
    """Round every parameter to `dtype` in place, keeping its own dtype: the model then computes
    what its checkpoint written in `dtype` computes once loaded."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.copy_(p.to(dtype))
