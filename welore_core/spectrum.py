"""Singular value decompositions of the target matrices, computed once and cached on disk.

Each matrix's SVD (U, S, Vh) is stored under a key derived from a SHA-256 of its weights, so
a second compression of the same model (at another ERR, another method) decomposes nothing,
and one compression decomposes each matrix exactly once: allocation reads S, factorisation
reads U and Vh of the same entry. Matrices are processed one at a time so peak memory stays
near the model's own size.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .lowrank import LowRankLinear
from .progress import ProgressEvent, ProgressFn, StopFn, check_stop, no_progress
from .targets import target_names

CACHE_FORMAT = "svd-v1"


def tensor_hash(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (float32 view, so dtype moves hash apart)."""
    t = t.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(f"{CACHE_FORMAT}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().data)
    return h.hexdigest()


def svd(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of W (m×n) in float32: U (m×r), S (r, descending), Vh (r×n), r = min(m, n).

    LAPACK is markedly faster on tall matrices, so a wide W is decomposed as Wᵀ.
    """
    W = W.detach().float()
    if W.shape[0] >= W.shape[1]:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    else:
        V, S, Uh = torch.linalg.svd(W.T, full_matrices=False)
        U, Vh = Uh.T, V.T
    return U.contiguous(), S.contiguous(), Vh.contiguous()


class SpectrumCache:
    """A directory of `<key>.safetensors` files, each holding U, S and Vh of one matrix."""

    def __init__(self, root: Path):
        self.root = Path(root) / "svd"
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def put(self, key: str, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor,
            metadata: dict[str, str] | None = None) -> None:
        """Store one entry. Calibrated entries (calibration.py) hold U, Σ of W·S and Vh = Vᵀ·S⁻¹,
        so the same `factors`/`truncated` rebuild their Ŵ; `metadata` notes how S was built."""
        final = self.path(key)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        save_file({"U": U.cpu().contiguous(), "S": S.cpu().contiguous(), "Vh": Vh.cpu().contiguous()}, str(tmp),
                  metadata=metadata)
        os.replace(tmp, final)  # atomic: readers see a whole entry or none

    def metadata(self, key: str) -> dict[str, str]:
        try:
            with safe_open(str(self.path(key)), framework="pt") as f:
                return dict(f.metadata() or {})
        except Exception:
            return {}

    def singular_values(self, key: str) -> Optional[torch.Tensor]:
        try:
            with safe_open(str(self.path(key)), framework="pt") as f:
                return f.get_tensor("S")
        except (FileNotFoundError, OSError):
            return None
        except Exception:  # a damaged entry is recomputed, never trusted
            self.path(key).unlink(missing_ok=True)
            return None

    def factors(self, key: str, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The leading k singular triplets: U[:, :k], S[:k], Vh[:k]."""
        with safe_open(str(self.path(key)), framework="pt") as f:
            U = f.get_slice("U")[:, :k]
            S = f.get_slice("S")[:k]
            Vh = f.get_slice("Vh")[:k]
        return U, S, Vh

    def tail(self, key: str, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The dropped triplets beyond the k-th: U[:, k:], S[k:], Vh[k:]."""
        with safe_open(str(self.path(key)), framework="pt") as f:
            return f.get_slice("U")[:, k:], f.get_slice("S")[k:], f.get_slice("Vh")[k:]


def dense_weight(module: nn.Module) -> torch.Tensor:
    """W of an nn.Linear, or B·A of a LowRankLinear (a compressed checkpoint's spectrum)."""
    return module.merged_weight() if isinstance(module, LowRankLinear) else module.weight


@dataclass
class Spectra:
    """Per-matrix singular values and shapes, in target order, plus their cache keys."""

    names: list[str]
    shapes: list[tuple[int, int]]
    values: list[torch.Tensor]  # each (r,), descending, float32, on CPU
    keys: list[str]
    model_hash: str  # SHA-256 over the target matrices' keys
    decomposed: int  # matrices decomposed by this call (cache misses)


def compute_spectra(model: nn.Module, cache: SpectrumCache, progress: ProgressFn = no_progress,
                    should_stop: StopFn | None = None, device: str | torch.device | None = None,
                    names: list[str] | None = None) -> Spectra:
    """Singular values of every target matrix; decomposes (and caches) only cache misses."""
    names = names or target_names(model)
    shapes, values, keys = [], [], []
    n_computed = 0
    for i, name in enumerate(names):
        check_stop(should_stop)
        W = dense_weight(model.get_submodule(name))
        key = tensor_hash(W)
        S = cache.singular_values(key)
        if S is None:
            U, S, Vh = svd(W.to(device) if device is not None else W)
            cache.put(key, U, S, Vh)  # synchronous: a writer thread's malloc arena kept ~160 MB
            S = S.cpu()
            n_computed += 1
        shapes.append(tuple(W.shape))
        values.append(S)
        keys.append(key)
        progress(ProgressEvent("spectrum", i + 1, len(names), message=name,
                               metrics={"decomposed": n_computed}))
    model_hash = hashlib.sha256("|".join(keys).encode()).hexdigest()
    return Spectra(names, shapes, values, keys, model_hash, n_computed)
