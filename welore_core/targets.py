"""Which matrices WeLore compresses: every linear layer inside the decoder blocks.

Embeddings and the LM head are never targets. Supported: Llama-family decoders (Llama,
Mistral, Qwen2/3 style, with or without grouped-query attention).
"""

from __future__ import annotations

from torch import nn

from .errors import UnsupportedModel
from .lowrank import LowRankLinear

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
TARGET_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OUTPUT_SUFFIXES = ("o_proj", "down_proj")  # close a block: write its output into the residual stream


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    model_type = str(getattr(getattr(model, "config", None), "model_type", None))
    model_type = model_type.removeprefix("welore_")  # the factorised form of a family (portable/)
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if model_type not in SUPPORTED_MODEL_TYPES or not isinstance(layers, nn.ModuleList):
        raise UnsupportedModel(
            f"expected a Llama-family causal LM ({', '.join(SUPPORTED_MODEL_TYPES)}) with "
            f"model.layers; received model_type={model_type!r} ({type(model).__name__}). "
            "Use a Llama, Mistral or Qwen2-style checkpoint.")
    return layers


def target_names(model: nn.Module) -> list[str]:
    """Dotted names of the target matrices, layer by layer, in module order."""
    decoder_layers(model)
    names = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, LowRankLinear)) and name.startswith("model.layers.") \
                and name.rsplit(".", 1)[-1] in TARGET_SUFFIXES:
            names.append(name)
    if not names:
        raise UnsupportedModel(f"no target linear layers ({', '.join(TARGET_SUFFIXES)}) found "
                               f"inside the decoder blocks of {type(model).__name__}")
    return names


def layer_index(name: str) -> int:
    return int(name.split(".")[2])


def closes_block(name: str) -> bool:
    """o_proj / down_proj: the matrix whose output is its attention / MLP block's output."""
    return name.rsplit(".", 1)[-1] in OUTPUT_SUFFIXES


def short_name(name: str) -> str:
    """`model.layers.3.self_attn.q_proj` → `3.q_proj`."""
    return f"{layer_index(name)}.{name.rsplit('.', 1)[-1]}"
