"""The quality check every compression ends with: perplexity of the dense and the compressed model
on a small held-out slice (text shipped with welore, never used for calibration), their ratio, and
a one-line warning naming a better recipe when the ratio passes `WARN_RATIO`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from torch import nn

from ..corpus import read_texts
from ..evaluate import perplexity
from .config import CompressConfig

QUALITY_DATA = "general-heldout"  # welore_core/data/general-heldout.jsonl
WINDOWS, SEQ_LEN = 4, 512
WARN_RATIO = 5.0


@dataclass
class Quality:
    perplexity_dense: float
    perplexity: float
    ratio: float
    tokens: int
    data: str = QUALITY_DATA
    perplexity_before_recovery: Optional[float] = None  # with --recover: the compressed model's, before

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def held_out_perplexity(model: nn.Module, tokenizer, should_stop=None) -> tuple[float, int]:
    seq_len = min(SEQ_LEN, getattr(model.config, "max_position_embeddings", SEQ_LEN) or SEQ_LEN)
    r = perplexity(model, tokenizer, read_texts(QUALITY_DATA), seq_len, WINDOWS, should_stop=should_stop)
    return r.perplexity, r.tokens


def advice(config: CompressConfig, ratio: float, recovered: bool) -> Optional[str]:
    """One warning line when the compressed model is far from the dense one, naming what would do better."""
    if not ratio > WARN_RATIO:
        return None
    kind, value = config.target
    better = []
    if config.calibration is None:
        better.append("calibrated compression (drop --calibration none)")
    elif config.method not in ("auto", "loss"):
        better.append("--method loss")
    if not recovered:
        better.append("--recover 150 (distilled fine-tuning of the low-rank factors)")
    lighter = f"--err {max(0.1, round(value - 0.2, 1))}" if kind == "err" else f"--params-kept {min(0.9, round(value + 0.2, 1))}"
    better.append(f"lighter compression ({lighter})")
    return (f"the compressed model's perplexity is {ratio:.1f}x the dense model's on held-out text (above "
            f"{WARN_RATIO:g}x); for a more usable model try " + ", or ".join(better))
