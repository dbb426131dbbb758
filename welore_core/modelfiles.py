"""Reading model files: safetensors (plain reads, converted tensor by tensor), JSON, tokenizers,
and building a transformers model that holds exactly the tensors read (no random init), or
one on the meta device (`meta_model`, which the streamed layers of layerwise/ fill one by one).

Shared by checkpoint.py (the WeLore format) and loading.py (resolving model specs); it imports
neither of them.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .errors import CorruptCheckpoint, UnsupportedModel
from .lowrank import LowRankLinear, swap_module
from .targets import decoder_layers

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


@dataclass
class ModelSource:
    spec: str  # what the user gave
    kind: str  # "registry" | "gguf" | "hf_dir" | "welore" | "hf_cache"
    path: str  # a directory (hf_dir/welore), a .gguf file, or a hub model id (hf_cache)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: ModelSource
    meta: Optional[dict] = None  # welore.json of a WeLore checkpoint


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise CorruptCheckpoint(f"{path} is missing") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptCheckpoint(f"{path} is not valid JSON ({exc}); the checkpoint is damaged — "
                                "re-create or re-download it") from exc


def _weight_file_names(path: Path) -> list[str]:
    index = path / "model.safetensors.index.json"
    return sorted(set(read_json(index)["weight_map"].values())) if index.is_file() else ["model.safetensors"]


def read_safetensors(path: Path, dtype: torch.dtype | None = None) -> Optional[dict[str, torch.Tensor]]:
    """All tensors of `model.safetensors` (or its shards); None if there is no such file.
    Floating tensors are converted to `dtype` one at a time as they are read (peak memory: the
    result plus one tensor).

    Read with plain file reads into memory of their own, not memory-mapped: a mapped file stays
    resident in full once touched, so matrices replaced by compression would never be freed.
    """
    files = _weight_file_names(path)
    if not (path / files[0]).is_file():
        return None
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(_read_safetensors_file(path / name, dtype))
    return state


def _damaged(file: Path, why: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(f"cannot read {file}: {why}. The file is damaged; re-create or re-download it")


def _header(f, file: Path) -> tuple[dict, int]:
    head = f.read(8)
    if len(head) != 8:
        raise _damaged(file, "too short for a safetensors header")
    size = int.from_bytes(head, "little")
    try:
        return json.loads(f.read(size)), 8 + size
    except (json.JSONDecodeError, UnicodeDecodeError, MemoryError, OverflowError) as exc:
        raise _damaged(file, f"invalid header ({exc})") from exc


def _read_safetensors_file(file: Path, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    try:
        with open(file, "rb") as f:
            header, base = _header(f, file)
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                stored = SAFETENSORS_DTYPES.get(info.get("dtype"))
                if stored is None:
                    raise _damaged(file, f"tensor {key} has unsupported dtype {info.get('dtype')!r}")
                t = torch.empty(info["shape"], dtype=stored)
                start, end = info["data_offsets"]
                if end - start != t.numel() * t.element_size():
                    raise _damaged(file, f"tensor {key}: {end - start} bytes for shape {info['shape']}")
                f.seek(base + start)
                if t.numel() and f.readinto(t.reshape(-1).view(torch.uint8).numpy()) != end - start:
                    raise _damaged(file, f"tensor {key} is truncated")
                out[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    except OSError as exc:
        raise _damaged(file, str(exc)) from exc
    return out


def weights_dtype(path: Path) -> Optional[torch.dtype]:
    """The dtype most floating tensors of a model directory are stored in (headers only)."""
    counts: Counter = Counter()
    files = _weight_file_names(Path(path))
    for name in files:
        file = Path(path) / name
        if not file.is_file():
            return None
        with open(file, "rb") as f:
            header, _ = _header(f, file)
        for key, info in header.items():
            dt = SAFETENSORS_DTYPES.get(info.get("dtype")) if key != "__metadata__" else None
            if dt is not None and dt.is_floating_point:
                n = 1
                for s in info["shape"]:
                    n *= s
                counts[dt] += n
    return counts.most_common(1)[0][0] if counts else None


def meta_model(config, factored: Optional[dict[str, int]] = None) -> nn.Module:
    """The model of `config` on the meta device (no memory), `factored` modules low-rank (a
    factorised config, see portable/, builds its low-rank modules itself)."""
    from transformers import AutoModelForCausalLM

    from .portable import register

    register()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        for name, rank in (factored or {}).items():
            try:
                old = model.get_submodule(name)
            except AttributeError as exc:
                raise CorruptCheckpoint(f"welore.json names module {name!r}, which the config's "
                                        "architecture does not have") from exc
            swap_module(model, name, LowRankLinear(old.in_features, old.out_features, int(rank),
                                                   bias=old.bias is not None))
    decoder_layers(model)
    return model


def rebuild_buffers(model: nn.Module, config) -> None:
    """Non-persistent buffers (RoPE's inv_freq) are not in checkpoints: rebuild their modules."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            if not hasattr(module, "inv_freq"):
                raise UnsupportedModel(f"cannot rebuild the buffers of {name} ({type(module).__name__})")
            swap_module(model, name, type(module)(config=module.config))


def build_model(config, state: dict[str, torch.Tensor], device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of `config` (plain, or factorised: see portable/) holding exactly `state`.

    Built on the meta device and given the loaded tensors (no random initialisation, no second
    copy of the weights), so a replaced matrix later frees its memory. Strict: every parameter
    must come from `state` (a tied LM head from its embedding) and nothing may be left over.
    """
    try:
        model = meta_model(config)
    except AttributeError as exc:  # a factored name the architecture does not have
        raise CorruptCheckpoint(f"the checkpoint names a module the config's architecture does not have "
                                f"({exc})") from exc
    try:
        _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        raise CorruptCheckpoint(f"tensor shapes disagree with the model's config/welore.json: {exc}") from exc
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    if missing or unexpected:
        raise CorruptCheckpoint(f"weights do not match the model (missing: {missing[:5]}, unexpected: "
                                f"{unexpected[:5]}); the checkpoint is damaged")
    rebuild_buffers(model, config)  # non-persistent buffers (RoPE) are not in checkpoints
    return model.to(device=device, dtype=dtype).eval()


def load_tokenizer(path: str, local_only: bool = True):
    """The model's tokenizer, or None when it ships none (compression needs no tokenizer)."""
    from transformers import AutoTokenizer

    from .portable import register

    register()  # AutoTokenizer reads config.json: a factorised one must resolve without remote code
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    except Exception:
        return None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def read_config(path, local_only: bool = True):
    """config.json of a model directory, factorised ones (portable/) included without remote code."""
    from transformers import AutoConfig

    from .portable import register

    register()
    return AutoConfig.from_pretrained(str(path), local_files_only=local_only)
