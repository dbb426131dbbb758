"""Resolve a model name to files and load it: registry names, GGUF files, Hugging Face
directories, the local Hugging Face cache, and WeLore checkpoints (see checkpoint.py).

A GGUF file is dequantised once into a cached safetensors copy (keyed by the file's SHA-256),
so later loads take about a second instead of ~20 s. Nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import dtypes
from .checkpoint import load_checkpoint, save_merged
from .errors import CorruptCheckpoint, InvalidArgument, ModelNotFound, UnsupportedModel
from .hashing import file_sha256
from .modelfiles import (LoadedModel, ModelSource, build_model, load_tokenizer, read_config,  # noqa: F401
                         read_json, read_safetensors, weights_dtype)
from .settings import get_core_settings
from .targets import decoder_layers

from .registry import REGISTRY, registry_path  # noqa: F401  (re-exported; torch-free)


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
    from transformers import AutoModelForCausalLM

    try:
        config = read_config(path, local_only)
    except Exception as exc:
        raise CorruptCheckpoint(f"cannot read config.json of {path}: {exc}") from exc
    model_type = getattr(config, "model_type", None)
    from .targets import SUPPORTED_MODEL_TYPES
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModel(f"{path}: model_type {model_type!r} is not supported; expected one of "
                               f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama-family decoders)")
    state = read_safetensors(Path(path), dtype) if Path(path).is_dir() else None
    try:
        if state is not None:
            model = build_model(config, state, device, dtype)
        else:  # a hub-cache id or .bin weights: let transformers find and read the files
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=local_only)
    except CorruptCheckpoint:
        raise
    except Exception as exc:
        raise CorruptCheckpoint(f"cannot load the model in {path}: {exc}. Re-export or re-download "
                                "it (config.json + *.safetensors + tokenizer files).") from exc
    decoder_layers(model)
    return model.to(device).eval(), load_tokenizer(path, local_only)


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
        return load_checkpoint(source.path, device=dev, dtype=dt, source=source,
                               cache_dir=get_core_settings().cache_dir)
    if source.kind in ("registry", "gguf"):
        path = str(gguf_to_safetensors(Path(source.path)))
    else:
        path = source.path
    model, tokenizer = load_hf(path, dev, dt)
    return LoadedModel(model, tokenizer, source)


def source_dtype(source: ModelSource) -> torch.dtype | None:
    """The dtype `source`'s weights are stored in: a GGUF file's is bf16 (its dequantised form
    written compactly), a directory's its safetensors' (None when unknown)."""
    if source.kind in ("registry", "gguf"):
        return torch.bfloat16
    if source.kind in ("hf_dir", "welore"):
        return weights_dtype(Path(source.path))
    return None


def output_dtype(name: str | None, source: ModelSource) -> torch.dtype:
    """`--dtype NAME` for an output made from `source` (auto: the source's dtype)."""
    return dtypes.resolve(dtypes.check_name(name or "auto"), source_dtype(source))
