"""From singular triplets to stored weights: the factors of an LRC or its truncated dense Ŵ.

A = √S_k·V_kᵀ (k×n), B = U_k·√S_k (m×k), so B·A = U_k·S_k·V_kᵀ, the best rank-k
approximation of W.
"""

from __future__ import annotations

import torch


def factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (k×n) and B (m×k) from the leading k triplets."""
    root = S[:k].sqrt()
    A = root[:, None] * Vh[:k]  # k×n
    B = U[:, :k] * root[None, :]  # m×k
    return A.contiguous(), B.contiguous()


def truncated(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int) -> torch.Tensor:
    """Ŵ = U_k·diag(S_k)·V_kᵀ (m×n)."""
    return (U[:, :k] * S[:k][None, :]) @ Vh[:k]
