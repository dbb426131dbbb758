"""Calibration for WeLore: tokens of real text → per-layer input statistics → the SVDs of W·S
(whiten.py) of every target matrix, cached like the plain spectra.

How the statistics are gathered (memory: one decoder layer's statistics at a time):
  1. The calibration windows run through the embeddings once; a pre-hook on decoder layer 0
     captures its input hidden states (N×L×hidden, kept on the model's device) and keyword
     arguments (rotary embeddings, mask), then stops the forward.
  2. Layer by layer: forward pre-hooks on the layer's target linears (input_stats.py) accumulate, in float64,
     G = XᵀX once per *distinct input tensor*: q/k/v receive the
     same tensor and share one accumulator, so do gate/up (found by identity, not by name).
     With `sink_weight` w ≠ 1 the first token of every window counts w times (G = XᵀDX):
     decoder LLMs park most attention on the first token (the attention sink), so an error in
     its value vector reaches every later token, while it is one token in seq_len of XᵀX.
     The layer's matrices are factorised, the statistics dropped, and the layer's outputs
     become the next layer's inputs.
  3. `sequential`: layer L's statistics are gathered with layers 0..L−1 already compressed
     (each layer runs twice: dense for its statistics, then compressed to feed the next).
  4. `compensate` (with `sequential`): the matrices that close a block (o_proj, down_proj) are
     fitted to the dense block's output instead of their own: the first run also keeps their
     dense inputs X (every batch, in the layer's dtype: tokens × (hidden + intermediate),
     277 MB for SmolLM2-135M at 64 × 512 tokens, freed as they are used), the layer's other
     matrices are compressed, a second run gives their inputs X̂ through those, C = XᵀX̂, Ĝ = X̂ᵀX̂ give
     W' = W·C·Ĝ⁻¹ (whiten.compensated_weight), truncated whitened under Ĝ. So down_proj absorbs
     what gate/up lost on the calibration tokens, o_proj what q/k/v lost (3 runs per layer).

Cache keys (`entry_key`) name the matrix, its weight hash, the model fingerprint, the tokens'
hash (data, tokenizer, samples and sequence length), the dtype, the factorisation and its
parameters, and for `sequential` the ranks given to every earlier layer (with `compensate`, also
to the layer's own other matrices), so a key is known before any forward pass: when every entry
is cached nothing runs at all.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..corpus import data_hash, read_texts
from ..errors import InvalidArgument, InvalidData
from ..evaluate import token_windows
from ..progress import ProgressEvent, ProgressFn, StopFn, check_stop, no_progress
from .input_stats import CrossStats, InputStats
from ..spectrum import SpectrumCache
from ..layerwise.hidden import HiddenStates
from ..layerwise.layers import ResidentLayers
from ..targets import closes_block, layer_index
from .config import CalibrationConfig
from .whiten import DAMP, Transform, transformed_svd

CAL_FORMAT = "calib-v1"
SENSITIVITY_FORMAT = "sensitivity-v1"
BATCH_TOKENS = 4096  # calibration windows per forward: ⌈BATCH_TOKENS / seq_len⌉


@dataclass(frozen=True)
class Calibration:
    """Calibration token windows and where they came from."""

    tokens: torch.Tensor  # (N, L) token ids
    data: str  # the spec given (file or built-in name)
    data_hash: str  # SHA-256 of the data file
    samples_requested: int

    @property
    def samples(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def tokens_hash(self) -> str:
        return tokens_hash(self.tokens)

    def record(self) -> dict:
        return {"data": self.data, "data_hash": self.data_hash, "samples": self.samples,
                "samples_requested": self.samples_requested, "seq_len": self.seq_len,
                "tokens": self.samples * self.seq_len, "tokens_hash": self.tokens_hash}


def tokens_hash(tokens: torch.Tensor) -> str:
    """What identifies a batch of token windows in cache keys (values and shape)."""
    t = tokens.to(torch.int64).contiguous()
    return hashlib.sha256(t.numpy().tobytes() + str(tuple(t.shape)).encode()).hexdigest()


def load_calibration(tokenizer, config: CalibrationConfig) -> Calibration:
    """The first `config.samples` windows of `config.seq_len` tokens of `config.data` (a .txt/.jsonl file
    or a built-in name), in file order, like evaluation windows. `config` is a resolved recipe's
    (`CompressConfig.resolve()` turns its "auto" window count into a number)."""
    if tokenizer is None:
        raise InvalidArgument("calibration needs the model's tokenizer, and this model ships none; "
                              "save the tokenizer files beside config.json or compress data-free "
                              "(--calibration none)")
    data, samples, seq_len = config.data, config.samples, config.seq_len
    if samples is None:
        raise ValueError("load_calibration needs a resolved CalibrationConfig (CompressConfig.resolve())")
    tokens = token_windows(tokenizer, read_texts(data), seq_len, samples)
    return Calibration(tokens, str(data), data_hash(data), samples)


# ---------------------------------------------------------------------------------------------
# Running the calibration batch one decoder layer at a time


class LayerInputs(HiddenStates):
    """The calibration windows' hidden states at the input of the next decoder layer to run
    (layerwise.hidden: the same mechanism streamed evaluation uses), batched by BATCH_TOKENS."""

    def __init__(self, model: nn.Module, tokens: torch.Tensor, should_stop: StopFn | None = None):
        super().__init__(model, tokens, should_stop, batch_tokens=BATCH_TOKENS)


# ---------------------------------------------------------------------------------------------
# Calibrated spectra: cache entries holding (U, Σ, Vᵀ·S⁻¹) of W·S


def entry_key(name: str, weight_key: str, source_hash: str, calibration: Calibration, dtype: torch.dtype,
              factorization: str, damp: float, prefix: str = "", sink_weight: float = 1.0) -> str:
    param = f"damp={damp!r}"
    if sink_weight != 1.0:  # (keys of unweighted statistics stay as they were)
        param += f",sink={sink_weight!r}"
    text = "|".join([CAL_FORMAT, name, weight_key, source_hash, calibration.tokens_hash, str(dtype),
                     factorization, param, prefix])
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class CalibratedSpectra:
    names: list[str]
    keys: list[str]
    values: list[torch.Tensor]  # singular values of W·S, descending, float32
    how: dict[str, str] = field(default_factory=dict)  # group leader → transform used (when not the default)
    factorized: int = 0  # matrices decomposed in this run
    forward_passes: int = 0  # layer forwards run (0 when every entry was cached)


ApplyFn = Callable[[str, str], None]  # (module name, cache key) → factorise and swap


class Calibrator:
    """Computes and caches the calibrated SVDs of a model's target matrices."""

    def __init__(self, model: nn.Module, names: list[str], weight_keys: list[str], source_hash: str,
                 calibration: Calibration, factorization: str, cache: SpectrumCache, *,
                 damp: float = DAMP, sink_weight: float = 1.0,
                 progress: ProgressFn = no_progress, should_stop: StopFn | None = None, store=None):
        if factorization != "whitened":
            raise InvalidArgument(f"factorization must be whitened for calibration; received {factorization!r}")
        max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if max_pos is not None and calibration.seq_len > max_pos:
            raise InvalidArgument(f"calib_seq_len {calibration.seq_len} exceeds the model's "
                                  f"max_position_embeddings {max_pos}; use a shorter --calib-seq-len")
        self.model, self.names, self.weight_keys = model, names, weight_keys
        self.source_hash, self.calibration, self.factorization = source_hash, calibration, factorization
        if not sink_weight > 0:
            raise InvalidArgument(f"sink_weight must be > 0 (1: every token counts once); received {sink_weight}")
        self.cache, self.damp, self.sink_weight = cache, damp, float(sink_weight)
        self.progress, self.should_stop = progress, should_stop
        self.dtype = next(model.parameters()).dtype
        self.store = store if store is not None else ResidentLayers(model)  # or layers streamed from disk
        self.layers = self.store.layers
        self.by_layer: dict[int, list[int]] = {}
        for i, n in enumerate(names):
            self.by_layer.setdefault(layer_index(n), []).append(i)

    def key(self, i: int, prefix: str = "") -> str:
        return entry_key(self.names[i], self.weight_keys[i], self.source_hash, self.calibration, self.dtype,
                         self.factorization, self.damp, prefix, self.sink_weight)

    def _factorize_layer(self, stats: InputStats, idx: list[int], keys: list[str], result: CalibratedSpectra) -> None:
        for i, key in zip(idx, keys):
            if key is None or self.cache.has(key):
                continue
            name = self.names[i]
            check_stop(self.should_stop)
            T = stats.transform(name, self.damp)
            self._put(key, self.model.get_submodule(name).weight, T, result)

    def _put(self, key: str, W: torch.Tensor, T: Transform, result: CalibratedSpectra) -> None:
        """Cache the SVD of W·S (W: the matrix's weight, or its compensated target)."""
        check_stop(self.should_stop)
        U, S, Vh = transformed_svd(W, T)
        self.cache.put(key, U.float(), S.float(), Vh.float(), metadata={"how": T.how})
        result.factorized += 1

    def _stats(self, idx: list[int], keys: list[Optional[str]]) -> InputStats:
        """Hooks on the matrices of `idx` whose entries are still missing (none: no statistics)."""
        mods = {self.names[i]: self.model.get_submodule(self.names[i]) for i in idx
                if keys[i] is not None and not self.cache.has(keys[i])}
        return InputStats(mods, sink_weight=self.sink_weight)

    def _finish(self, result: CalibratedSpectra) -> CalibratedSpectra:
        for name, key in zip(result.names, result.keys):
            if key is None:  # not needed (an N-LRC under ranks from the weights)
                result.values.append(None)
                continue
            S = self.cache.singular_values(key)
            if S is None:
                raise InvalidData(f"calibrated spectrum entry {key[:12]} vanished from the cache "
                                  f"({self.cache.root}); run the compression again")
            result.values.append(S)
            how = self.cache.metadata(key).get("how", "")
            if how not in ("", "cholesky", "diagonal"):
                result.how[name] = how
        return result

    def dense(self, only: Optional[set[int]] = None) -> CalibratedSpectra:
        """Entries from the dense model's activations (all layers see dense inputs); with
        `only`, just those targets (the rest get key and values None)."""
        keys = [self.key(i) if only is None or i in only else None for i in range(len(self.names))]
        result = CalibratedSpectra(self.names, keys, [])
        missing = {layer_index(self.names[i]) for i, k in enumerate(keys) if k is not None and not self.cache.has(k)}
        if missing:
            inputs = LayerInputs(self.model, self.calibration.tokens, self.should_stop)
            last = max(missing)
            for L in range(last + 1):
                layer = self.store.open(L)
                idx = self.by_layer.get(L, [])
                with self._stats(idx, keys) as stats:
                    inputs.run(layer, stats, update=L < last)
                result.forward_passes += 1
                self._factorize_layer(stats, idx, [keys[i] for i in idx], result)
                del stats
                self.store.close(L)
                self.progress(ProgressEvent("calibrate", L + 1, last + 1, message=f"layer {L}",
                                            metrics={"factorized": result.factorized}))
        return self._finish(result)

    def sensitivity(self) -> list[float]:
        """The loss's sensitivity to each target's output error (sensitivity.py), on the first
        sensitivity.WINDOWS calibration windows of the dense model; cached (an entry holding S alone)."""
        from .sensitivity import WINDOWS, output_sensitivity

        tokens = self.calibration.tokens[:WINDOWS]
        key = hashlib.sha256("|".join([SENSITIVITY_FORMAT, self.source_hash, str(self.dtype), *self.names,
                                       tokens_hash(tokens)]).encode()).hexdigest()
        c = self.cache.singular_values(key)
        if c is None:
            with tempfile.TemporaryDirectory(prefix=".sensitivity-", dir=self.cache.root.parent) as spill:
                c = output_sensitivity(self.store, self.names, tokens, Path(spill), self.progress, self.should_stop)
            self.cache.put(key, None, c, None, metadata={"kind": "sensitivity"}, keep=0)
        return [float(v) for v in c]

    def sequential(self, kept: list[int], apply: ApplyFn, only: Optional[set[int]] = None,
                   compensate: bool = False) -> CalibratedSpectra:
        """Entries for layer L from inputs through layers 0..L−1 already compressed with ranks
        `kept` (one per target, in order); `apply(name, key)` swaps a matrix in as it goes.
        With `only`, just those targets are factorised (and applied). With `compensate`, the
        matrices closing a block are fitted to the dense block's outputs (module docstring)."""
        mode = "sequential+compensate:" if compensate else "sequential:"
        prefix, keys = [], []
        for L in range(len(self.layers)):
            idx = self.by_layer.get(L, [])
            own = [f"{self.names[i]}={kept[i]}" for i in idx if not closes_block(self.names[i])] if compensate else []
            for i in idx:
                p = hashlib.sha256(",".join(prefix + (own if closes_block(self.names[i]) else [])).encode())
                keys.append(self.key(i, mode + p.hexdigest()) if only is None or i in only else None)
            prefix += [f"{self.names[i]}={kept[i]}" for i in idx]
        result = CalibratedSpectra(self.names, keys, [])
        last = max((layer_index(self.names[i]) for i, k in enumerate(keys)
                    if k is not None and not self.cache.has(k)), default=-1)
        inputs = LayerInputs(self.model, self.calibration.tokens, self.should_stop) if last >= 0 else None
        for L in range(len(self.layers)):
            layer = self.store.open(L)
            idx = [i for i in self.by_layer.get(L, []) if keys[i] is not None]
            closers = [i for i in idx if compensate and closes_block(self.names[i])]
            others = [i for i in idx if i not in closers]
            missing = [i for i in closers if not self.cache.has(keys[i])] if inputs is not None and L <= last else []
            fit = {self.names[i]: self.model.get_submodule(self.names[i]) for i in missing}
            cross = CrossStats(fit, self.sink_weight)
            if inputs is not None and L <= last:
                with self._stats(others, keys) as stats, cross:
                    if stats.modules or fit:  # dense layer L on compressed-prefix inputs: statistics only
                        inputs.run(layer, stats, update=False)
                        result.forward_passes += 1
                self._factorize_layer(stats, others, [keys[i] for i in others], result)
                del stats
            for i in others:
                apply(self.names[i], keys[i])
            if fit:  # the same inputs through the layer's compressed matrices: C and Ĝ
                cross.phase = "compressed"
                with cross:
                    inputs.run(layer, None, update=False)
                result.forward_passes += 1
                for i in missing:
                    name = self.names[i]
                    self._put(keys[i], cross.target(name, fit[name].weight), cross.transform(name, self.damp), result)
            del cross
            for i in closers:
                apply(self.names[i], keys[i])
            if inputs is not None and L < last:
                inputs.run(layer, None, update=True)  # compressed layer L feeds layer L+1
                result.forward_passes += 1
            self.progress(ProgressEvent("calibrate", L + 1, len(self.layers), message=f"layer {L} (sequential)",
                                        metrics={"factorized": result.factorized}))
            self.store.close(L)  # streamed: the compressed layer is written and dropped
        return self._finish(result)
