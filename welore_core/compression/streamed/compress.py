"""WeLore compression of a safetensors checkpoint streamed one decoder layer at a time.

Two passes over the layers, each holding one layer's tensors:
  1. spectra: each target matrix is read (float32), hashed and decomposed unless the spectrum
     cache knows it; its singular values are kept (r floats), its leading factors cached when
     the cache plan allows (`plan.cache_mode`), then τ is allocated over all spectra exactly as
     in memory (compress.allocate);
  2. output: each layer is read again, its LRCs factorised (from the cache, or a fresh SVD),
     and its tensors handed to the shard writer, which writes shards as they complete.
Embeddings, the final norm and the LM head are copied tensor by tensor. The results equal
compress.compress_model's on the same model (same ranks, same tensors up to float rounding).

Resumable (layerwise/writer.py): pass 1's cache keys and the allocation are journalled, and every written
shard is kept, so a killed run started again with the same recipe continues after the last
shard it wrote.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Optional

import torch

from ..allocation import TOLERANCE, MatrixPlan, relative_error
from ..config import CompressConfig
from ..model import CompressionReport, MatrixReport, allocate, spectrum_sketch
from ...errors import InvalidArgument, NonFiniteWeights
from ..factorize import factors, truncated
from ...progress import ProgressEvent, ProgressFn, StopFn, check_stop, no_progress
from ...checkpoint import all_finite
from ...modelfiles import meta_model, read_config
from ...spectrum import (Spectra, SpectrumCache, leading_triplets, needed_rank, singular_values_only, svd,
                        tensor_hash)
from ...outputs import check_output
from ...targets import layer_index, short_name, target_names
from ...layerwise.plan import MemoryPlan, memory_plan
from ...layerwise.source import CheckpointSource
from ...layerwise.writer import SHARD_BYTES, ShardWriter, merge_factors

OTHER = "other"


def _unit(layer: int) -> str:
    return f"layer.{layer}"


def _source_fingerprint(source: CheckpointSource) -> str:
    """Cheap identity of a source checkpoint: its tensors' names, shapes, dtypes, files' sizes and mtimes."""
    h = hashlib.sha256()
    for name, info in sorted(source.tensors.items()):
        h.update(f"{name}|{info.shape}|{info.dtype}|{info.file}".encode())
    for file in sorted({i.file for i in source.tensors.values()}):
        st = (source.path / file).stat()
        h.update(f"{file}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _read_weight(source: CheckpointSource, name: str) -> torch.Tensor:
    W = source.tensor(name, torch.float32)
    if not all_finite(W):
        raise NonFiniteWeights(f"source model: parameter {name} holds NaN or Inf values; refusing to "
                               "continue. Check the source checkpoint (re-download or re-export it).")
    return W


class StreamedCompression:
    """One streamed compression: the source, the recipe, the journal; `run()` does the work.

    `calibration`: the token windows (compression.calibration.Calibration) of a calibrated
    recipe; `compute_dtype` the dtype layers run in for calibration (float32 on a CPU)."""

    def __init__(self, path: Path | str, out: Path | str, config: CompressConfig, *, cache: SpectrumCache,
                 calibration=None, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
                 compute_dtype: torch.dtype = torch.float32, tolerance: float = TOLERANCE,
                 overwrite: bool = False, shard_bytes: int = SHARD_BYTES, merged_out: Path | str | None = None,
                 progress: ProgressFn = no_progress, should_stop: StopFn | None = None):
        self.recipe = config = config.resolve()
        if config.calibrated and calibration is None:
            raise InvalidArgument("this recipe is calibrated: pass the calibration token windows "
                                  "(compression.calibration.load_calibration) or use calibration=None")
        self.path, self.out = Path(path), Path(out)
        self.merged_out = Path(merged_out) if merged_out is not None else None
        for o in (self.out, self.merged_out):
            if o is not None:
                check_output(o, overwrite)
        self.source = CheckpointSource(self.path)
        self.config = read_config(self.path)
        self.meta = meta_model(self.config)
        self.names = target_names(self.meta)
        self.err, self.params_kept, self.method, self.min_ratio = (config.err, config.params_kept, config.method,
                                                                   config.min_ratio)
        self.rank_multiple = config.rank_multiple
        self.calibration = calibration
        self.cache, self.dtype, self.tolerance = cache, dtype, tolerance
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.compute_dtype = compute_dtype
        self.overwrite, self.shard_bytes = overwrite, shard_bytes
        self.progress, self.should_stop = progress, should_stop
        self.tied = bool(getattr(self.config, "tie_word_embeddings", False))
        self.by_layer: dict[int, list[int]] = {}
        for i, n in enumerate(self.names):
            self.by_layer.setdefault(layer_index(n), []).append(i)
        self.shapes = [tuple(self.source.tensors[f"{n}.weight"].shape) for n in self.names]
        tokens = calibration.tokens.numel() if calibration is not None else 0
        self.plan: MemoryPlan = memory_plan(
            self.source, self.shapes, self.min_ratio if self.method != "uniform" else None, cache, out_dtype=dtype,
            compute_dtype=compute_dtype, tokens=tokens, hidden=self.config.hidden_size)
        identity = {"recipe": config.to_dict(), "dtype": str(dtype), "tolerance": tolerance, "shard_bytes": shard_bytes,
                    "source": _source_fingerprint(self.source),
                    "tokens": calibration.tokens_hash if calibration is not None else None}
        self.fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    @property
    def svd_device(self):
        return self.device if self.device.type == "cuda" else None

    @staticmethod
    def short(name: str) -> str:
        return short_name(name)

    @staticmethod
    def sketch(S: torch.Tensor) -> dict:
        return {"spectrum_z": spectrum_sketch(S)}

    def keep(self, shape: tuple[int, int]) -> int:
        """Leading triplets a new cache entry stores (0 when the cache plan keeps singular values only)."""
        if self.plan.cache_mode == "values":
            return 0
        return needed_rank(shape, self.min_ratio if self.method == "welore" else None)

    # -- pass 1 --------------------------------------------------------------------------
    def spectra(self, journal: ShardWriter) -> tuple[Spectra, str]:
        done = journal.extra("spectra") or {}
        keys: list[Optional[str]] = [None] * len(self.names)
        values: list[Optional[torch.Tensor]] = [None] * len(self.names)
        other_hashes: dict[str, str] = journal.extra("other_hashes") or {}
        decomposed = 0
        for L in range(self.source.n_layers):
            check_stop(self.should_stop)
            idx = self.by_layer.get(L, [])
            rec = done.get(str(L))
            if rec is not None:
                vals = [self.cache.singular_values(k) for k in rec["keys"]]
                if all(v is not None for v in vals):
                    for i, k, v in zip(idx, rec["keys"], vals):
                        keys[i], values[i] = k, v
                    self.progress(ProgressEvent("spectrum", L + 1, self.source.n_layers, message=f"layer {L} (journal)"))
                    continue
            for i in idx:
                check_stop(self.should_stop)
                W = _read_weight(self.source, f"{self.names[i]}.weight")
                key = tensor_hash(W)
                S = self.cache.singular_values(key)
                if S is None:
                    keep = self.keep(tuple(W.shape))
                    dev = self.svd_device
                    if keep:
                        U, S, Vh = svd(W.to(dev) if dev is not None else W)
                        self.cache.put(key, U, S, Vh, keep=keep)
                        del U, Vh
                    else:  # the cache keeps singular values only: no vectors needed now
                        S = singular_values_only(W.to(dev) if dev is not None else W)
                        self.cache.put(key, None, S, None, keep=0)
                    S = S.cpu()
                    decomposed += 1
                keys[i], values[i] = key, S
                del W
            for name in self.source.layer_names(L):
                if name.rsplit(".", 1)[0] not in self.names:
                    other_hashes[name] = tensor_hash(self.source.tensor(name, torch.float32))
            done[str(L)] = {"keys": [keys[i] for i in idx]}
            journal.extra("other_hashes", other_hashes)
            journal.extra("spectra", done)
            self.progress(ProgressEvent("spectrum", L + 1, self.source.n_layers, message=f"layer {L}",
                                        metrics={"decomposed": decomposed, "cache_hits": self.cache.stats["hits"]}))
        for name in self.source.other_names():
            if name not in other_hashes and not (self.tied and name == "lm_head.weight"):
                other_hashes[name] = tensor_hash(self.source.tensor(name, torch.float32))
        journal.extra("other_hashes", other_hashes)
        model_hash = hashlib.sha256("|".join(keys).encode()).hexdigest()
        spectra = Spectra(self.names, self.shapes, values, keys, model_hash, decomposed)
        # the in-memory model_fingerprint: the target keys, then every other parameter in module order
        h = hashlib.sha256(model_hash.encode())
        targets = set(self.names)
        for name, _ in self.meta.named_parameters():
            if name.rsplit(".", 1)[0] not in targets:
                h.update(name.encode())
                h.update(other_hashes[name].encode())
        return spectra, h.hexdigest()

    # -- pass 2 --------------------------------------------------------------------------
    def _elem(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def _units(self, plans: list[MatrixPlan], merged: bool = False) -> list[tuple[str, int]]:
        el = self._elem()
        units = []
        for L in range(self.source.n_layers):
            stored = sum(plans[i].params_dense if merged else plans[i].params_stored for i in self.by_layer.get(L, []))
            rest = self.source.numel(n for n in self.source.layer_names(L) if n.rsplit(".", 1)[0] not in self.names)
            units.append((_unit(L), (stored + rest) * el))
        units.append((OTHER, self.source.numel(self._other_names()) * el))
        return units

    def _other_names(self) -> list[str]:
        return [n for n in self.source.other_names() if not (self.tied and n == "lm_head.weight")]

    def _layer_tensors(self, L: int, plans: list[MatrixPlan], spectra: Spectra) -> tuple[dict, list[dict]]:
        out: dict[str, torch.Tensor] = {}
        reports: list[dict] = []
        for i in self.by_layer.get(L, []):
            check_stop(self.should_stop)
            name, plan, key = self.names[i], plans[i], spectra.keys[i]
            W = _read_weight(self.source, f"{name}.weight")
            if not plan.lrc:
                out[f"{name}.weight"] = W.to(self.dtype)
            elif plan.factored:
                U, S_k, Vh = leading_triplets(self.cache, key, W, plan.kept, self.svd_device, keep=self.keep(plan.shape))
                A, B = factors(U, S_k, Vh, plan.kept)
                out[f"{name}.A"], out[f"{name}.B"] = A.to(self.dtype), B.to(self.dtype)
            else:  # truncated dense Ŵ (below the break-even)
                tail = self.cache.tail(key, plan.kept)
                if tail is not None:
                    W_hat = W - truncated(*tail, len(tail[1]))
                else:
                    W_hat = truncated(*leading_triplets(self.cache, key, W, plan.kept, self.svd_device,
                                                        keep=self.keep(plan.shape)), plan.kept)
                out[f"{name}.weight"] = W_hat.to(self.dtype)
            bias = f"{name}.bias"
            if bias in self.source.tensors:
                out[bias] = self.source.tensor(bias, self.dtype)
            reports.append(dict(
                name=short_name(name), shape=list(plan.shape), rank=plan.rank, kept_rank=plan.kept,
                reduction=plan.dropped / plan.rank if plan.lrc else 0.0, label="LRC" if plan.lrc else "N-LRC",
                storage="factors" if plan.factored else "dense",
                rel_error=relative_error(spectra.values[i], plan.kept) if plan.lrc else 0.0,
                **self.sketch(spectra.values[i])))
            del W
        for name in self.source.layer_names(L):
            if name.rsplit(".", 1)[0] not in self.names:
                out[name] = self.source.tensor(name, self.dtype)
        return out, reports

    def run(self) -> tuple[CompressionReport, dict, ShardWriter, Optional[ShardWriter]]:
        """Compress and write every shard; returns the report, {memory plan, cache, resumed layers}
        and the writers of the checkpoint and of the merged export (their `finish` puts them in place)."""
        t0 = time.perf_counter()
        journal = ShardWriter(self.out, self.fingerprint)
        merged = ShardWriter(self.merged_out, self.fingerprint + "|merged") if self.merged_out else None
        resumed = journal.resumed
        self.progress(ProgressEvent("plan", 1, 1, message=str(self.path), metrics=self.plan.metrics()))
        spectra, source_hash = self.spectra(journal)
        skipped: set[str] = set()
        record, factorization = None, "plain"
        if self.recipe.calibrated:
            from .calibrated import run_calibrated

            cal_cfg, t_cal = self.recipe.calibration, time.perf_counter()
            alloc, matrices, record = run_calibrated(self, journal, merged, spectra, source_hash, self.calibration,
                                                     cal_cfg,
                                                     self.recipe.experimental.sink_weight, self.device,
                                                     self.compute_dtype)
            factorization = cal_cfg.factorization
            record = {**self.calibration.record(), "sequential": cal_cfg.sequential,
                      "compensate": bool(cal_cfg.compensate), "damp": cal_cfg.damp,
                      "sink_weight": self.recipe.experimental.sink_weight, **record,
                      "seconds": time.perf_counter() - t_cal}
        else:
            alloc = allocate(spectra, self.method, self.err, self.params_kept, self.min_ratio, self.tolerance,
                             rank_multiple=self.rank_multiple)
            journal.extra("allocation", {"tau": alloc.tau, "kept": [p.kept for p in alloc.plans]})
            journal.plan(self._units(alloc.plans), self.shard_bytes)
            if merged is not None:
                merged.plan(self._units(alloc.plans, merged=True), self.shard_bytes)
            skipped = {u for u in journal.shard_of if journal.done(u)}
            matrices = journal.extra("matrices") or {}
            for L in range(self.source.n_layers):
                check_stop(self.should_stop)
                if journal.done(_unit(L)) and str(L) in matrices and (merged is None or merged.done(_unit(L))):
                    continue
                tensors, reports = self._layer_tensors(L, alloc.plans, spectra)
                matrices[str(L)] = reports
                journal.add(_unit(L), tensors)
                if merged is not None:
                    merged.add(_unit(L), merge_factors(tensors))
                journal.extra("matrices", matrices)
                del tensors
                self.progress(ProgressEvent("factorize", L + 1, self.source.n_layers, message=f"layer {L}",
                                            metrics={"cache_bytes_read": self.cache.stats["bytes_read"]}))
        for writer in (journal, merged):
            if writer is not None and not writer.done(OTHER):
                writer.add(OTHER, {n: self.source.tensor(n, self.dtype) for n in self._other_names()})
        params_before = sum(p.numel() for p in self.meta.parameters())
        before = sum(p.params_dense for p in alloc.plans)
        after = sum(p.params_stored for p in alloc.plans)
        report = CompressionReport(
            recipe=self.recipe.to_dict(), factorization=factorization, calibration=record, method=self.method,
            tau=alloc.tau, min_ratio=alloc.min_ratio, err_requested=self.err,
            err_achieved=alloc.err, params_kept_requested=self.params_kept, params_kept_achieved=alloc.params_kept,
            target_params_before=before, target_params_after=after, params_before=params_before,
            params_after=params_before - before + after, n_lrc=alloc.n_lrc, n_nlrc=len(alloc.plans) - alloc.n_lrc,
            source_hash=source_hash,
            matrices=[MatrixReport(**{**m, "shape": tuple(m["shape"])})
                      for L in range(self.source.n_layers) for m in matrices[str(L)]],
            seconds=time.perf_counter() - t0, decomposed=spectra.decomposed)
        extra = {"streamed": True, "memory_plan": self.plan.metrics(), "cache": dict(self.cache.stats),
                 "resumed": resumed, "resumed_layers": sorted(int(u.split(".")[1]) for u in skipped if u != OTHER),
                 "shards": len(journal.files)}
        return report, extra, journal, merged

    def factored(self, report: CompressionReport) -> dict[str, int]:
        return {name: m.kept_rank for name, m in zip(self.names, report.matrices) if m.storage == "factors"}


def compress_streamed(path: Path | str, out: Path | str, config: CompressConfig, *, tokenizer=None,
                      source: Optional[dict] = None, meta: Optional[dict] = None,
                      **kwargs) -> tuple[CompressionReport, dict]:
    """Compress the safetensors checkpoint `path` by the recipe `config` into a WeLore checkpoint
    `out`, layer by layer (keyword arguments: StreamedCompression's; `meta`: more for welore.json).
    Returns the report and the streaming record."""
    from ...checkpoint import checkpoint_record, finish_checkpoint

    job = StreamedCompression(path, out, config, **kwargs)
    report, extra, journal, merged = job.run()
    meta = {"kind": "compressed", **report.to_dict(), **(meta or {}), "streamed": extra,
            "source": {"model": str(path), "kind": "hf_dir", "hash": report.source_hash, **(source or {})}}
    record = checkpoint_record(meta, job.factored(report))

    def fill(d: Path) -> None:  # the shards are written: config (factorised, with its code), welore.json
        finish_checkpoint(d, job.config, tokenizer, record)

    if merged is not None:
        def fill_merged(d: Path) -> None:
            job.config.save_pretrained(str(d))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(d))

        merged.finish(fill_merged, overwrite=job.overwrite)
    journal.finish(fill, overwrite=job.overwrite)
    return report, extra
