"""The Python API's `finetune(model, data, ...)` (re-exported by python_api and `welore_core`):
in-memory models and training data in, the trained model out. Torch loads when it is called.

`welore_core.finetune`, the package, is callable and calls this function (see __init__.py): the
package and the function share the name."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Iterable

from ..errors import InvalidArgument


def finetune(model, data, *, tokenizer=None, out=None, **options):
    """Fine-tune `model` (a checkpoint path or spec, or an in-memory transformers model with
    `tokenizer`) on `data` (a file path or built-in name, or texts / {"text"} or {"prompt",
    "completion"} dicts / a datasets.Dataset) and return the trained model. `out` keeps the
    written checkpoint (default: a temporary directory, removed); `options` are FinetuneConfig
    fields (method, steps, lr, batch_size, seq_len, teacher, dtype, ...) and `merged_out`."""
    from ..loading import LoadedModel, ModelSource
    from .pipeline import finetune_run

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
