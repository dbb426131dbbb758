"""The Python API in PEFT's spirit (re-exported by `welore_core`): models in, models out.

  compress(model, config, tokenizer=...)  compress a transformers model in place; returns it as
                                          the portable class, so `model.save_pretrained(DIR)`
                                          writes a checkpoint plain transformers loads
                                          (trust_remote_code=True) and `merge_and_unload()`
                                          gives the dense model back
  save(model, DIR, tokenizer=..., dtype=) the same checkpoint in one call of ours (any dtype)
  load(DIR)                               a WeLore checkpoint (or any model welore reads) as a
                                          transformers model, verified against welore.json
  finetune(model | DIR, data | DIR, ...)  WeLore-COFT (or full / LoRA) on texts, examples or a
                                          data file; returns the trained model
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .errors import InvalidArgument
from .finetune.entry import finetune  # the Python API's finetune(model, data, ...) lives with fine-tuning
from .progress import ProgressFn, no_progress

__all__ = ["compress", "save", "load", "finetune"]


def compress(model, config, *, tokenizer=None, progress: ProgressFn = no_progress):
    """Compress `model` (a transformers Llama-family causal LM) in place by the recipe `config`
    (a CompressConfig) and return it. A calibrated recipe reads its text through `tokenizer`."""
    from .checkpoint import factored_modules
    from .compression.model import compress_model
    from .portable import as_factorised

    resolved = config.resolve()
    calibration = None
    if resolved.calibration is not None:
        if tokenizer is None:
            raise InvalidArgument("this recipe is calibrated: pass the model's tokenizer (compress(model, config, "
                                  "tokenizer=tok)), or use a data-free recipe (CompressConfig(..., calibration=None))")
        from .compression.calibration import load_calibration

        calibration = load_calibration(tokenizer, resolved.calibration)
    report = compress_model(model, config, calibration, progress=progress)
    as_factorised(model, factored_modules(model))
    model.welore_meta = {"format_version": 1, "kind": "compressed", **report.to_dict(), "recipe": resolved.to_dict(),
                         "source": {"model": getattr(model.config, "_name_or_path", "") or "in-memory model"}}
    return model


def save(model, out, *, tokenizer=None, dtype: Optional[str] = None, overwrite: bool = False) -> Path:
    """Write `model` as a WeLore checkpoint (welore.json with its report and SHA-256 record) in
    `dtype` ("bf16", "fp16", "fp32"; None: as it is)."""
    from .checkpoint import save_checkpoint
    from .dtypes import to_torch

    meta = dict(getattr(model, "welore_meta", None) or {"kind": "compressed"})
    return save_checkpoint(model, tokenizer, out, meta, overwrite=overwrite,
                           dtype=to_torch(dtype) if dtype not in (None, "auto") else None)


def load(path, *, device: Optional[str] = None, dtype: Optional[str] = None):
    """The transformers model stored at `path` (factorised checkpoints as their portable class,
    verified; welore.json as `model.welore_meta`). `dtype` "bf16" | "fp16" | "fp32" (default: fp32
    on the CPU, bf16 on a GPU)."""
    from .dtypes import to_torch
    from .loading import load_model

    return load_model(str(path), device=device, dtype=to_torch(dtype) if dtype not in (None, "auto") else None).model
