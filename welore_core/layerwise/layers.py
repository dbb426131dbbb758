"""Where decoder layers come from: the model in memory, or a checkpoint one layer at a time.

Both stores hold `model`, a whole causal LM whose embeddings, final norm, rotary embedding and
LM head are real; they differ in the decoder layers:
  ResidentLayers(model)    every layer lives in memory; `open`/`close` do nothing.
  StreamedLayers(source)   the layers stay on the meta device (no memory) until `open(L)`
                           reads layer L's tensors from the checkpoint and assigns them;
                           `close(L)` puts it back on the meta device, freeing it. Its
                           embeddings and head stay in a narrower stored dtype (bf16).
Algorithms walk `for L in range(store.n_layers): layer = store.open(L) ... store.close(L)`
and so hold one layer at a time when streamed (on the GPU too: `device`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..errors import CorruptCheckpoint
from ..modelfiles import meta_model, read_config, rebuild_buffers
from ..targets import decoder_layers
from .source import CheckpointSource, layer_of


class ResidentLayers:
    """The decoder layers of a model held whole in memory."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = decoder_layers(model)
        self.n_layers = len(self.layers)

    def open(self, layer: int) -> nn.Module:
        return self.layers[layer]

    def close(self, layer: int) -> None:
        return None


def _assign(module: nn.Module, state: dict[str, torch.Tensor], what: str, skip=lambda name: False) -> None:
    """Give `module` exactly `state` (every parameter but those `skip` names must be in it)."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        raise CorruptCheckpoint(f"{what}: tensor shapes disagree with the model's config/welore.json: "
                                f"{exc}") from exc
    params = dict(module.named_parameters(remove_duplicate=False))
    missing = [n for n in missing if n in params and not skip(n)]
    if missing or unexpected:
        raise CorruptCheckpoint(f"{what}: weights do not match the model (missing: {missing[:5]}, "
                                f"unexpected: {unexpected[:5]}); the checkpoint is damaged")


class StreamedLayers:
    """A checkpoint's model with only its non-layer parts in memory; layers opened one at a time."""

    def __init__(self, path: Path | str, config=None, factored: Optional[dict[str, int]] = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 source: Optional[CheckpointSource] = None):
        self.source = source or CheckpointSource(path)
        if config is None:
            try:
                config = read_config(path)
            except Exception as exc:
                raise CorruptCheckpoint(f"cannot read {path}/config.json: {exc}") from exc
        self.config, self.device, self.dtype = config, torch.device(device), dtype
        self.model = meta_model(config, factored)
        self.layers = decoder_layers(self.model)
        self.n_layers = len(self.layers)
        if self.source.n_layers != self.n_layers:
            raise CorruptCheckpoint(f"{path}: config.json says {self.n_layers} decoder layers, the weights hold "
                                    f"{self.source.n_layers}; the checkpoint is damaged")
        others = self.source.other_names()
        tied = bool(getattr(config, "tie_word_embeddings", False))
        if tied:
            others = [n for n in others if n != "lm_head.weight"]
        _assign(self.model, {n: self.source.tensor(n, self.source.held_dtype(n, dtype)) for n in others},
                f"{path} (embeddings, norm, head)",
                skip=lambda n: layer_of(n) is not None or (tied and n == "lm_head.weight"))
        if tied:
            self.model.tie_weights()
        embed = self.model.get_input_embeddings()
        if embed.weight.dtype != dtype:  # a gather: its rows upcast exactly as they are looked up (the head:
            # block by block in scoring.nll_sum)
            embed.register_forward_hook(lambda module, args, out: out.to(dtype))
        rebuild_buffers(self.model, config)
        for name, p in self.model.named_parameters():
            if not p.is_meta and layer_of(name) is None:
                p.data = p.data.to(self.device)
        for name, b in self.model.named_buffers():
            if layer_of(name) is None:
                b.data = b.data.to(self.device)
        self.model.eval()
        self._open: set[int] = set()

    def open(self, layer: int) -> nn.Module:
        module = self.layers[layer]
        if layer not in self._open:
            _assign(module, self.source.layer_state(layer, self.dtype, strip=True), f"layer {layer}")
            module.to(self.device)
            self._open.add(layer)
        return module

    def close(self, layer: int) -> None:
        if layer in self._open:
            self.layers[layer].to("meta")
            self._open.discard(layer)
