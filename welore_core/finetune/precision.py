"""Frozen weights held in bf16 while the trainable ones keep fp32 master weights.

`hold_frozen(model, torch.bfloat16)` casts every frozen floating-point parameter (N-LRC dense
weights, embeddings, the LM head, norms when frozen, a LoRA base model) in place, one tensor
at a time; trainable parameters, their gradients and the AdamW state stay fp32. The forward
then runs under bf16 autocast (FinetuneConfig.resolved_bf16), which casts every matrix
product to bf16 anyway, so what changes is storage, not the products. The one op autocast
does not cover is the embedding lookup: its output is cast back to the master dtype by a
forward hook, so the residual stream stays fp32 exactly as with fp32 weights.

`weight_bytes(model)` counts the parameters by dtype, trainable and frozen, for the report.
"""

from __future__ import annotations

import torch
from torch import nn

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _unique(model: nn.Module):
    seen = set()
    for p in model.parameters():  # remove_duplicate=True: a tied LM head is the embedding
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def _to_master_dtype(dtype: torch.dtype):
    def hook(module, args, output):
        return output.to(dtype) if output.is_floating_point() else output
    return hook


def hold_frozen(model: nn.Module, dtype: torch.dtype, master: torch.dtype = torch.float32) -> int:
    """Cast the frozen floating parameters of `model` to `dtype` in place; returns how many
    tensors were cast. Embedding modules whose weight was cast give their output in `master`."""
    if dtype == master:
        return 0
    cast = 0
    with torch.no_grad():
        for p in _unique(model):
            if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)  # the Parameter object stays: ties and module references hold
                cast += 1
    for m in model.modules():
        if isinstance(m, nn.Embedding) and m.weight.dtype == dtype and not getattr(m, "_welore_master", None):
            m.register_forward_hook(_to_master_dtype(master))
            m._welore_master = master
    return cast


def weight_bytes(model: nn.Module) -> dict:
    """Bytes of the model's parameters (each tensor once): by dtype, trainable and frozen."""
    by_dtype: dict[str, int] = {}
    trainable = frozen = 0
    for p in _unique(model):
        n = p.numel() * p.element_size()
        by_dtype[dtype_name(p.dtype)] = by_dtype.get(dtype_name(p.dtype), 0) + n
        if p.requires_grad:
            trainable += n
        else:
            frozen += n
    return {"weight_bytes_by_dtype": by_dtype, "trainable_param_bytes": trainable, "frozen_param_bytes": frozen}
