"""Statistics of a decoder layer's inputs over the calibration tokens, gathered by forward
pre-hooks on its target linears (calibration.py runs the layer; this module only accumulates):

- `InputStats`: per distinct input tensor (q/k/v share one, gate/up share one), the float64 Gram
  matrix XᵀX (the whitening's G), with each window's first token weighted by
  `sink_weight`.
- `CrossStats` (`compensate`): for the matrices that close a block, their dense inputs X kept
  from one run, then C = XᵀX̂ and Ĝ = X̂ᵀX̂ with the inputs X̂ of a second run.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..errors import InvalidData
from .whiten import DAMP, Transform, compensated_weight, gram_root


class _PreHooks:
    """A forward pre-hook per module while inside `with`; subclasses define `_hook(name)`."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self._handles = []

    def __enter__(self):
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str):
        raise NotImplementedError




def token_weights(x: torch.Tensor, sink_weight: float) -> Optional[torch.Tensor]:
    """(tokens×1) float64 weights for inputs x (windows, positions, n): each window's first token
    counts `sink_weight` times; None when every token counts once."""
    if sink_weight == 1.0 or x.dim() != 3:
        return None
    w = torch.ones(x.shape[:2], dtype=torch.float64, device=x.device)
    w[:, 0] = sink_weight
    return w.reshape(-1, 1)


class InputStats(_PreHooks):
    """Forward pre-hooks on some linear modules accumulating, per distinct input tensor, the
    float64 Gram matrix XᵀX over all tokens seen.

    Modules called in one forward with the very same input tensor object (q/k/v, gate/up)
    share one accumulator. Call `end_call()` after each forward of the layer.
    """

    def __init__(self, modules: dict[str, nn.Module], sink_weight: float = 1.0):
        super().__init__(modules)
        self.sink_weight = sink_weight  # weight of each window's first token (1: plain XᵀX)
        self.group_of: dict[str, int] = {}
        self.groups: list[list[str]] = []
        self.gram: list[Optional[torch.Tensor]] = []
        self.tokens: list[int] = []
        self.updates = 0  # accumulations performed (one per distinct input per forward)
        self._seen: list[tuple[torch.Tensor, int]] = []

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._seen.clear()

    def end_call(self) -> None:
        self._seen.clear()

    def _hook(self, name: str):
        def pre(module, args):
            x = args[0]
            for seen, g in self._seen:
                if seen is x:  # the same input as a module already called in this forward
                    if name not in self.group_of:
                        self.group_of[name] = g
                        self.groups[g].append(name)
                    return None
            g = self.group_of.get(name)
            if g is None:
                g = len(self.groups)
                self.group_of[name] = g
                self.groups.append([name])
                self.gram.append(None)
                self.tokens.append(0)
            self._accumulate(g, x)
            self._seen.append((x, g))
            return None
        return pre

    @torch.no_grad()
    def _accumulate(self, g: int, x: torch.Tensor) -> None:
        w = token_weights(x, self.sink_weight)
        x = x.detach().reshape(-1, x.shape[-1]).double()  # tokens×n
        add = x.T @ (x if w is None else x * w)  # n×n
        self.gram[g] = add if self.gram[g] is None else self.gram[g].add_(add)
        self.tokens[g] += x.shape[0]
        self.updates += 1

    def transform(self, name: str, damp: float = DAMP) -> Transform:
        """The whitening S (S·Sᵀ = XᵀX + δ·I) of `name`'s inputs."""
        g = self.group_of.get(name)
        if g is None:
            raise InvalidData(f"module {name} never ran during calibration; expected every target "
                              "matrix of the layer to see the calibration tokens")
        return gram_root(self.gram[g], damp)


class CrossStats(_PreHooks):
    """Forward pre-hooks on the matrices that close a block, for `compensate`: in the "dense"
    phase they keep each call's input X; in the "compressed" phase (same batches, same order)
    they accumulate, in float64, C = XᵀX̂ and Ĝ = X̂ᵀX̂ with the new inputs X̂."""

    def __init__(self, modules: dict[str, nn.Module], sink_weight: float = 1.0):
        super().__init__(modules)
        self.sink_weight = sink_weight
        self.phase = "dense"
        self.dense: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
        self.cross: dict[str, torch.Tensor] = {}
        self.gram: dict[str, torch.Tensor] = {}
        self._calls: dict[str, int] = {}

    def __enter__(self) -> "CrossStats":
        self._calls = {n: 0 for n in self.modules}  # calls of this phase: pairs X̂ with its X
        return super().__enter__()

    def _hook(self, name: str):
        def pre(module, args):
            x = args[0].detach()
            if self.phase == "dense":
                self.dense[name].append(x.clone())
                return None
            i = self._calls[name]
            self._calls[name] += 1
            w = token_weights(x, self.sink_weight)
            X = self.dense[name][i].reshape(-1, x.shape[-1]).double()
            self.dense[name][i] = None  # (freed as it is used)
            Xh = x.reshape(-1, x.shape[-1]).double()
            Xw = Xh if w is None else Xh * w
            for acc, add in ((self.cross, X.T @ Xw), (self.gram, Xh.T @ Xw)):
                acc[name] = add if name not in acc else acc[name].add_(add)
            return None
        return pre

    def _check(self, name: str) -> None:
        if name not in self.gram:
            raise InvalidData(f"module {name} never ran during calibration; expected every target "
                              "matrix of the layer to see the calibration tokens")

    def target(self, name: str, W: torch.Tensor) -> torch.Tensor:
        """W' = W·C·Ĝ⁻¹ for `name` (after the compressed phase)."""
        self._check(name)
        return compensated_weight(W, self.cross[name], self.gram[name])

    def transform(self, name: str, damp: float = DAMP) -> Transform:
        """The whitening S (S·Sᵀ = Ĝ + δ·I) W' is truncated under."""
        self._check(name)
        return gram_root(self.gram[name], damp)
