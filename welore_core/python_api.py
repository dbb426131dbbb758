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

import json
import tempfile
from pathlib import Path
from typing import Iterable, Optional

from .errors import InvalidArgument
from .progress import ProgressFn, no_progress


def compress(model, config, *, tokenizer=None, progress: ProgressFn = no_progress):
    """Compress `model` (a transformers Llama-family causal LM) in place by the recipe `config`
    (a CompressConfig) and return it. A calibrated recipe reads its text through `tokenizer`."""
    from .checkpoint import factored_modules
    from .compression import compress_model
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


def finetune(model, data, *, tokenizer=None, out=None, **options):
    """Fine-tune `model` (a checkpoint path or spec, or an in-memory transformers model with
    `tokenizer`) on `data` (a file path or built-in name, or texts / {"text"} or {"prompt",
    "completion"} dicts / a datasets.Dataset) and return the trained model. `out` keeps the
    written checkpoint (default: a temporary directory, removed); `options` are FinetuneConfig
    fields (method, steps, lr, batch_size, seq_len, teacher, dtype, ...) and `merged_out`."""
    from .finetune.pipeline import finetune_run
    from .loading import LoadedModel, ModelSource

    if not isinstance(model, (str, Path)):
        if tokenizer is None:
            raise InvalidArgument("finetune(model, ...) of an in-memory model needs its tokenizer: "
                                  "finetune(model, data, tokenizer=tok)")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        spec = getattr(model.config, "_name_or_path", "") or "in-memory model"
        model = LoadedModel(model, tokenizer, ModelSource(spec, "memory", ""), getattr(model, "welore_meta", None))
    with tempfile.TemporaryDirectory(prefix="welore-finetune-") as tmp:
        data_spec = data if isinstance(data, (str, Path)) else _write_jsonl(data, Path(tmp) / "data.jsonl")
        _, trained = finetune_run(model if isinstance(model, LoadedModel) else str(model),
                                  Path(out) if out is not None else Path(tmp) / "out", data=str(data_spec), **options)
    return trained


def _write_jsonl(items: Iterable, path: Path) -> Path:
    """In-memory training data as the JSONL file the data readers take."""
    n = 0
    with open(path, "w") as f:
        for item in items:
            row = {"text": item} if isinstance(item, str) else dict(item)
            f.write(json.dumps(row) + "\n")
            n += 1
    if not n:
        raise InvalidArgument("finetune: the given data holds no examples; pass texts, example dicts or a file")
    return path
