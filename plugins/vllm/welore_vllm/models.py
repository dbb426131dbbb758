"""vLLM model classes for welore checkpoints: vLLM's own Llama / Mistral / Qwen2 model with each
linear that config.json's `welore_factored` lists built as low-rank factors (layers.FactoredGroup
in place of the qkv_proj / gate_up_proj / o_proj / down_proj that holds it), and a weight loader
that puts the checkpoint's `X.A`, `X.B` (and the dense `X.weight`, `X.bias` of a group's other
members) into those groups; every other tensor loads through vLLM's own loader."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from .layers import FactoredGroup, replace

# checkpoint linear name → (vLLM module that holds it, member index in that module)
GROUPS = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
          "o_proj": ("o_proj", 0), "down_proj": ("down_proj", 0)}


def group_of(name: str) -> tuple[str, int]:
    """'model.layers.0.self_attn.k_proj' → ('model.layers.0.self_attn.qkv_proj', 1)."""
    parent, _, leaf = name.rpartition(".")
    if leaf not in GROUPS:
        raise ValueError(f"welore_factored names {name!r}, which is not a projection this plug-in knows "
                         f"({', '.join(GROUPS)})")
    module, index = GROUPS[leaf]
    return f"{parent}.{module}", index


def factorise(model: torch.nn.Module, factored: dict[str, int]) -> None:
    """Swap each vLLM linear that holds a factored member for a FactoredGroup."""
    groups: dict[str, dict[int, int]] = {}
    for name, rank in factored.items():
        path, index = group_of(name)
        groups.setdefault(path, {})[index] = int(rank)
    for path, ranks in groups.items():
        parent, _, child = path.rpartition(".")
        try:
            old = model.get_submodule(path)
        except AttributeError:
            continue  # a layer another pipeline stage holds
        setattr(model.get_submodule(parent), child, replace(old, ranks, path))


class _WeloreMixin:
    """Builds the vLLM model, then factorises it; loads the factors into the groups."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        config = vllm_config.model_config.hf_config
        factorise(self, dict(getattr(config, "welore_factored", None) or {}))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded: set[str] = set()

        def others():
            for name, tensor in weights:
                module, _, leaf = name.rpartition(".")
                parent, _, member = module.rpartition(".")
                if member in GROUPS:
                    path, index = group_of(module)
                    group = _submodule(self, path)
                    if isinstance(group, FactoredGroup):
                        group.load(index, leaf, tensor)
                        loaded.update(f"{path}.{p}" for p, _ in group.named_parameters())
                        continue
                yield name, tensor

        result = set(super().load_weights(others())) | loaded
        for path, group in self.named_modules():
            if isinstance(group, FactoredGroup) and group.missing():
                raise ValueError(f"welore checkpoint lacks tensors of {path}: {', '.join(group.missing())}")
        return result


def _submodule(model: torch.nn.Module, path: str):
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


class WeloreLlamaForCausalLM(_WeloreMixin, LlamaForCausalLM):
    pass


class WeloreMistralForCausalLM(_WeloreMixin, MistralForCausalLM):
    pass


class WeloreQwen2ForCausalLM(_WeloreMixin, Qwen2ForCausalLM):
    pass
