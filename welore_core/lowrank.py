"""The low-rank linear layer (W ≈ B·A) and the one place where modules are swapped.

A LowRankLinear holds A (k×in) and B (out×k): y = B·(A·x) (+ bias). It replaces an
nn.Linear of a decoder block when that matrix is a Low-Rank Component.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LowRankLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))  # k×n
        self.B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))  # m×k
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None) -> "LowRankLinear":
        k, n = A.shape
        m, k2 = B.shape
        assert k == k2, f"factor ranks differ: A is {tuple(A.shape)}, B is {tuple(B.shape)}"
        mod = cls(n, m, 0, bias=False, device="meta", dtype=A.dtype)  # allocate nothing, then adopt
        mod.rank = k
        mod.A = nn.Parameter(A.detach().contiguous())
        mod.B = nn.Parameter(B.detach().contiguous())
        mod.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.B, self.bias)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        return self.B @ self.A  # m×n

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


def swap_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the submodule at dotted `name` by `new`; returns the old one. The only swap."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
