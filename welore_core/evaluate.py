"""Perplexity on a corpus: fixed, non-overlapping windows of tokens, deterministic.

Texts are joined by blank lines and tokenised; the first `windows` windows of `seq_len`
tokens are scored (each predicts its tokens 2..L from the preceding ones). Perplexity is
exp(mean negative log-likelihood over all scored tokens).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .errors import InvalidArgument, InvalidData
from .evaluate_config import SEQ_LEN, WINDOWS
from .progress import ProgressEvent, ProgressFn, StopFn, check_stop, no_progress
from .scoring import head_weight, nll_sum

SEPARATOR = "\n\n"


@dataclass
class EvalResult:
    perplexity: float
    loss: float  # mean NLL per scored token
    tokens: int  # scored tokens
    windows: int
    seq_len: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def token_windows(tokenizer, texts: list[str], seq_len: int, windows: int) -> torch.Tensor:
    """(w, seq_len) token ids: the first w ≤ `windows` full windows of the joined corpus."""
    if seq_len < 2 or windows < 1:
        raise InvalidArgument(f"seq_len must be ≥ 2 and windows ≥ 1; received seq_len={seq_len}, "
                              f"windows={windows}")
    need = seq_len * windows
    ids: list[int] = []
    start, chars = 0, max(need * 8, 4096)  # tokenise only as much text as the windows need
    while start < len(texts) and len(ids) < need:
        take, size = [], 0
        while start < len(texts) and size < chars:
            take.append(texts[start])
            size += len(texts[start])
            start += 1
        prefix = SEPARATOR if ids else ""
        ids.extend(tokenizer(prefix + SEPARATOR.join(take), add_special_tokens=False)["input_ids"])
    n = min(len(ids) // seq_len, windows)
    if n == 0:
        raise InvalidData(f"the corpus has {len(ids)} tokens, fewer than one window of seq_len={seq_len}; "
                          "use more text or a smaller --seq-len")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, texts: list[str], seq_len: int = SEQ_LEN, windows: int = WINDOWS,
               batch_size: int = 1, progress: ProgressFn = no_progress,
               should_stop: StopFn | None = None) -> EvalResult:
    t0 = time.perf_counter()
    data = token_windows(tokenizer, texts, seq_len, windows)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    weight = head_weight(model) if hasattr(model, "model") else None
    nll, count = 0.0, 0
    for i in range(0, data.shape[0], batch_size):
        check_stop(should_stop)
        batch = data[i:i + batch_size].to(device)
        targets = batch[:, 1:].reshape(-1)
        if weight is not None:  # the head a block of the vocabulary at a time (no L × vocab logits)
            h = model.model(input_ids=batch).last_hidden_state[:, :-1]  # (b, L-1, hidden), final norm applied
            nll += nll_sum(h.reshape(-1, h.shape[-1]), weight, targets, dtype=h.dtype)
        else:
            logits = model(input_ids=batch).logits.float()  # (b, L, vocab)
            nll += float(nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets,
                                                     reduction="sum"))
        count += batch[:, 1:].numel()
        progress(ProgressEvent("eval", min(i + batch_size, data.shape[0]), data.shape[0],
                               metrics={"ppl": math.exp(nll / count)}))
    model.train(was_training)
    loss = nll / count
    return EvalResult(perplexity=math.exp(loss) if loss < 700 else float("inf"), loss=loss, tokens=count,
                      windows=data.shape[0], seq_len=seq_len, seconds=time.perf_counter() - t0)
