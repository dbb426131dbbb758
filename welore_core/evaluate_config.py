"""Evaluation's options (`welore eval`, evaluate jobs): perplexity on fixed, non-overlapping windows.

Torch-free: `EvaluateConfig`'s fields carry their help and range (`OPTIONS`, welore_core/options.py),
from which the `welore eval` flags, the REST params of evaluate jobs and the worker's call are derived.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .options import check_options, flat_kwargs, opt, option_table

SEQ_LEN, WINDOWS = 512, 24
DEFAULT_DATA = "boolq"  # what an evaluate job reads when its params name no data


@dataclass(frozen=True)
class EvaluateConfig:
    seq_len: int = field(default=SEQ_LEN, metadata=opt("tokens per window", lo=2, hi=32_768))
    windows: int = field(default=WINDOWS, metadata=opt(
        "number of windows (the first N full windows of the joined corpus)", lo=1, hi=100_000))

    def __post_init__(self):
        check_options(self, OPTIONS)

    @classmethod
    def from_options(cls, options: dict) -> "EvaluateConfig":
        """A validated config from flat options (CLI flags / REST params by `OPTIONS` name; None = the default)."""
        return cls(**flat_kwargs(options, OPTIONS, "evaluation"))

    def to_dict(self) -> dict:
        return {"seq_len": self.seq_len, "windows": self.windows}


OPTIONS = option_table(EvaluateConfig)
