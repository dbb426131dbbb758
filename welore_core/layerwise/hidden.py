"""Token windows run through a model one decoder layer at a time.

`HiddenStates(model, tokens)` runs the windows through the embeddings once: a pre-hook on
decoder layer 0 captures its input hidden states (N×L×hidden, on the model's device) and the
keyword arguments the model passes its layers (rotary embeddings, causal mask), then stops the
forward — so the layers themselves may still be on the meta device (layers.StreamedLayers).
`run(layer)` advances every batch through one layer; `nll(model, tokens)` applies the final
norm and LM head (one block of the vocabulary at a time, scoring.nll_sum) and sums the
next-token negative log-likelihood. Calibration (statistics per layer) and streamed
evaluation both use it: the same mechanism for a model in memory and one streamed from disk.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from ..errors import UnsupportedModel
from ..progress import ProgressEvent, ProgressFn, StopFn, check_stop, no_progress
from ..scoring import head_weight, nll_sum
from ..targets import decoder_layers

BATCH_TOKENS = 4096  # windows per layer forward: ⌈BATCH_TOKENS / seq_len⌉


class _Captured(Exception):
    pass


class HiddenStates:
    """The windows' hidden states at the input of the next decoder layer to run."""

    def __init__(self, model: nn.Module, tokens: torch.Tensor, should_stop: StopFn | None = None,
                 batch_tokens: int = BATCH_TOKENS):
        layers = decoder_layers(model)
        device = model.get_input_embeddings().weight.device
        per_batch = max(1, batch_tokens // tokens.shape[1])
        self.hidden: list[torch.Tensor] = []
        self.kwargs: list[dict] = []

        def catch(module, args, kwargs):
            self.hidden.append(args[0] if args else kwargs.pop("hidden_states"))
            self.kwargs.append(dict(kwargs))
            raise _Captured

        handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            with torch.no_grad():
                for i in range(0, tokens.shape[0], per_batch):
                    check_stop(should_stop)
                    try:
                        model(input_ids=tokens[i:i + per_batch].to(device), use_cache=False)
                    except _Captured:
                        pass
        finally:
            handle.remove()
        self.should_stop = should_stop

    @torch.no_grad()
    def run(self, layer: nn.Module, stats=None, update: bool = True) -> None:
        """Run `layer` on every batch (`stats.end_call()` after each); keep its outputs if `update`."""
        for i, (h, kw) in enumerate(zip(self.hidden, self.kwargs)):
            check_stop(self.should_stop)
            out = layer(h, **kw)
            if stats is not None:
                stats.end_call()
            if update:
                self.hidden[i] = out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def nll(self, model: nn.Module, tokens: torch.Tensor) -> float:
        """Σ −log p(token t+1 | ..t) over every window, from the final hidden states."""
        norm, weight = model.model.norm, head_weight(model)
        if weight is None:
            raise UnsupportedModel(f"{type(model).__name__}'s LM head is not a plain linear map; layer-by-layer "
                                   "evaluation scores only Llama-family heads")
        total, row = 0.0, 0
        for h in self.hidden:
            check_stop(self.should_stop)
            x = norm(h)[:, :-1]  # (b, L-1, hidden)
            target = tokens[row:row + h.shape[0], 1:]
            total += nll_sum(x.reshape(-1, x.shape[-1]), weight, target.reshape(-1), dtype=x.dtype)
            row += h.shape[0]
        return total


def layered_perplexity(store, tokens: torch.Tensor, progress: ProgressFn = no_progress,
                       should_stop: StopFn | None = None):
    """Perplexity of the windows `tokens` (N×L) through `store` (layers.ResidentLayers or
    StreamedLayers), one decoder layer at a time; equals evaluate.perplexity's."""
    from ..evaluate import EvalResult

    t0 = time.perf_counter()
    states = HiddenStates(store.model, tokens, should_stop)
    for L in range(store.n_layers):
        states.run(store.open(L))
        store.close(L)
        progress(ProgressEvent("eval", L + 1, store.n_layers, message=f"layer {L}"))
    count = tokens.shape[0] * (tokens.shape[1] - 1)
    loss = states.nll(store.model, tokens) / count
    return EvalResult(perplexity=math.exp(loss) if loss < 700 else float("inf"), loss=loss, tokens=count,
                      windows=tokens.shape[0], seq_len=tokens.shape[1], seconds=time.perf_counter() - t0)
