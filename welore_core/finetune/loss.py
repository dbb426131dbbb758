"""Next-token cross-entropy computed from the last hidden states without materialising the
full (tokens × vocab) logits: the LM head runs only on scored positions, in chunks, and the
gradients for the hidden states (and the head weight, when it trains) are formed chunk by
chunk during the forward pass. Same numbers as `F.cross_entropy(lm_head(h))`, a fraction
of the memory (one chunk of logits instead of ~4 full copies), no recomputation.
"""

from __future__ import annotations

import torch
from torch import nn

from .data import IGNORE

CHUNK_ELEMENTS = 1 << 23  # logits elements per chunk (32 MiB in float32)


def _chunk_rows(vocab: int) -> int:
    return max(16, CHUNK_ELEMENTS // max(vocab, 1))


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, compute_dtype):
        # h: (N, d) scored positions only, weight: (V, d), targets: (N,)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(compute_dtype)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        rows = _chunk_rows(weight.shape[0])
        for s in range(0, h.shape[0], rows):
            x = h[s:s + rows].to(compute_dtype)  # (c, d)
            t = targets[s:s + rows]
            logits = (x @ w.T).float()  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            loss += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_h or need_w:
                p = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                p[torch.arange(p.shape[0], device=p.device), t] -= 1.0  # d loss / d logits
                p = p.to(compute_dtype)
                if need_h:
                    gh[s:s + rows] = (p @ w).to(h.dtype)
                if need_w:
                    gw += (p.T @ x).float()
        ctx.save_for_backward(gh if need_h else None, gw if need_w else None)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, g):
        gh, gw = ctx.saved_tensors
        return (gh * g if gh is not None else None,
                (gw * g).to(ctx.weight_dtype) if gw is not None else None, None, None)


def causal_lm_loss(lm: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   attention_mask: torch.Tensor | None = None,
                   compute_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, int]:
    """(sum of next-token NLL over scored positions, number of scored positions).

    `lm` is a transformers causal LM (model.model → hidden states, model.lm_head). Position
    i's label is predicted from tokens < i (labels aligned with input_ids, as in HF)."""
    out = lm.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (b, L, d)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (b·(L-1), d)
    t = labels[:, 1:].reshape(-1)
    keep = (t != IGNORE).nonzero().squeeze(1)
    h, t = h.index_select(0, keep), t.index_select(0, keep)
    head = lm.lm_head
    weight = head.weight
    if getattr(head, "bias", None) is not None or type(head) is not nn.Linear:
        logits = head(h).float()  # an unusual head: the plain path
        return nn.functional.cross_entropy(logits, t, reduction="sum"), int(t.numel())
    if h.numel() == 0:
        return hidden.sum() * 0.0, 0
    if not torch.is_grad_enabled():  # evaluation: no gradients formed at all
        h, weight = h.detach(), weight.detach()
    return _FusedLinearCE.apply(h, weight, t, compute_dtype), int(t.numel())
