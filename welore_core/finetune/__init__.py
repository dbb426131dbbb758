"""WeLore-COFT fine-tuning (train only the low-rank factors of a compressed model) with full
fine-tuning and LoRA baselines, and the metrics that compare them.

Public entry point: `finetune_checkpoint(model, out, data=..., method=...)` (pipeline.py).
Modules: config (settings), data (files → sequences → batches), methods (what trains),
loss (chunked LM-head cross-entropy), trainer (the loop, resume), metrics (memory,
validation, accuracy), pipeline (load → train → write).
The names below import lazily, so `finetune.config` (torch-free) loads without torch.

This package is also the Python API's `finetune(model, data, ...)` (entry.py, re-exported by python_api): the
package and the function share the name `welore_core.finetune`, so calling the package calls it.
"""

import importlib
import sys
import types

_HOME = {"finetune_checkpoint": "pipeline", "METRICS_FILE": "pipeline", "STATE_FILE": "pipeline",
         "FinetuneConfig": "config", "METHODS": "config"}
__all__ = list(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from .entry import finetune

        return finetune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
