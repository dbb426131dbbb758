"""A Hugging Face safetensors checkpoint read one tensor at a time.

`CheckpointSource(dir)` reads `model.safetensors.index.json` (+ shards) or a single
`model.safetensors` — tensors may be spread over the shards in any order — and answers, without
loading anything, which tensors there are, their shapes, dtypes and sizes, and which belong to
decoder layer L. `tensor(name)` reads one tensor (safetensors' `safe_open`), so a caller holds
only what it asked for. Nothing is memory-mapped for longer than one read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors import safe_open

from ..errors import CorruptCheckpoint, ModelNotFound

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class TensorInfo:
    file: str  # shard file name (relative to the checkpoint directory)
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code: "F32", "BF16", ...

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES.get(self.dtype, 4)


def layer_of(name: str) -> Optional[int]:
    """Decoder layer index of a tensor name (`model.layers.3.mlp.up_proj.weight` → 3), else None."""
    m = LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def _read_header(file: Path) -> dict:
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise CorruptCheckpoint(f"cannot read {file}: too short for a safetensors header; "
                                        "re-create or re-download it")
            size = int.from_bytes(head, "little")
            if size > 100_000_000:
                raise CorruptCheckpoint(f"cannot read {file}: header of {size} bytes; the file is damaged")
            header = json.loads(f.read(size))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptCheckpoint(f"cannot read {file}: invalid safetensors header ({exc}); the file is "
                                "damaged, re-create or re-download it") from exc
    except FileNotFoundError as exc:
        raise CorruptCheckpoint(f"{file} is missing; the checkpoint is incomplete") from exc
    header.pop("__metadata__", None)
    return header


class CheckpointSource:
    """The tensors of one safetensors checkpoint directory, read on demand."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CorruptCheckpoint(f"{index} is not a safetensors index (expected a JSON object with "
                                        f"a 'weight_map'): {exc}") from exc
            files = sorted(set(weight_map.values()))
        elif (self.path / SINGLE).is_file():
            weight_map, files = None, [SINGLE]
        else:
            raise ModelNotFound(f"{self.path} holds neither {INDEX} nor {SINGLE}; expected a Hugging Face "
                                "safetensors checkpoint directory")
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            for name, info in _read_header(self.path / file).items():
                if weight_map is not None and weight_map.get(name) != file:
                    continue  # (the index decides where a tensor lives)
                self.tensors[name] = TensorInfo(file, tuple(info["shape"]), info["dtype"])
        if weight_map is not None:
            lost = sorted(set(weight_map) - set(self.tensors))
            if lost:
                raise CorruptCheckpoint(f"{index} names {len(lost)} tensors its shards do not hold (first: "
                                        f"{lost[0]}); the checkpoint is incomplete — re-download it")
        self.n_layers = 1 + max((layer_of(n) for n in self.tensors if layer_of(n) is not None), default=-1)

    # -- what is there ------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.tensors)

    def layer_names(self, layer: int) -> list[str]:
        return [n for n in self.tensors if layer_of(n) == layer]

    def other_names(self) -> list[str]:
        """Tensors outside the decoder layers: embeddings, final norm, LM head."""
        return [n for n in self.tensors if layer_of(n) is None]

    def nbytes(self, names: Optional[Iterable[str]] = None) -> int:
        names = self.tensors if names is None else names
        return sum(self.tensors[n].nbytes for n in names)

    def numel(self, names: Optional[Iterable[str]] = None) -> int:
        names = self.tensors if names is None else names
        return sum(self.tensors[n].numel for n in names)

    def layer_nbytes(self, layer: int) -> int:
        return self.nbytes(self.layer_names(layer))

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype most of the weights are stored in."""
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            if t.dtype in DTYPES:
                counts[t.dtype] = counts.get(t.dtype, 0) + t.numel
        return DTYPES[max(counts, key=counts.get)] if counts else torch.float32

    # -- reading ------------------------------------------------------------------------
    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, copied into memory of its own (optionally cast to `dtype`)."""
        info = self.tensors.get(name)
        if info is None:
            raise CorruptCheckpoint(f"{self.path} holds no tensor {name!r}; the checkpoint does not match "
                                    "its config")
        try:
            with safe_open(str(self.path / info.file), framework="pt") as f:
                t = f.get_tensor(name)
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise CorruptCheckpoint(f"cannot read tensor {name} from {self.path / info.file}: {exc}; the "
                                    "file is damaged, re-create or re-download it") from exc
        if tuple(t.shape) != info.shape:
            raise CorruptCheckpoint(f"tensor {name} in {info.file} has shape {tuple(t.shape)}, its header "
                                    f"says {info.shape}")
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        return t

    def held_dtype(self, name: str, compute: torch.dtype) -> torch.dtype:
        """The dtype a non-layer tensor is held in for layer-by-layer runs: a matrix (embeddings, LM
        head) keeps its stored dtype when that is a narrower float than `compute` (a Llama-3-8B's
        pair is 2.1 GB in bf16, 4.2 GB in float32; layers.StreamedLayers upcasts it as it is used);
        everything else is held in `compute`."""
        info = self.tensors[name]
        stored = DTYPES.get(info.dtype)
        narrower = stored is not None and stored.itemsize < compute.itemsize
        return stored if narrower and len(info.shape) == 2 else compute

    def layer_state(self, layer: int, dtype: torch.dtype | None = None, strip: bool = False) -> dict[str, torch.Tensor]:
        """Every tensor of decoder layer `layer`; with `strip`, names relative to the layer."""
        prefix = f"model.layers.{layer}."
        return {(n[len(prefix):] if strip else n): self.tensor(n, dtype) for n in self.layer_names(layer)}
