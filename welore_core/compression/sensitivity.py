"""How much the model's loss moves per unit of output error in each target matrix: the weights of
the loss allocation (allocation.allocate_loss).

Truncating W to rank k changes its outputs on the calibration tokens by ΔY = (W − Ŵ)·Xᵀ, and the
whitened truncation error is ‖ΔY‖² = Σ_{i≥k} σ_i² (the spectrum of W·S, whiten.py). To second order
the next-token loss grows by ½·Σ F·ΔY² (the diagonal empirical Fisher F = g², g = ∂loss/∂Y on real
text); averaged over W's outputs and tokens, c_W = mean g², that is ½·c_W·‖ΔY‖². c_W differs by more
than an order of magnitude between matrix types (on SmolLM2, v_proj's and o_proj's outputs move the
loss 40–60× more per unit of error than q_proj's), which the whitened spectra alone cannot see.

`output_sensitivity` runs the windows forward one decoder layer at a time (layerwise.hidden, as
calibration does, so the same code serves a model in memory and one streamed from disk), spilling each
layer's inputs to a file, takes the gradient of the summed next-token loss at the last hidden state,
and walks the layers back: each is opened again, re-run on its inputs (read back) with autograd, and
the output gradient is carried to its input (no weight gradients are formed). Memory follows one
layer, not the depth: the windows' hidden states and their gradients (2 × windows × seq_len × hidden)
and one layer's activations; the disk holds n_layers × windows × seq_len × hidden in the layers'
dtype for the length of the pass (566 MB for SmolLM2-135M at 16 × 512 tokens in float32, 21 GB for
an 80-layer, 8192-wide model).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UnsupportedModel
from ..layerwise.hidden import HiddenStates
from ..progress import ProgressEvent, ProgressFn, StopFn, check_stop, no_progress
from ..scoring import head_weight, nll_sum_grad
from ..targets import layer_index

WINDOWS = 16  # calibration windows the gradients are taken on (the first ones)
BATCH_TOKENS = 4096  # windows per layer re-run: ⌈BATCH_TOKENS / seq_len⌉


def output_sensitivity(store, names: list[str], tokens: torch.Tensor, spill: Path,
                       progress: ProgressFn = no_progress, should_stop: StopFn | None = None) -> torch.Tensor:
    """c_W = mean over tokens and outputs of (∂ Σ next-token NLL / ∂ y_W)² for every target `names`
    (float64, in their order), on the windows `tokens` (N × L) through `store`
    (layers.ResidentLayers or StreamedLayers); the layers' inputs wait in the directory `spill`.
    Only relative values matter to the allocation."""
    model = store.model
    states = HiddenStates(model, tokens, should_stop, batch_tokens=BATCH_TOKENS)
    for L in range(store.n_layers):  # forward: spill each layer's inputs
        torch.save([h.to("cpu") for h in states.hidden], spill / f"layer-{L}.pt")
        states.run(store.open(L))
        store.close(L)
        progress(ProgressEvent("calibrate", L + 1, 2 * store.n_layers, message=f"sensitivity: layer {L} (forward)"))
    grads = _head_gradients(model, states.hidden, tokens, should_stop)
    states.hidden.clear()
    by_layer: dict[int, list[int]] = {}
    for i, n in enumerate(names):
        by_layer.setdefault(layer_index(n), []).append(i)
    sums = torch.zeros(len(names), dtype=torch.float64)
    counts = torch.zeros(len(names), dtype=torch.float64)
    for L in reversed(range(store.n_layers)):  # backward: carry ∂loss/∂h down, layer by layer
        layer = store.open(L)
        handles = [model.get_submodule(names[i]).register_forward_hook(_collector(i, sums, counts))
                   for i in by_layer.get(L, [])]
        try:
            inputs = torch.load(spill / f"layer-{L}.pt")
            for b, (x, kw) in enumerate(zip(inputs, states.kwargs)):
                check_stop(should_stop)
                x = x.to(grads[b].device).detach().requires_grad_(True)
                with torch.enable_grad():
                    out = layer(x, **kw)
                    out = out[0] if isinstance(out, tuple) else out
                    grads[b], = torch.autograd.grad(out, x, grad_outputs=grads[b].to(out.dtype))
        finally:
            for h in handles:
                h.remove()
        (spill / f"layer-{L}.pt").unlink()
        store.close(L)
        progress(ProgressEvent("calibrate", 2 * store.n_layers - L, 2 * store.n_layers,
                               message=f"sensitivity: layer {L} (backward)"))
    return sums / counts.clamp_min(1.0)


def _collector(i: int, sums: torch.Tensor, counts: torch.Tensor):
    def forward_hook(module, args, out):
        def grad_hook(g: torch.Tensor) -> None:
            sums[i] += float(g.detach().double().pow(2).sum())
            counts[i] += g.numel()

        if out.requires_grad:
            out.register_hook(grad_hook)
    return forward_hook


def _head_gradients(model, hidden: list[torch.Tensor], tokens: torch.Tensor,
                    should_stop: StopFn | None) -> list[torch.Tensor]:
    """∂(Σ next-token NLL)/∂h at the final hidden states of every batch, one window at a time
    (the head's part block by block, scoring.nll_sum_grad; the final norm's by autograd)."""
    norm, weight = model.model.norm, head_weight(model)
    if weight is None:
        raise UnsupportedModel(f"{type(model).__name__}'s LM head is not a plain linear map; the loss allocation "
                               "weighs matrices through Llama-family heads only (use --method welore)")
    grads, row = [], 0
    for h in hidden:
        g = torch.empty_like(h)
        for j in range(h.shape[0]):
            check_stop(should_stop)
            x = h[j].detach().requires_grad_(True)
            with torch.enable_grad():
                y = norm(x)[:-1]
                gy = nll_sum_grad(y.detach(), weight, tokens[row + j, 1:])
                g[j], = torch.autograd.grad(y, x, grad_outputs=gy.to(y.dtype))
        grads.append(g)
        row += h.shape[0]
    return grads
