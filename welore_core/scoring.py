"""Next-token negative log-likelihood from last hidden states (and its gradient, for calibration's
sensitivities), with the LM head applied one block of the vocabulary at a time: never the
(tokens × vocab) logits at once, and a head stored in a narrower dtype (bf16) upcast one block at
a time, never whole.

For a 128k-token vocabulary the full logits of one 512-token window are 263 MB in float32 (and
cross-entropy makes a second copy); a Llama-3-8B's head alone is 2.1 GB in float32. Here the
working set is one block of logits (`BLOCK_ELEMENTS`) and one block of the head. The result is
cross-entropy's (an online log-sum-exp over the blocks; equal within float rounding).
"""

from __future__ import annotations

import torch

BLOCK_ELEMENTS = 1 << 24  # logits elements per block (64 MiB in float32)


@torch.no_grad()
def nll_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
            dtype: torch.dtype = torch.float32) -> float:
    """Σ −log softmax(hidden · weightᵀ)[target] over the rows of `hidden` (N × d), targets (N,);
    `weight` (V × d) is the LM head, computed in `dtype` block by block."""
    n, vocab = hidden.shape[0], weight.shape[0]
    x = hidden.to(dtype)
    targets = targets.to(hidden.device)
    rows = max(256, BLOCK_ELEMENTS // max(n, 1))
    peak = torch.full((n,), -float("inf"), dtype=torch.float32, device=hidden.device)
    total = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    picked = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    for a in range(0, vocab, rows):
        logits = (x @ weight[a:a + rows].to(dtype).T).float()  # (N, block)
        inside = (targets >= a) & (targets < a + logits.shape[1])
        idx = inside.nonzero().squeeze(1)
        picked[idx] = logits[idx, targets[idx] - a]
        new_peak = torch.maximum(peak, logits.max(dim=1).values)
        total = total * torch.exp(peak - new_peak) + torch.exp(logits - new_peak[:, None]).sum(dim=1)
        peak = new_peak
    return float((peak + torch.log(total) - picked).sum())


@torch.no_grad()
def nll_sum_grad(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """∂(Σ −log softmax(hidden · weightᵀ)[target])/∂hidden (N × d, float32) = softmax·W − W[target],
    block by block like `nll_sum`: one pass for the log-sum-exp of every row, one for the gradient."""
    n, vocab = hidden.shape[0], weight.shape[0]
    x = hidden.float()
    targets = targets.to(hidden.device)
    rows = max(256, BLOCK_ELEMENTS // max(n, 1))
    lse = torch.full((n,), -float("inf"), dtype=torch.float32, device=hidden.device)
    for a in range(0, vocab, rows):
        lse = torch.logaddexp(lse, torch.logsumexp(x @ weight[a:a + rows].float().T, dim=1))
    grad = -weight[targets].float()
    for a in range(0, vocab, rows):
        block = weight[a:a + rows].float()
        grad += torch.exp(x @ block.T - lse[:, None]) @ block
    return grad

def head_weight(model) -> torch.Tensor | None:
    """The LM head's weight when it is a plain linear map (no bias), else None."""
    head = model.get_output_embeddings()
    if type(head) is torch.nn.Linear and head.bias is None:
        return head.weight
    return None
