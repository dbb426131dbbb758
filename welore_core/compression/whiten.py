"""Calibrated factorisations: truncate W·S instead of W, for an input transform S built from
activation statistics, and map the factors back (pure functions over tensors, float64).

For inputs X (tokens×n) of a matrix W (m×n), the output error of an approximation Ŵ is
‖(W − Ŵ)Xᵀ‖_F² = tr((W − Ŵ)·G·(W − Ŵ)ᵀ) with G = XᵀX. Take any invertible S (n×n), the SVD
W·S = U·Σ·Vᵀ and keep k triplets: Ŵ = U_k·Σ_k·V_kᵀ·S⁻¹, stored as
    A = √Σ_k·V_kᵀ·S⁻¹ (k×n),  B = U_k·√Σ_k (m×k),  B·A = Ŵ,  and Ŵ = W at k = full rank.

- whitened (SVD-LLM, Wang et al. 2024): S·Sᵀ = G + δ·I (Cholesky). Then ‖(W − Ŵ)·S‖_F is the
  output error on the calibration activations (plus δ‖W − Ŵ‖_F²), so the truncation is the
  best rank-k one for those activations; for any δ ≥ 0 it is never worse than the plain SVD
  on them. δ = damp·mean(diag G); when Cholesky fails (G not positive definite, e.g. fewer
  tokens than inputs or dead channels) the damping grows ×100 up to 3 times, then an
  eigendecomposition with clamped eigenvalues gives S = Q·√Λ. What was used is recorded.
- compensated (`compensated_weight`, for the matrix that closes a block): when its inputs X̂ come
  from a block whose other matrices are already compressed while the dense block would give X,
  the target is the dense output W·Xᵀ: W' = W·C·(Ĝ + ρ·I)⁻¹ with C = XᵀX̂, Ĝ = X̂ᵀX̂ is the
  least-squares map from X̂ to it, and ‖W·Xᵀ − Ŵ·X̂ᵀ‖² = ‖W·Xᵀ − W'·X̂ᵀ‖² + ‖(W' − Ŵ)·X̂ᵀ‖²
  (ρ = 0), so the whitened truncation of W' under Ĝ is the best rank-k Ŵ for that target.

`transformed_svd` returns (U, Σ, Vh_eff) with Vh_eff = Vᵀ·S⁻¹, so the ordinary
`factorize.factors` / `factorize.truncated` of the plain path build A, B and Ŵ unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidArgument
from .config import DAMP  # δ = DAMP·mean(diag G) unless the recipe says otherwise

FACTORIZATIONS = ("plain", "whitened")
RIDGE = 1e-3  # compensated: ρ = RIDGE·mean(diag Ĝ); best of 1e-4..1e-1 at ERR 0.5 (docs/research/calibration-rounds.md)
RETRIES = 3  # Cholesky retries, damping ×100 each


@dataclass
class Transform:
    """An input transform S (n×n) and how to apply S⁻¹ from the right."""

    kind: str  # "whitened"
    S: torch.Tensor  # (n×n) lower-triangular (Cholesky) or general (eigh fallback); float64
    how: str  # "cholesky", "cholesky (damping ×1e4)", "eigh (clamped)", "identity"
    triangular: bool = True

    def right(self, W: torch.Tensor) -> torch.Tensor:
        """W·S."""
        return W @ self.S

    def right_inverse(self, M: torch.Tensor) -> torch.Tensor:
        """M·S⁻¹."""
        if self.triangular:
            return torch.linalg.solve_triangular(self.S, M, upper=False, left=False)
        return torch.linalg.solve(self.S.T, M.T).T  # (S⁻ᵀ·Mᵀ)ᵀ = M·S⁻¹


def gram_root(G: torch.Tensor, damp: float = DAMP) -> Transform:
    """S with S·Sᵀ = G + δ·I (δ = damp·mean diag G), with the fallbacks described above."""
    if G.dim() != 2 or G.shape[0] != G.shape[1]:
        raise InvalidArgument(f"expected a square Gram matrix; received shape {tuple(G.shape)}")
    if damp < 0:
        raise InvalidArgument(f"damp must be ≥ 0; received {damp}")
    G = G.double()
    G = (G + G.T) / 2
    n = G.shape[0]
    scale = float(G.diagonal().mean())
    eye = torch.eye(n, dtype=G.dtype, device=G.device)
    if not scale > 0 or not torch.isfinite(G).all():  # no signal at all: whitening is undefined
        return Transform("whitened", eye, "identity (no activation energy)")
    delta = damp * scale
    for attempt in range(RETRIES + 1):
        L, info = torch.linalg.cholesky_ex(G + delta * eye)
        if int(info) == 0 and torch.isfinite(L).all() and float(L.diagonal().min()) > 0:
            how = "cholesky" if attempt == 0 else f"cholesky (damping {delta / scale:.0e}·mean diag)"
            return Transform("whitened", L, how)
        delta = max(delta, 1e-10 * scale) * 100
    lam, Q = torch.linalg.eigh(G)
    lam = lam.clamp_min(max(damp, 1e-6) * scale)
    return Transform("whitened", Q * lam.sqrt()[None, :], "eigh (clamped)", triangular=False)


def compensated_weight(W: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """W' = W·C·(Ĝ + ρ·I)⁻¹ (float64), C = XᵀX̂ (`cross`), Ĝ = X̂ᵀX̂ (`gram`), ρ = ridge·mean diag Ĝ:
    the matrix whose outputs on the inputs X̂ best match W's on X (see the module docstring)."""
    n = W.shape[1]
    if cross.shape != (n, n) or gram.shape != (n, n):
        raise InvalidArgument(f"expected {n}×{n} cross and Gram matrices for a matrix with {n} inputs; received "
                              f"{tuple(cross.shape)} and {tuple(gram.shape)}")
    G = gram.double()
    G = (G + G.T) / 2
    scale = float(G.diagonal().mean())
    if not scale > 0 or not torch.isfinite(G).all() or not torch.isfinite(cross).all():
        return W.detach().double()  # no signal: nothing to fit, keep W
    G = G + max(ridge, 1e-10) * scale * torch.eye(n, dtype=G.dtype, device=G.device)
    WC = W.detach().double().to(G.device) @ cross.double()
    return torch.linalg.solve(G, WC.T).T  # (G⁻¹·(W·C)ᵀ)ᵀ = W·C·G⁻¹ (G symmetric)


def transformed_svd(W: torch.Tensor, T: Transform) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, Σ, Vh_eff) of W·S in float64, Vh_eff = Vᵀ·S⁻¹; Σ descending, r = min(m, n)."""
    W = W.detach().double().to(T.S.device)
    M = T.right(W)
    if M.shape[0] >= M.shape[1]:
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    else:
        V, S, Uh = torch.linalg.svd(M.T, full_matrices=False)
        U, Vh = Uh.T, V.T
    return U.contiguous(), S.contiguous(), T.right_inverse(Vh).contiguous()


def output_error(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    """‖(W − Ŵ)·Xᵀ‖_F for inputs X (tokens×n), in float64."""
    return float(torch.linalg.matrix_norm((W.double() - W_hat.double()) @ X.double().T))
