"""The fine-tuning run's settings as one dataclass, validated once, saved next to checkpoints.

`run_key()` holds the settings that change the numbers a run computes (method, data order,
schedule, precision...): resuming is only allowed when it is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from ..dtypes import DTYPE_CHOICES
from ..errors import InvalidArgument

METHODS = ("welore", "full", "lora")
PRECISIONS = ("auto", "fp32", "bf16")
FROZEN_DTYPES = ("auto", "bf16", "fp32")
DATA_FORMATS = ("auto", "text", "prompt_completion", "boolq", "commonsenseqa")

# Settings that do not change what is computed (only when it is reported or saved).
_NOT_IN_KEY = {"eval_every", "save_every", "timing_warmup_steps", "choice_examples", "dtype"}


@dataclass
class FinetuneConfig:
    method: str = "welore"  # welore (COFT: LRC factors only) | full | lora
    steps: int = 100  # optimizer steps
    lr: float = 2e-4  # peak learning rate
    batch_size: int = 4  # sequences per micro-batch
    seq_len: int = 256  # tokens per sequence (packed text) / maximum (prompt+completion)
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup_steps: int = -1  # linear warm-up; -1: 6% of steps (at least 1)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    eval_every: int = 0  # validation every N steps (0: before and after only)
    save_every: int = 0  # resumable checkpoint every N steps (0: only the final one)
    freeze_norms: bool = False  # welore: freeze RMSNorm weights too
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    seed: int = 0
    data_format: str = "auto"  # see data.py
    val_fraction: float = 0.1  # share of documents/examples held out (by content hash)
    val_sequences: int = 32  # at most this many held-out sequences are scored
    choice_examples: int = 100  # held-out multiple-choice examples scored for accuracy (tasks)
    gradient_checkpointing: bool = False
    precision: str = "auto"  # auto: bf16 autocast on GPU (or with bf16 frozen weights), fp32 on CPU
    frozen_dtype: str = "auto"  # frozen weights held in: auto = bf16 on GPU unless precision fp32, else fp32
    timing_warmup_steps: int = 2  # steps left out of tokens/s and step time
    teacher: str = ""  # distil from this model (spec as for load_model); "" = plain next-token loss
    distill_weight: float = 1.0  # with a teacher: loss = (1 − w)·CE + w·KL(teacher ‖ student)
    dtype: str = "auto"  # dtype of the written weights: auto (the source's) | bf16 | fp16 | fp32

    def resolved_warmup(self) -> int:
        if self.warmup_steps >= 0:
            return min(self.warmup_steps, self.steps)
        return max(1, math.ceil(0.06 * self.steps))

    def resolved_frozen_dtype(self, device_type: str) -> str:
        """bf16 | fp32: the dtype frozen weights are held in during training on `device_type`."""
        if self.frozen_dtype != "auto":
            return self.frozen_dtype
        return "bf16" if device_type == "cuda" and self.precision != "fp32" else "fp32"

    def resolved_bf16(self, device_type: str) -> bool:
        """Whether the matrix products run under bf16 autocast (always with bf16 frozen weights)."""
        if self.precision != "auto":
            return self.precision == "bf16"
        return device_type == "cuda" or self.resolved_frozen_dtype(device_type) == "bf16"

    def validate(self) -> "FinetuneConfig":
        def bad(name, expected):
            raise InvalidArgument(f"{name} must be {expected}; received {getattr(self, name)!r}")

        if self.method not in METHODS:
            bad("method", f"one of {', '.join(METHODS)}")
        if self.precision not in PRECISIONS:
            bad("precision", f"one of {', '.join(PRECISIONS)}")
        if self.frozen_dtype not in FROZEN_DTYPES:
            bad("frozen_dtype", f"one of {', '.join(FROZEN_DTYPES)}")
        if self.frozen_dtype == "bf16" and self.precision == "fp32":
            raise InvalidArgument("frozen_dtype bf16 computes under bf16 autocast, but precision fp32 was asked "
                                  "for; received precision 'fp32' with frozen_dtype 'bf16'. Pass --precision bf16 "
                                  "(or auto), or --frozen-dtype fp32")
        if self.data_format not in DATA_FORMATS:
            bad("data_format", f"one of {', '.join(DATA_FORMATS)}")
        for name in ("steps", "batch_size", "grad_accum", "lora_rank"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "a positive integer")
        if not isinstance(self.seq_len, int) or self.seq_len < 8:
            bad("seq_len", "an integer ≥ 8")
        for name in ("eval_every", "save_every", "timing_warmup_steps", "choice_examples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                bad(name, "an integer ≥ 0")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            bad("lr", "a number in (0, 1), e.g. 2e-4")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", "between 0 and 1")
        if self.weight_decay < 0 or self.max_grad_norm < 0 or self.lora_alpha <= 0:
            raise InvalidArgument("weight_decay and max_grad_norm must be ≥ 0 and lora_alpha > 0; received "
                                  f"{self.weight_decay}, {self.max_grad_norm}, {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            bad("lora_dropout", "in [0, 1)")
        if not 0 < self.val_fraction < 1:
            bad("val_fraction", "strictly between 0 and 1 (e.g. 0.1)")
        if not 0 < self.distill_weight <= 1:
            bad("distill_weight", "in (0, 1] (1: match the teacher only; 0.5: half next-token loss)")
        if self.dtype not in DTYPE_CHOICES:
            bad("dtype", f"one of {', '.join(DTYPE_CHOICES)}")
        if self.val_sequences < 1:
            bad("val_sequences", "a positive integer")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def run_key(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in _NOT_IN_KEY}

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
