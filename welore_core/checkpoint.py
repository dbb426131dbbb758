"""The WeLore checkpoint format: write atomically, load strictly, export merged dense weights.

A checkpoint directory holds
  config.json        the base model's config, unchanged
  model.safetensors  all weights; an LRC `X` appears as `X.A` (k×in) and `X.B` (out×k)
  tokenizer files
  welore.json        format version, method, τ, ERR, parameter counts, per-matrix report,
                     `factored` {module name: rank} (what loading rebuilds), source and hash,
                     and, after fine-tuning, a `training` record.
A merged export holds dense Ŵ = B·A in place of the factors and loads in plain transformers.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .errors import CorruptCheckpoint, NonFiniteWeights, OutputExists
from .lowrank import LowRankLinear, swap_module

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "welore.json"


def all_finite(t: torch.Tensor) -> bool:
    """No NaN and no ±Inf in `t`. aminmax propagates both and is ~10× faster than isfinite().all()."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.detach())
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def factored_modules(model: nn.Module) -> dict[str, int]:
    return {name: mod.rank for name, mod in model.named_modules() if isinstance(mod, LowRankLinear)}


def _tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys that alias an earlier tensor (tied LM head): written once, re-tied on load."""
    seen, tied = {}, set()
    for key, t in model.state_dict(keep_vars=True).items():
        ptr = t.data_ptr()
        if ptr in seen and t.numel() > 0:
            tied.add(key)
        seen.setdefault(ptr, key)
    return tied


def _weights(model: nn.Module, merged: bool, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """The tensors to write (each once), on the CPU; floating ones in `dtype` when given."""
    tied = _tied_keys(model)
    lowrank = factored_modules(model)
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        if key in tied:
            continue
        module, _, leaf = key.rpartition(".")
        if merged and module in lowrank:
            if leaf == "A":
                out[f"{module}.weight"] = model.get_submodule(module).merged_weight()
            elif leaf == "bias":
                out[key] = t
            continue
        out[key] = t
    out = {k: v.detach().to("cpu").contiguous() for k, v in out.items()}
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    for k, v in out.items():
        if v.is_floating_point() and not all_finite(v):
            raise NonFiniteWeights(f"tensor {k} holds NaN or Inf; nothing was written. The model "
                                   "diverged or its source is damaged.")
    return out


def _write_atomically(out: Path, fill, overwrite: bool) -> Path:
    """Build the directory beside `out`, then rename it into place (no half-written checkpoint)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExists(f"{out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExists(f"{out} already exists and is not empty; choose another --out or pass "
                           "--overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if out.exists():
            old = out.with_name(f".{out.name}.{os.getpid()}.old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def checkpoint_record(meta: dict, factored: dict[str, int]) -> dict:
    """The content of welore.json: format, versions, time, `meta` (report, source, ...), `factored`."""
    return {
        "format_version": FORMAT_VERSION,
        "welore_version": __version__,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **meta,
        "factored": factored,
    }


def save_checkpoint(model: nn.Module, tokenizer, out: Path | str, meta: dict, overwrite: bool = False,
                    dtype: Optional[torch.dtype] = None) -> Path:
    """Write a WeLore checkpoint. `meta` is merged into welore.json (report, source, training);
    `dtype` (default: as held) is the dtype its floating-point tensors are written in."""
    weights = _weights(model, merged=False, dtype=dtype)  # validates before anything touches the disk
    record = checkpoint_record(meta, factored_modules(model))

    def fill(d: Path) -> None:
        save_file(weights, str(d / WEIGHTS), metadata={"format": "pt"})
        model.config.save_pretrained(str(d))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(d))
        (d / META).write_text(json.dumps(record, indent=2) + "\n")

    return _write_atomically(Path(out), fill, overwrite)


def save_merged(model: nn.Module, tokenizer, out: Path | str, overwrite: bool = False) -> Path:
    """Dense export (Ŵ = B·A for every LRC) loadable with plain AutoModelForCausalLM."""
    weights = _weights(model, merged=True)

    def fill(d: Path) -> None:
        save_file(weights, str(d / WEIGHTS), metadata={"format": "pt"})
        model.config.save_pretrained(str(d))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(d))

    return _write_atomically(Path(out), fill, overwrite)


def read_meta(path: Path | str) -> dict:
    from .loading import read_json

    meta = read_json(Path(path) / META)
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CorruptCheckpoint(f"{path}/{META}: format_version {version!r} is not supported "
                                f"(this welore reads version {FORMAT_VERSION}); upgrade welore or "
                                "re-create the checkpoint")
    if not isinstance(meta.get("factored"), dict):
        raise CorruptCheckpoint(f"{path}/{META} has no 'factored' map; the checkpoint is damaged")
    return meta


def load_checkpoint(path: Path | str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    source=None):
    """Rebuild the compressed model from config + `factored` and load every tensor strictly."""
    from transformers import AutoConfig

    from .loading import LoadedModel, ModelSource, build_model, load_tokenizer, read_safetensors

    path = Path(path)
    meta = read_meta(path)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise CorruptCheckpoint(f"cannot read {path}/config.json: {exc}") from exc
    state = read_safetensors(path)
    if state is None:
        raise CorruptCheckpoint(f"{path}/{WEIGHTS} is missing; the checkpoint is incomplete")
    model = build_model(config, state, meta["factored"], device, dtype)
    tokenizer = load_tokenizer(str(path))
    source = source or ModelSource(str(path), "welore", str(path))
    return LoadedModel(model, tokenizer, source, meta)
