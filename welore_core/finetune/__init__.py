"""WeLore-COFT fine-tuning (train only the low-rank factors of a compressed model) with full
fine-tuning and LoRA baselines, and the metrics that compare them.

Public entry point: `finetune_checkpoint(model, out, data=..., method=...)` (pipeline.py).
Modules: config (settings), data (files → sequences → batches), methods (what trains),
loss (chunked LM-head cross-entropy), trainer (the loop, resume), metrics (memory,
validation, accuracy), pipeline (load → train → write).
The names below import lazily, so `finetune.config` (torch-free) loads without torch.
"""

import importlib

_HOME = {"finetune_checkpoint": "pipeline", "METRICS_FILE": "pipeline", "STATE_FILE": "pipeline",
         "FinetuneConfig": "config", "METHODS": "config"}
__all__ = list(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
