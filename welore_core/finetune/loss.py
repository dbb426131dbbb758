"""Next-token cross-entropy computed from the last hidden states without materialising the
full (tokens × vocab) logits: the LM head runs only on scored positions, in chunks, and the
gradients for the hidden states (and the head weight, when it trains) are formed chunk by
chunk during the forward pass. Same numbers as `F.cross_entropy(lm_head(h))`, a fraction
of the memory (one chunk of logits instead of ~4 full copies), no recomputation.

Distillation (`teacher=`): the target of each position becomes the mixture
(1 − w)·onehot(label) + w·softmax(teacher logits), i.e. the loss is
(1 − w)·CE + w·KL(teacher ‖ student) (+ the teacher's entropy, a constant left out of the
value). The teacher's logits are formed chunk by chunk from its last hidden states too.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .data import IGNORE

CHUNK_ELEMENTS = 1 << 23  # logits elements per chunk (32 MiB in float32)


class Teacher(NamedTuple):
    """What distillation needs of the teacher for one micro-batch."""

    hidden: torch.Tensor  # (b, L, d) last hidden states (no grad)
    weight: torch.Tensor  # (V, d) its LM head
    mix: float  # w: share of the target given to the teacher's distribution


def _chunk_rows(vocab: int) -> int:
    return max(16, CHUNK_ELEMENTS // max(vocab, 1))


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, compute_dtype, t_h=None, t_weight=None, mix=0.0):
        # h: (N, d) scored positions only, weight: (V, d), targets: (N,); t_h (N, d), t_weight (V, d): teacher
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(compute_dtype)
        tw = t_weight.to(compute_dtype) if t_h is not None else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        rows = _chunk_rows(weight.shape[0])
        for s in range(0, h.shape[0], rows):
            x = h[s:s + rows].to(compute_dtype)  # (c, d)
            t = targets[s:s + rows]
            logits = (x @ w.T).float()  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            logq = logits.sub_(lse[:, None])  # student log-probabilities, in place
            ce = -logq.gather(1, t[:, None]).squeeze(1)  # (c,)
            if tw is not None:
                logp = torch.log_softmax((t_h[s:s + rows].to(compute_dtype) @ tw.T).float(), dim=-1)  # (c, V)
                kl = (logp.exp() * (logp - logq)).sum(-1)  # KL(teacher ‖ student) per position
                loss += ((1.0 - mix) * ce + mix * kl).sum()
            else:
                loss += ce.sum()
            if need_h or need_w:
                p = logq.exp_()  # softmax, in place
                if tw is not None:
                    p.sub_(logp.exp_().mul_(mix))  # d loss / d logits = q − target, target mixed
                rows_idx = torch.arange(p.shape[0], device=p.device)
                p[rows_idx, t] -= 1.0 - mix
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
                (gw * g).to(ctx.weight_dtype) if gw is not None else None, None, None, None, None, None)


def causal_lm_loss(lm: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   attention_mask: torch.Tensor | None = None,
                   compute_dtype: torch.dtype = torch.float32,
                   teacher: Teacher | None = None) -> tuple[torch.Tensor, int]:
    """(sum of next-token NLL over scored positions, number of scored positions); with a
    `teacher`, the sum of (1 − w)·NLL + w·KL(teacher ‖ student) instead.

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
        if teacher is not None:
            from ..errors import InvalidArgument
            raise InvalidArgument("distillation needs a plain linear LM head (no bias); this model's head is "
                                  f"{type(head).__name__}. Fine-tune without a teacher")
        logits = head(h).float()  # an unusual head: the plain path
        return nn.functional.cross_entropy(logits, t, reduction="sum"), int(t.numel())
    if h.numel() == 0:
        return hidden.sum() * 0.0, 0
    if not torch.is_grad_enabled():  # evaluation: no gradients formed at all
        h, weight = h.detach(), weight.detach()
    if teacher is None:
        return _FusedLinearCE.apply(h, weight, t, compute_dtype), int(t.numel())
    t_h = teacher.hidden[:, :-1].reshape(-1, teacher.hidden.shape[-1]).index_select(0, keep).detach()
    return (_FusedLinearCE.apply(h, weight, t, compute_dtype, t_h, teacher.weight.detach(), float(teacher.mix)),
            int(t.numel()))
