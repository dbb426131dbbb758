"""Resolve a model name to files and load it: registry names, GGUF files, Hugging Face
directories, the local Hugging Face cache, and WeLore checkpoints (see checkpoint.py).

A GGUF file is dequantised once into a cached safetensors copy (keyed by the file's SHA-256),
so later loads take about a second instead of ~20 s. Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .hashing import file_sha256
from .errors import CorruptCheckpoint, InvalidArgument, ModelNotFound, UnsupportedModel
from .settings import get_core_settings
from .targets import decoder_layers

from .registry import REGISTRY, registry_path  # noqa: F401  (re-exported; torch-free)


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


def pick_device(device: str | None = None) -> torch.device:
    device = device or get_core_settings().device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def pick_dtype(device: torch.device, dtype: torch.dtype | None = None) -> torch.dtype:
    if dtype is not None:
        return dtype
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def resolve(spec: str) -> ModelSource:
    """Decide what `spec` names without loading anything."""
    spec = str(spec)
    if spec in REGISTRY:
        return ModelSource(spec, "registry", str(registry_path(spec)))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(spec, "gguf", str(path))
    if path.is_dir():
        if (path / "welore.json").is_file():
            return ModelSource(spec, "welore", str(path))
        if (path / "config.json").is_file():
            return ModelSource(spec, "hf_dir", str(path))
        raise ModelNotFound(f"{path} is a directory but holds no config.json; expected a Hugging Face "
                            "model directory (config.json + safetensors) or a WeLore checkpoint")
    if path.exists():
        raise ModelNotFound(f"{path} is neither a .gguf file nor a model directory")
    if "/" in spec and not spec.startswith((".", "/", "~")) and _in_hf_cache(spec):
        return ModelSource(spec, "hf_cache", spec)
    raise ModelNotFound(f"model {spec!r} not found: expected a registry name "
                        f"({', '.join(sorted(REGISTRY))}), a .gguf file, a model directory, or a "
                        "model id present in the local Hugging Face cache (nothing is downloaded)")


def _in_hf_cache(model_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except Exception:
        return False


def gguf_to_safetensors(gguf: Path, cache_dir: Path | None = None) -> Path:
    """Dequantise a GGUF file once into `<cache>/models/<sha>/` (config, safetensors, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir = Path(cache_dir or get_core_settings().cache_dir)
    target = cache_dir / "models" / file_sha256(gguf)[:32]
    if (target / "config.json").is_file():
        return target
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for a bad file
        raise CorruptCheckpoint(f"could not read GGUF file {gguf}: {exc}. Expected a Llama-family "
                                "GGUF that transformers can dequantise (pip install gguf).") from exc
    # transformers marks GGUF-loaded models as quantised and refuses save_pretrained; the
    # weights are plain float tensors by now, so write them as an ordinary dense export.
    from .checkpoint import save_merged

    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_merged(model, tok, target)
    except Exception:
        if not (target / "config.json").is_file():  # not merely beaten to it by another process
            raise
    return target


def load_hf(path: str, device: torch.device, dtype: torch.dtype, local_only: bool = True):
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=local_only)
    except Exception as exc:
        raise CorruptCheckpoint(f"cannot read config.json of {path}: {exc}") from exc
    model_type = getattr(config, "model_type", None)
    from .targets import SUPPORTED_MODEL_TYPES
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModel(f"{path}: model_type {model_type!r} is not supported; expected one of "
                               f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama-family decoders)")
    state = read_safetensors(Path(path)) if Path(path).is_dir() else None
    try:
        if state is not None:
            model = build_model(config, state, {}, device, dtype)
        else:  # a hub-cache id or .bin weights: let transformers find and read the files
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=local_only)
    except CorruptCheckpoint:
        raise
    except Exception as exc:
        raise CorruptCheckpoint(f"cannot load the model in {path}: {exc}. Re-export or re-download "
                                "it (config.json + *.safetensors + tokenizer files).") from exc
    decoder_layers(model)
    return model.to(device).eval(), load_tokenizer(path, local_only)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path: Path) -> Optional[dict[str, torch.Tensor]]:
    """All tensors of `model.safetensors` (or its shards); None if there is no such file.

    Read with plain file reads into memory of their own, not memory-mapped: a mapped file stays
    resident in full once touched, so matrices replaced by compression would never be freed.
    """
    index = path / "model.safetensors.index.json"
    files = sorted(set(read_json(index)["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    if not (path / files[0]).is_file():
        return None
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(_read_safetensors_file(path / name))
    return state


def _read_safetensors_file(file: Path) -> dict[str, torch.Tensor]:
    def damaged(why: str) -> CorruptCheckpoint:
        return CorruptCheckpoint(f"cannot read {file}: {why}. The file is damaged; re-create or "
                                 "re-download it")
    out: dict[str, torch.Tensor] = {}
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise damaged("too short for a safetensors header")
            size = int.from_bytes(head, "little")
            try:
                header = json.loads(f.read(size))
            except (json.JSONDecodeError, UnicodeDecodeError, MemoryError, OverflowError) as exc:
                raise damaged(f"invalid header ({exc})") from exc
            base = 8 + size
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
                if dtype is None:
                    raise damaged(f"tensor {key} has unsupported dtype {info.get('dtype')!r}")
                t = torch.empty(info["shape"], dtype=dtype)
                start, end = info["data_offsets"]
                if end - start != t.numel() * t.element_size():
                    raise damaged(f"tensor {key}: {end - start} bytes for shape {info['shape']}")
                f.seek(base + start)
                if t.numel() and f.readinto(t.reshape(-1).view(torch.uint8).numpy()) != end - start:
                    raise damaged(f"tensor {key} is truncated")
                out[key] = t
    except OSError as exc:
        raise damaged(str(exc)) from exc
    return out


def build_model(config, state: dict[str, torch.Tensor], factored: dict[str, int],
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of `config` holding exactly `state`, with `factored` modules low-rank.

    Built on the meta device and given the loaded tensors (no random initialisation, no second
    copy of the weights), so a replaced matrix later frees its memory. Strict: every parameter
    must come from `state` (a tied LM head from its embedding) and nothing may be left over.
    """
    from .layerwise.layers import meta_model, rebuild_buffers

    model = meta_model(config, factored)
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

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    except Exception:
        return None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def require_tokenizer(loaded: "LoadedModel"):
    if loaded.tokenizer is None:
        raise InvalidArgument(f"model {loaded.source.spec!r} has no tokenizer files; evaluation and "
                              "fine-tuning need one (save the tokenizer beside config.json)")
    return loaded.tokenizer


def load_model(spec: str, device: str | None = None, dtype: torch.dtype | None = None) -> LoadedModel:
    """Load any supported model spec; WeLore checkpoints come back compressed (strictly)."""
    source = resolve(spec)
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    if source.kind == "welore":
        from .checkpoint import load_checkpoint
        return load_checkpoint(source.path, device=dev, dtype=dt, source=source)
    if source.kind in ("registry", "gguf"):
        path = str(gguf_to_safetensors(Path(source.path)))
    else:
        path = source.path
    model, tokenizer = load_hf(path, dev, dt)
    return LoadedModel(model, tokenizer, source)


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise CorruptCheckpoint(f"{path} is missing") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptCheckpoint(f"{path} is not valid JSON ({exc}); the checkpoint is damaged — "
                                "re-create or re-download it") from exc
