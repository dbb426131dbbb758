"""Modelling code that every factorised WeLore checkpoint carries (copied there beside
integrity.py and named by config.json's `auto_map`), so plain transformers loads it with
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`: torch + transformers only,
no welore needed. welore_core uses these same classes.

A Low-Rank Component W ≈ B·A is a LowRankLinear holding A (k×in) and B (out×k). Each model
class is a transformers Llama-family causal LM whose config lists, in `welore_factored`
({module name: rank}), the linears that are low-rank; they are built that way at construction,
so from_pretrained loads A and B like any other weight (none is left random). The configs'
model types ("welore_llama", ...) are registered by nothing in transformers: loading without
trust_remote_code fails with transformers' request to pass it, never with random weights.

`from_pretrained` checks the weight files against welore.json's SHA-256 record first;
`save_pretrained` writes that record (and keeps the rest of welore.json); `merge_and_unload()`
turns the model back into the plain transformers class with dense Ŵ = B·A.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from .integrity import META, check_directory, file_records, read_record


_SHORT_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}  # welore.json's names


class LowRankLinear(nn.Module):
    """y = B·(A·x) (+ bias): the factored form of an out×in linear layer of rank k."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))  # k×n
        self.B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))  # m×k
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None) -> "LowRankLinear":
        k, n = A.shape
        m, k2 = B.shape
        assert k == k2, f"factor ranks differ: A is {tuple(A.shape)}, B is {tuple(B.shape)}"
        mod = cls(n, m, 0, bias=False, device="meta", dtype=A.dtype)  # allocate nothing, then adopt
        mod.rank = k
        mod.A = nn.Parameter(A.detach().contiguous())
        mod.B = nn.Parameter(B.detach().contiguous())
        mod.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two GEMMs on a 2-D view: the n-D path of F.linear costs ~2 µs more per call, which is
        # a quarter of a small matrix's time when decoding one token on a CPU.
        lead = x.shape[:-1]
        h = F.linear(x.reshape(-1, self.in_features), self.A)  # (tokens, k)
        return F.linear(h, self.B, self.bias).view(*lead, self.out_features)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """Ŵ = B·A (m×n), computed in fp32 (at least) and returned in the factors' dtype."""
        acc = torch.promote_types(self.A.dtype, torch.float32)
        return (self.B.to(acc) @ self.A.to(acc)).to(self.A.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")


def swap_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the submodule at dotted `name` by `new`; returns the old one. The only swap."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def _config_class(base: type, model_type: str) -> type:
    """`base` with its own model_type and a `welore_factored` field (transformers 4.x and 5.x)."""
    if dataclasses.is_dataclass(base):  # transformers 5: configs are strict dataclasses
        from huggingface_hub.dataclasses import strict

        cls = type(f"Welore{base.__name__}", (base,), {
            "__module__": __name__, "model_type": model_type, "_auto_class": "AutoConfig",
            "__annotations__": {"welore_factored": "dict | None"}, "welore_factored": None})
        return strict(cls)

    def __init__(self, welore_factored=None, **kwargs):
        self.welore_factored = welore_factored
        base.__init__(self, **kwargs)

    return type(f"Welore{base.__name__}", (base,), {
        "__module__": __name__, "model_type": model_type, "_auto_class": "AutoConfig", "__init__": __init__})


class _LowRankMixin:
    """Builds the low-rank linears its config names; verifies, saves and merges them."""

    _auto_class = "AutoModelForCausalLM"
    welore_meta: dict | None = None  # welore.json of the checkpoint it was loaded from

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        for name, rank in (getattr(config, "welore_factored", None) or {}).items():
            old = self.get_submodule(name)
            swap_module(self, name, LowRankLinear(old.in_features, old.out_features, int(rank),
                                                  bias=old.bias is not None, device=old.weight.device,
                                                  dtype=old.weight.dtype))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        path = Path(str(pretrained_model_name_or_path))
        record = read_record(path) if path.is_dir() else None
        if record and isinstance(record.get("files"), dict):
            problems = check_directory(path, record["files"])
            if problems:
                raise OSError(f"{path} is damaged: " + "; ".join(problems) + ". Re-create or re-download it.")
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model.welore_meta = record
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save (config + auto_map + this code + weights), then welore.json's
        integrity record for the files just written (other welore.json fields are kept)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        meta = dict(self.welore_meta or {"format_version": 1, "kind": "compressed"})
        meta.update(factored=dict(self.config.welore_factored or {}),
                    dtype=_SHORT_DTYPES.get(self.dtype, str(self.dtype)), files=file_records(save_directory))
        (Path(save_directory) / META).write_text(json.dumps(meta, indent=2) + "\n")

    @torch.no_grad()
    def merge_and_unload(self):
        """Replace each LowRankLinear by an nn.Linear holding Ŵ = B·A; return this model as the
        plain transformers class, which saves and loads without remote code."""
        for name, module in list(self.named_modules()):
            if isinstance(module, LowRankLinear):
                dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                  device=module.A.device, dtype=module.A.dtype)
                dense.weight.copy_(module.merged_weight())
                if module.bias is not None:
                    dense.bias.copy_(module.bias)
                swap_module(self, name, dense)
        plain = self._welore_plain_class
        self.config.__class__ = plain.config_class
        for key in ("welore_factored", "auto_map"):
            self.config.__dict__.pop(key, None)
        self.config.architectures = [plain.__name__]
        self.__class__ = plain
        self.welore_meta = None
        return self


WeloreLlamaConfig = _config_class(LlamaConfig, "welore_llama")
WeloreMistralConfig = _config_class(MistralConfig, "welore_mistral")
WeloreQwen2Config = _config_class(Qwen2Config, "welore_qwen2")


class WeloreLlamaForCausalLM(_LowRankMixin, LlamaForCausalLM):
    config_class = WeloreLlamaConfig
    _welore_plain_class = LlamaForCausalLM


class WeloreMistralForCausalLM(_LowRankMixin, MistralForCausalLM):
    config_class = WeloreMistralConfig
    _welore_plain_class = MistralForCausalLM


class WeloreQwen2ForCausalLM(_LowRankMixin, Qwen2ForCausalLM):
    config_class = WeloreQwen2Config
    _welore_plain_class = Qwen2ForCausalLM


# plain model_type → (config class, model class) of its factorised form
FAMILIES = {"llama": (WeloreLlamaConfig, WeloreLlamaForCausalLM),
            "mistral": (WeloreMistralConfig, WeloreMistralForCausalLM),
            "qwen2": (WeloreQwen2Config, WeloreQwen2ForCausalLM)}
