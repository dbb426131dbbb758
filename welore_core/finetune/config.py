"""The fine-tuning run's settings as one dataclass, validated once, saved next to checkpoints.

Torch-free: every field carries its help and range (`OPTIONS`, welore_core/options.py), from which the
`welore finetune` flags, the REST params and the worker's call are derived.
`run_key()` holds the settings that change the numbers a run computes (method, data order,
schedule, precision...): resuming is only allowed when it is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from ..dtypes import DTYPE_CHOICES
from ..errors import InvalidArgument
from ..options import check_options, flat_kwargs, opt, option_table

METHODS = ("welore", "full", "lora")
PRECISIONS = ("auto", "fp32", "bf16")
FROZEN_DTYPES = ("auto", "bf16", "fp32")
DATA_FORMATS = ("auto", "text", "prompt_completion", "boolq", "commonsenseqa")

# Settings that do not change what is computed (only when it is reported or saved).
_NOT_IN_KEY = {"eval_every", "save_every", "timing_warmup_steps", "choice_examples", "dtype"}


MAX_STEPS = 1_000_000


@dataclass
class FinetuneConfig:
    """Every field is an option (`OPTIONS`): the `welore finetune` flags, the REST params of finetune jobs
    and the worker's call are derived from this table, so each default and range is written here once."""

    method: str = field(default="welore", metadata=opt(
        "welore: WeLore-COFT, only the factors of the Low-Rank Components train; full: every weight; "
        "lora: peft LoRA adapters on a dense model", choices=METHODS))
    steps: int = field(default=100, metadata=opt("optimizer steps", lo=1, hi=MAX_STEPS))
    lr: float = field(default=2e-4, metadata=opt("peak learning rate", lo=0, hi=1, lo_open=True, hi_open=True))
    batch_size: int = field(default=4, metadata=opt("sequences per micro-batch", lo=1, hi=4096))
    seq_len: int = field(default=256, metadata=opt(
        "tokens per sequence (packed text) / at most (prompt + completion)", lo=8, hi=32_768))
    grad_accum: int = field(default=1, metadata=opt("micro-batches per optimizer step", lo=1, hi=1024))
    warmup_steps: int = field(default=-1, metadata=opt(
        "linear warm-up steps; -1: 6% of the steps (at least 1)", lo=-1, hi=MAX_STEPS))
    min_lr_ratio: float = field(default=0.1, metadata=opt(
        "the cosine schedule decays to lr × this fraction", lo=0, hi=1))
    weight_decay: float = field(default=0.0, metadata=opt("AdamW weight decay", lo=0, hi=10))
    max_grad_norm: float = field(default=1.0, metadata=opt("gradient clipping norm (0: off)", lo=0, hi=1e6))
    eval_every: int = field(default=0, metadata=opt(
        "validate every N steps (0: before and after only)", lo=0, hi=MAX_STEPS))
    save_every: int = field(default=0, metadata=opt(
        "write a resumable checkpoint every N steps (0: only the final one)", lo=0, hi=MAX_STEPS))
    freeze_norms: bool = field(default=False, metadata=opt("welore: freeze the RMSNorm weights as well"))
    lora_rank: int = field(default=8, metadata=opt("lora: adapter rank", lo=1, hi=4096))
    lora_alpha: float = field(default=16.0, metadata=opt("lora: adapter scale α", lo=0, hi=1e6, lo_open=True))
    lora_dropout: float = field(default=0.0, metadata=opt("lora: adapter dropout", lo=0, hi=1, hi_open=True))
    seed: int = field(default=0, metadata=opt("seed of the data order and the initialisation", lo=0,
                                              hi=2**31 - 1))
    data_format: str = field(default="auto", metadata=opt(
        "how to read the data (auto: detected from the first JSONL object; see finetune/data.py)",
        choices=DATA_FORMATS))
    val_fraction: float = field(default=0.1, metadata=opt(
        "share of the documents/examples held out for validation (by content hash)", lo=0, hi=1, lo_open=True,
        hi_open=True))
    val_sequences: int = field(default=32, metadata=opt("at most this many held-out sequences are scored",
                                                        lo=1, hi=100_000))
    choice_examples: int = field(default=100, metadata=opt(
        "held-out multiple-choice items scored for accuracy (BoolQ/CommonsenseQA)", lo=0, hi=100_000))
    gradient_checkpointing: bool = field(default=False, metadata=opt("recompute activations to save memory"))
    precision: str = field(default="auto", metadata=opt(
        "auto: bf16 autocast on a GPU (or with bf16 frozen weights), fp32 on a CPU; bf16: autocast on either "
        "(fp32 weights and optimizer state; ~2x faster on CPUs with AVX-512 BF16)", choices=PRECISIONS))
    frozen_dtype: str = field(default="auto", metadata=opt(
        "dtype the frozen weights (N-LRCs, embeddings, LM head, frozen norms) are held in while training; "
        "trainable factors keep fp32 master weights, gradients and AdamW state. auto: bf16 on a GPU (unless "
        "precision fp32), fp32 on a CPU. bf16 computes under bf16 autocast", choices=FROZEN_DTYPES))
    timing_warmup_steps: int = field(default=2, metadata=opt("steps left out of tokens/s and step time",
                                                             lo=0, hi=MAX_STEPS))
    teacher: str = field(default="", metadata=opt(
        "distil from this model (same tokenizer), e.g. the one the checkpoint was compressed from: the loss "
        "matches its next-token distribution; empty: plain next-token loss"))
    distill_weight: float = field(default=1.0, metadata=opt(
        "with a teacher: loss = (1 − w)·cross-entropy + w·KL(teacher ‖ model)", lo=0, hi=1, lo_open=True))
    dtype: str = field(default="auto", metadata=opt(
        "dtype of the written weights: auto (the source's), bf16, fp16 or fp32", choices=DTYPE_CHOICES))

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
        check_options(self, OPTIONS)
        if self.frozen_dtype == "bf16" and self.precision == "fp32":
            raise InvalidArgument("frozen_dtype bf16 computes under bf16 autocast, but precision fp32 was asked "
                                  "for; received precision 'fp32' with frozen_dtype 'bf16'. Pass --precision bf16 "
                                  "(or auto), or --frozen-dtype fp32")
        return self

    @classmethod
    def from_options(cls, options: dict) -> "FinetuneConfig":
        """A validated config from flat options (CLI flags / REST params by `OPTIONS` name; None = the default)."""
        return cls(**flat_kwargs(options, OPTIONS, "fine-tuning")).validate()

    def to_dict(self) -> dict:
        return asdict(self)

    def run_key(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in _NOT_IN_KEY}

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


OPTIONS = option_table(FinetuneConfig)
