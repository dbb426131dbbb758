"""Factorised linear layers for vLLM: a group of linears that share one input (q/k/v, gate/up, or
a single o_proj/down_proj), each member either low-rank W ≈ B·A (A k×in, B out×k) or dense W.

Forward: ONE GEMM for the whole group's first stage (the A rows of the factored members stacked
with the W rows of the dense ones), then one GEMM per factored member's B. Every GEMM is a vLLM
ReplicatedLinear, so it runs vLLM's own kernels (on a CPU: prepacked oneDNN / sgl GEMMs).

Tensor parallelism splits the rank dimension: rank r holds rows [r·k', (r+1)·k') of each A
(column-parallel over k, with k padded to a multiple of the TP size by zero rows) and the same
columns of B (row-parallel over k, zero columns for the padding), so each holds 1/tp of every
factor and does 1/tp of its FLOPs; the partial B outputs of all factored members are summed with
ONE all-reduce, after which each rank keeps its own slice of the outputs (its heads, its part of
the intermediate size), exactly the partition vLLM's dense layers use. Dense members keep vLLM's
usual column partition. A factored o_proj/down_proj (whose input vLLM partitions by heads /
intermediate size) first all-gathers its input. At tp=1 there is no communication.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vllm.distributed import tensor_model_parallel_all_gather, tensor_model_parallel_all_reduce
from vllm.model_executor.layers.linear import ReplicatedLinear


@dataclass(frozen=True)
class Member:
    """One linear of a group: its full output size, the rows [start, start + size) of that output
    this TP rank produces, and its rank (None: dense)."""

    full_out: int
    start: int
    size: int
    rank: int | None


def _gemm(n_in: int, n_out: int, prefix: str) -> ReplicatedLinear:
    return ReplicatedLinear(n_in, n_out, bias=False, prefix=prefix)


class FactoredGroup(nn.Module):
    """Drop-in for vLLM's QKVParallelLinear / MergedColumnParallelLinear / RowParallelLinear:
    `forward(x)` returns (the members' local outputs concatenated, None)."""

    def __init__(self, input_size: int, members: list[Member], tp_rank: int, tp_size: int, bias: bool,
                 gather_input: bool = False, reduce: bool = True, prefix: str = ""):
        super().__init__()
        self.members, self.tp_rank, self.tp_size = members, tp_rank, tp_size
        self.input_size, self.gather_input, self.reduce = input_size, gather_input, reduce
        self.kloc = [-(-m.rank // tp_size) if m.rank is not None else None for m in members]  # ceil(k / tp)
        self.rows = [k if k is not None else m.size for k, m in zip(self.kloc, members)]
        self.offsets = [sum(self.rows[:i]) for i in range(len(members))]
        self.first = _gemm(input_size, sum(self.rows), f"{prefix}.first")
        self.first.weight.data.zero_()  # padding rows stay zero
        self.factored = [i for i, m in enumerate(members) if m.rank is not None]
        self.second = nn.ModuleList(
            _gemm(self.kloc[i], members[i].full_out, f"{prefix}.second{i}") for i in self.factored)
        for g in self.second:
            g.weight.data.zero_()  # padding columns stay zero
        self.out_sizes = [m.size for m in members]
        self.bias = nn.Parameter(torch.zeros(sum(self.out_sizes)), requires_grad=False) if bias else None
        self.out_offsets = [sum(self.out_sizes[:i]) for i in range(len(members))]
        self.loaded: set[tuple[int, str]] = set()

    def load(self, index: int, leaf: str, tensor: torch.Tensor) -> None:
        """Copy the checkpoint's `<member>.<leaf>` (A, B, weight or bias) into this rank's shard."""
        m, first = self.members[index], self.first.weight.data
        self.loaded.add((index, leaf))
        if leaf == "bias":
            self.bias.data[self.out_offsets[index]:][:m.size].copy_(tensor[m.start:m.start + m.size])
        elif m.rank is None:
            _expect(leaf, "weight", tensor, (m.full_out, self.input_size))
            first[self.offsets[index]:][:m.size].copy_(tensor[m.start:m.start + m.size])
        else:
            k, lo = self.kloc[index], self.tp_rank * self.kloc[index]
            n = max(0, min(m.rank, lo + k) - lo)  # real (unpadded) rank rows this TP rank holds
            if leaf == "A":
                _expect(leaf, "A", tensor, (m.rank, self.input_size))
                first[self.offsets[index]:][:n].copy_(tensor[lo:lo + n])
            else:
                _expect(leaf, "B", tensor, (m.full_out, m.rank))
                self.second[self.factored.index(index)].weight.data[:, :n].copy_(tensor[:, lo:lo + n])

    def missing(self) -> list[str]:
        """The member tensors (by member index and leaf) not loaded yet; biases excepted."""
        want = {(i, leaf) for i, m in enumerate(self.members) for leaf in (("weight",) if m.rank is None else "AB")}
        return sorted(f"member {i}.{leaf}" for i, leaf in want - self.loaded)

    def forward(self, x: torch.Tensor):
        if self.gather_input and self.tp_size > 1:
            x = tensor_model_parallel_all_gather(x, dim=-1)
        h, _ = self.first(x)
        parts = h.split(self.rows, dim=-1) if len(self.members) > 1 else (h,)
        full = [g(parts[i].contiguous())[0] for g, i in zip(self.second, self.factored)]
        if self.tp_size > 1 and self.reduce:
            sizes = [self.members[i].full_out for i in self.factored]
            full = tensor_model_parallel_all_reduce(torch.cat(full, dim=-1)).split(sizes, dim=-1)
        outs = list(parts)
        for y, i in zip(full, self.factored):
            m = self.members[i]
            outs[i] = y if m.size == m.full_out else y[..., m.start:m.start + m.size]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        if self.bias is not None and (self.reduce or self.tp_rank == 0):  # unreduced: the caller sums ranks
            y = y + self.bias
        return y, None


def _expect(leaf: str, want: str, tensor: torch.Tensor, shape: tuple[int, int]) -> None:
    if leaf != want or tuple(tensor.shape) != shape:
        raise ValueError(f"welore checkpoint tensor .{leaf} of shape {tuple(tensor.shape)} does not fit: "
                         f"expected .{want} of shape {shape}")


def qkv_members(layer, ranks: dict[int, int]) -> list[Member]:
    """Members q, k, v of a vLLM QKVParallelLinear `layer` (head partition as vLLM does it)."""
    hd, r = layer.head_size, layer.tp_rank
    q = layer.num_heads * hd
    kv = layer.num_kv_heads * hd
    kv_start = (r // layer.num_kv_head_replicas) * kv
    return [Member(layer.total_num_heads * hd, r * q, q, ranks.get(0)),
            Member(layer.total_num_kv_heads * hd, kv_start, kv, ranks.get(1)),
            Member(layer.total_num_kv_heads * hd, kv_start, kv, ranks.get(2))]


def merged_members(layer, ranks: dict[int, int]) -> list[Member]:
    """Members of a vLLM MergedColumnParallelLinear (gate, up)."""
    out = []
    for i, full in enumerate(layer.output_sizes):
        size = full // layer.tp_size
        out.append(Member(full, layer.tp_rank * size, size, ranks.get(i)))
    return out


def replace(layer, ranks: dict[int, int], prefix: str) -> FactoredGroup:
    """The FactoredGroup that takes the place of vLLM's dense `layer`, with members' ranks `ranks`
    {member index: rank} (members not listed stay dense)."""
    from vllm.model_executor.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear,
                                                   RowParallelLinear)

    bias = layer.bias is not None
    if isinstance(layer, QKVParallelLinear):
        members = qkv_members(layer, ranks)
    elif isinstance(layer, MergedColumnParallelLinear):
        members = merged_members(layer, ranks)
    elif isinstance(layer, RowParallelLinear):
        member = Member(layer.output_size, 0, layer.output_size, ranks[0])
        return FactoredGroup(layer.input_size, [member], layer.tp_rank, layer.tp_size, bias, gather_input=True,
                             reduce=layer.reduce_results, prefix=prefix)
    else:
        raise TypeError(f"{prefix}: cannot factorise a {type(layer).__name__}")
    return FactoredGroup(layer.input_size, members, layer.tp_rank, layer.tp_size, bias, prefix=prefix)
