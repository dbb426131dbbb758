"""Singular value decompositions of the target matrices, computed once and cached on disk.

Each matrix's SVD (S and the leading U, Vh) is stored under a key derived from a SHA-256 of its weights, so
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
    """A directory of `<key>.safetensors` files, each holding S and the leading U, Vh of one matrix.

    Compact entries: `put(..., keep=k)` stores only the leading k triplets (S always whole):
    allocation needs only S, factorisation only the kept ranks, and with min_ratio ρ an LRC keeps
    fewer than r·(1−ρ) ranks (`needed_rank`); keep=0 stores S alone (factors recomputed later).
    `max_bytes` caps the directory: a put evicts the least recently used entries (reads refresh an
    entry's mtime) until the new one fits, never evicting entries this object used (a run's own
    entries stay until the run ends). `stats` counts hits, misses and bytes.
    """

    @classmethod
    def configured(cls) -> "SpectrumCache":
        """The cache the settings name: WELORE_CACHE_DIR, capped at WELORE_CACHE_MAX_GB. Every path
        that is given no cache (in memory, streamed, `welore spectrum`) uses this one."""
        from .settings import get_core_settings

        settings = get_core_settings()
        cap = settings.cache_max_gb
        return cls(settings.cache_dir, max_bytes=int(cap * 1e9) if cap else None)

    def __init__(self, root: Path, max_bytes: Optional[int] = None):
        self.root = Path(root) / "svd"
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.stats = {"hits": 0, "misses": 0, "bytes_written": 0, "bytes_read": 0, "evicted": 0,
                      "evicted_bytes": 0}
        self._used: set[str] = set()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def size_bytes(self) -> int:
        """Bytes the cache directory holds now."""
        return sum(e.stat().st_size for e in os.scandir(self.root) if e.name.endswith(".safetensors"))

    def _touch(self, key: str) -> None:
        self._used.add(key)
        try:
            os.utime(self.path(key))
        except OSError:
            pass

    def _evict_for(self, nbytes: int) -> None:
        if self.max_bytes is None:
            return
        entries = []
        for e in os.scandir(self.root):
            if e.name.endswith(".safetensors"):
                st = e.stat()
                entries.append((st.st_mtime, st.st_size, e.name))
        total = sum(size for _, size, _ in entries)
        for _, size, name in sorted(entries):
            if total + nbytes <= self.max_bytes:
                break
            if name[:-len(".safetensors")] in self._used:
                continue
            (self.root / name).unlink(missing_ok=True)
            total -= size
            self.stats["evicted"] += 1
            self.stats["evicted_bytes"] += size

    def put(self, key: str, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor,
            metadata: dict[str, str] | None = None, keep: Optional[int] = None) -> None:
        """Store one entry (the leading `keep` triplets of U, Vh; all when None). Calibrated entries
        (calibration.py) hold U, Σ of W·S and Vh = Vᵀ·S⁻¹, so the same `factors`/`truncated`
        rebuild their Ŵ; `metadata` notes how S was built."""
        r = S.shape[0]
        keep = r if keep is None else max(0, min(int(keep), r))
        tensors = {"S": S.cpu().contiguous()}
        if keep:
            tensors.update(U=U[:, :keep].cpu().contiguous(), Vh=Vh[:keep].cpu().contiguous())
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        self._evict_for(nbytes)
        final = self.path(key)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        save_file(tensors, str(tmp), metadata={**(metadata or {}), "stored_rank": str(keep)})
        os.replace(tmp, final)  # atomic: readers see a whole entry or none
        self._used.add(key)
        self.stats["bytes_written"] += nbytes

    def metadata(self, key: str) -> dict[str, str]:
        try:
            with safe_open(str(self.path(key)), framework="pt") as f:
                return dict(f.metadata() or {})
        except Exception:
            return {}

    def stored_rank(self, key: str) -> int:
        """How many leading triplets the entry holds (0: singular values only; -1: no entry)."""
        try:
            with safe_open(str(self.path(key)), framework="pt") as f:
                if "U" not in f.keys():
                    return 0
                return int(f.get_slice("U").get_shape()[1])
        except Exception:
            return -1

    def singular_values(self, key: str) -> Optional[torch.Tensor]:
        try:
            with safe_open(str(self.path(key)), framework="pt") as f:
                S = f.get_tensor("S")
        except (FileNotFoundError, OSError):
            self.stats["misses"] += 1
            return None
        except Exception:  # a damaged entry is recomputed, never trusted
            self.path(key).unlink(missing_ok=True)
            self.stats["misses"] += 1
            return None
        self.stats["hits"] += 1
        self.stats["bytes_read"] += S.numel() * 4
        self._touch(key)
        return S

    def factors(self, key: str, k: int) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The leading k singular triplets U[:, :k], S[:k], Vh[:k]; None when the entry holds fewer."""
        try:
            with safe_open(str(self.path(key)), framework="pt") as f:
                if "U" not in f.keys() or f.get_slice("U").get_shape()[1] < k:
                    return None
                U = f.get_slice("U")[:, :k]
                S = f.get_slice("S")[:k]
                Vh = f.get_slice("Vh")[:k]
        except (FileNotFoundError, OSError):
            return None
        self.stats["bytes_read"] += (U.numel() + S.numel() + Vh.numel()) * 4
        self._touch(key)
        return U, S, Vh

    def tail(self, key: str, k: int) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The dropped triplets beyond the k-th: U[:, k:], S[k:], Vh[k:]; None unless the entry is whole."""
        try:
            with safe_open(str(self.path(key)), framework="pt") as f:
                r = f.get_slice("S").get_shape()[0]
                if "U" not in f.keys() or f.get_slice("U").get_shape()[1] < r:
                    return None
                out = f.get_slice("U")[:, k:], f.get_slice("S")[k:], f.get_slice("Vh")[k:]
        except (FileNotFoundError, OSError):
            return None
        self._touch(key)
        return out


def needed_rank(shape: tuple[int, int], min_ratio: Optional[float]) -> int:
    """The most ranks an allocation can keep for a matrix: r·(1−ρ) under WeLore's min_ratio ρ
    (an LRC drops more than ρ·r), all r without one (uniform)."""
    r = min(shape)
    if min_ratio is None:
        return r
    return min(r, int(r * (1.0 - min_ratio)) + 1)


def entry_bytes(shape: tuple[int, int], keep: int) -> int:
    """Bytes of a cache entry (float32) holding S and `keep` leading triplets (file header aside)."""
    m, n = shape
    return 4 * (min(m, n) + keep * (m + n))


def leading_triplets(cache: SpectrumCache, key: str, W: torch.Tensor, k: int,
                     device: str | torch.device | None = None, keep: Optional[int] = None):
    """U_k, S_k, Vh_k of W from the cache, or from a fresh SVD when the entry holds fewer than k
    (stored again with max(k, `keep`) leading triplets; all with keep None; not stored with keep 0)."""
    got = cache.factors(key, k)
    if got is not None:
        return got
    U, S, Vh = svd(W.to(device) if device is not None else W)
    if keep != 0:
        cache.put(key, U, S, Vh, keep=None if keep is None else max(k, keep))
    return U[:, :k].cpu(), S[:k].cpu(), Vh[:k].cpu()


def singular_values_only(W: torch.Tensor) -> torch.Tensor:
    """The singular values of W (float32, descending) without the vectors: ~3× faster than `svd`."""
    return torch.linalg.svdvals(W.detach().float()).contiguous()


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
                    names: list[str] | None = None, keep=None) -> Spectra:
    """Singular values of every target matrix; decomposes (and caches) only cache misses.
    `keep(shape)` → leading triplets each new entry stores (None: all; see SpectrumCache)."""
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
            # synchronous: a writer thread's malloc arena kept ~160 MB
            cache.put(key, U, S, Vh, keep=None if keep is None else keep(tuple(W.shape)))
            S = S.cpu()
            n_computed += 1
        shapes.append(tuple(W.shape))
        values.append(S)
        keys.append(key)
        progress(ProgressEvent("spectrum", i + 1, len(names), message=name,
                               metrics={"decomposed": n_computed}))
    model_hash = hashlib.sha256("|".join(keys).encode()).hexdigest()
    return Spectra(names, shapes, values, keys, model_hash, n_computed)
