"""WeLore-COFT fine-tuning (train only the low-rank factors of a compressed model) with full
fine-tuning and LoRA baselines, and the metrics that compare them.

Public entry point: `finetune_checkpoint(model, out, data=..., method=...)` (pipeline.py).
Modules: config (settings), data (files → sequences → batches), methods (what trains),
loss (chunked LM-head cross-entropy), trainer (the loop, resume), metrics (memory,
validation, accuracy), pipeline (load → train → write).
"""

from .config import METHODS, FinetuneConfig
from .pipeline import METRICS_FILE, STATE_FILE, finetune_checkpoint

__all__ = ["finetune_checkpoint", "FinetuneConfig", "METHODS", "METRICS_FILE", "STATE_FILE"]
