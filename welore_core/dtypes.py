"""Output dtypes of checkpoints by name (`--dtype auto|bf16|fp16|fp32`). Torch-free at import:
the command line and the recipes validate the names without loading torch."""

from __future__ import annotations

from .errors import InvalidArgument

DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
_TORCH_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def check_name(name: str) -> str:
    if name not in DTYPE_CHOICES:
        raise InvalidArgument(f"dtype must be one of {', '.join(DTYPE_CHOICES)}; received {name!r}")
    return name


def to_torch(name: str):
    """torch dtype of a short name other than auto (bf16 → torch.bfloat16)."""
    import torch

    check_name(name)
    if name == "auto":
        raise InvalidArgument("dtype 'auto' must be resolved against the source first")
    return getattr(torch, _TORCH_NAMES[name])


def short_name(dtype) -> str:
    """bf16 / fp16 / fp32 for a torch dtype (other dtypes: torch's own name)."""
    name = str(dtype).removeprefix("torch.")
    return next((short for short, full in _TORCH_NAMES.items() if full == name), name)


def resolve(name: str | None, source_dtype) -> "object":
    """The torch dtype to write: `name`, or for auto/None the source's dtype (fp32 if unknown)."""
    import torch

    if name in (None, "auto"):
        return source_dtype if source_dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
    return to_torch(name)
