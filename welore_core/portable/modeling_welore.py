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

Linears that read the same input (q/k/v of an attention block, gate/up of an MLP) share one
GEMM once loaded (`fuse_factors()`, called by from_pretrained): a factored member's A rows and a
dense member's W rows are concatenated into one matrix, whose output is split, each factored
member then applying its B. The members' parameters become views into that matrix, so names,
bytes and state_dict stay those of the checkpoint and no second copy is held. The shared GEMM
runs only where no gradient is wanted for its rows; training takes each member's own path.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from .integrity import META, check_directory, file_records, read_record, weight_files


_SHORT_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}  # welore.json's names
_STORED = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}  # safetensors' float names


def stored_tensors(directory) -> dict[str, tuple[Path, int, torch.dtype, list]]:
    """{key: (file, byte offset, dtype, shape)} of the float tensors in a directory's safetensors."""
    out = {}
    for name in weight_files(directory):
        file = Path(directory) / name
        if file.suffix != ".safetensors":
            continue
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        for key, info in header.items():
            if key != "__metadata__" and info.get("dtype") in _STORED:
                out[key] = (file, 8 + size + info["data_offsets"][0], _STORED[info["dtype"]], info["shape"])
    return out


class LowRankLinear(nn.Module):
    """y = B·(A·x) (+ bias): the factored form of an out×in linear layer of rank k."""

    _shared: "SharedInput | None" = None  # the one GEMM it shares with its siblings (fuse_factors)

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
        x2 = x.reshape(-1, self.in_features)
        shared = self._shared
        h = shared.take(self, x, x2) if shared is not None and shared.usable() else F.linear(x2, self.A)  # (tokens, k)
        return F.linear(h, self.B, self.bias).view(*lead, self.out_features)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """Ŵ = B·A (m×n), computed in fp32 (at least) and returned in the factors' dtype."""
        acc = torch.promote_types(self.A.dtype, torch.float32)
        return (self.B.to(acc) @ self.A.to(acc)).to(self.A.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")


class SharedInputLinear(nn.Linear):
    """An nn.Linear whose weight rows live in a SharedInput (fuse_factors swaps the class in
    and out; parameters and state_dict are nn.Linear's)."""

    _shared: "SharedInput | None" = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self._shared
        if shared is None or not shared.usable():
            return super().forward(x)
        y = shared.take(self, x, x.reshape(-1, self.in_features))
        y = y + self.bias if self.bias is not None else y.contiguous()
        return y.view(*x.shape[:-1], self.out_features)


# sibling linears that read one input: the attention block's and the MLP's
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _first_weight(module: nn.Module) -> nn.Parameter:
    return module.A if isinstance(module, LowRankLinear) else module.weight


class SharedInput:
    """One GEMM for the first matrices (A of a LowRankLinear, W of an nn.Linear) of linears that
    read the same input. The members' parameters are row views into `weight`; the product of a
    call is kept until every member has taken its columns (or the input changes)."""

    def __init__(self, members: list[nn.Module], sources: list | None = None):
        """`sources`: per member None or where its rows are stored (see stored_tensors); those are
        read from the file, so pages a loader memory-mapped are not touched (and not resident)."""
        params = [_first_weight(m) for m in members]
        first = params[0]
        self.weight = torch.empty(sum(p.shape[0] for p in params), first.shape[1], dtype=first.dtype,
                                  device=first.device)  # new storage; the members' old one is let go below
        self.members, self.params, self.rows = members, params, {}
        start = 0
        for member, p, source in zip(members, params, sources or [None] * len(members)):
            rows = self.weight[start:start + p.shape[0]]
            if source is not None and source[2] == p.dtype and list(source[3]) == list(p.shape) and p.is_cpu:
                with open(source[0], "rb") as f:
                    f.seek(source[1])
                    f.readinto(rows.view(-1).view(torch.uint8).numpy())
            else:
                rows.copy_(p.detach())
            p.data = rows
            self.rows[id(member)] = (start, start + p.shape[0])
            start += p.shape[0]
        self.ptrs = [p.data_ptr() for p in params]
        self._x = self._y = None
        self._version = -1
        self._left = 0

    def intact(self) -> bool:
        """Every member's parameter still lies in `weight` (`.to()` or a `p.data = ...` moves it out)."""
        return all(p.data_ptr() == ptr for p, ptr in zip(self.params, self.ptrs))

    def usable(self) -> bool:
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.params):
            return False  # training: each member's own GEMM, so gradients reach its parameters
        return self.intact()

    def take(self, member: nn.Module, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """`member`'s columns of weight·x (x2: x as 2-D), one GEMM per distinct input."""
        version = 0 if x.is_inference() else x._version  # inference tensors count no versions
        if self._x is not x or self._version != version:
            self._x, self._version = x, version
            self._y = F.linear(x2, self.weight)
            self._left = len(self.members)
        y = self._y
        self._left -= 1
        if self._left <= 0:
            self._x = self._y = None
        start, end = self.rows[id(member)]
        return y[:, start:end]

    def release(self) -> None:
        """Give every member its own parameter storage back and leave the group."""
        for member, p in zip(self.members, self.params):
            p.data = p.data.clone()
            member._shared = None
            if type(member) is SharedInputLinear:
                member.__class__ = nn.Linear
        self.weight = self._x = self._y = None


def _fusable(members: list) -> bool:
    if not any(isinstance(m, LowRankLinear) for m in members):
        return False  # only groups that hold factors
    if not all(isinstance(m, LowRankLinear) or type(m) in (nn.Linear, SharedInputLinear) for m in members):
        return False
    firsts = [_first_weight(m) for m in members]
    return (len({m.in_features for m in members}) == 1 and len({(p.dtype, p.device) for p in firsts}) == 1
            and not any(p.is_meta for p in firsts))


@torch.no_grad()
def fuse_shared_inputs(model: nn.Module, directory=None) -> int:
    """Give each group of sibling linears in SHARED_INPUTS that holds factors one SharedInput
    (again where a group's parameters were moved since); returns how many groups share one.
    `directory`: the checkpoint the model was just loaded from, whose files the rows are read from."""
    stored = stored_tensors(directory) if directory is not None else {}
    fused = 0
    for prefix, parent in model.named_modules():
        for names in SHARED_INPUTS:
            members = [getattr(parent, n, None) for n in names]
            if any(not isinstance(m, nn.Module) for m in members) or not _fusable(members):
                continue
            group = getattr(members[0], "_shared", None)
            if group is not None and group.members == members and group.intact():
                fused += 1
                continue
            for m in members:
                if getattr(m, "_shared", None) is not None:
                    m._shared.release()
            keys = [f"{prefix}.{n}." + ("A" if isinstance(m, LowRankLinear) else "weight") for n, m in zip(names, members)]
            group = SharedInput(members, [stored.get(k.lstrip(".")) for k in keys])
            for m in members:
                if type(m) is nn.Linear:
                    m.__class__ = SharedInputLinear
                m._shared = group
            fused += 1
    return fused


@torch.no_grad()
def unfuse_shared_inputs(model: nn.Module) -> None:
    """Undo fuse_shared_inputs: every member its own parameters, plain nn.Linear classes."""
    for m in model.modules():
        if getattr(m, "_shared", None) is not None:
            m._shared.release()


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


def _aten_gemv_for_one_token(forward):
    """`forward` (its signature kept: generate() reads it), but a one-token step (a batch-1 decode
    step) in bf16/fp16 on a CPU runs with oneDNN off: ATen's own matrix-vector kernel then reads
    the weights about 1.6x faster than oneDNN's matmul, which also builds a kernel per distinct
    (tokens, out, in) shape. torch offers only the global switch, restored on return."""
    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        if not _one_token_on_cpu_in_half(self, args, kwargs):
            return forward(self, *args, **kwargs)
        enabled = torch._C._get_mkldnn_enabled()
        torch._C._set_mkldnn_enabled(False)
        try:
            return forward(self, *args, **kwargs)
        finally:
            torch._C._set_mkldnn_enabled(enabled)
    return wrapper


def _one_token_on_cpu_in_half(model: nn.Module, args: tuple, kwargs: dict) -> bool:
    x = kwargs.get("input_ids", args[0] if args else None)
    if x is None:
        x = kwargs.get("inputs_embeds")
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] * x.shape[1] != 1 or x.device.type != "cpu":
        return False
    return next(model.parameters()).dtype in (torch.bfloat16, torch.float16)


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
        model.fuse_factors(path if path.is_dir() else None)
        return model

    def fuse_factors(self, directory=None) -> int:
        """One GEMM for the A (or W) rows of q/k/v and of gate/up (see SharedInput); idempotent,
        and re-done after `.to()`. `directory`: the checkpoint just loaded (its rows are read from
        there). Returns how many groups share one."""
        self._welore_fused = True
        return fuse_shared_inputs(self, directory)

    def unfuse_factors(self) -> None:
        self._welore_fused = False
        unfuse_shared_inputs(self)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        if getattr(self, "_welore_fused", False):
            fuse_shared_inputs(self)  # parameters converted or moved: share one GEMM again
        return out

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.forward = _aten_gemv_for_one_token(cls._welore_plain_class.forward)

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
        self.unfuse_factors()
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
