"""The layer pipeline on tiny seeded models: streamed compression and evaluation equal the
in-memory path (ranks, tensors, perplexity) from single-file, oddly sharded and bf16 sources;
a killed compression resumes; the spectrum cache's compact entries, cap and statistics."""

import json
import os
import math
import random

import pytest
import torch
from safetensors.torch import save_file

from welore_core.checkpoint import load_checkpoint, save_merged
from welore_core.compression.calibration import Calibration
from welore_core.compression.model import compress_model
from welore_core.errors import Cancelled, OutputExists
from welore_core.evaluate import perplexity, token_windows
from welore_core.compression.streamed.compress import compress_streamed
from welore_core.layerwise.hidden import layered_perplexity
from welore_core.layerwise.layers import ResidentLayers, StreamedLayers
from welore_core.layerwise.source import CheckpointSource
from welore_core.loading import load_model, read_safetensors
from welore_core.spectrum import SpectrumCache, needed_rank

from recipes import calibrated, data_free
from tiny_llama import ByteTokenizer, make_tiny_llama

TEXTS = ["the quick brown fox jumps over the lazy dog. " * 8, "pack my box with five dozen liquor jugs. " * 8]


def _dense(tmp_path, tie=True, layers=3, seed=1):
    model = make_tiny_llama(seed=seed, layers=layers, tie=tie)
    path = save_merged(model, None, tmp_path / f"dense-{tie}-{layers}-{seed}")
    return model, path


def _shard_oddly(src, out, n_files=3, seed=0, dtype=None):
    """Re-write a checkpoint as `n_files` shards with every tensor in a random shard."""
    state = read_safetensors(src)
    files = [f"part-{i}.safetensors" for i in range(n_files)]
    rng = random.Random(seed)
    where = {k: rng.choice(files) for k in state}
    out.mkdir()
    for f in files:
        save_file({k: (v.to(dtype) if dtype else v).contiguous() for k, v in state.items() if where[k] == f},
                  str(out / f))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": where}))
    (out / "config.json").write_text((src / "config.json").read_text())
    return out


def _same_compression(streamed_dir, model, rep_s, rep_m, atol=0.0):
    assert [m.kept_rank for m in rep_s.matrices] == [m.kept_rank for m in rep_m.matrices]
    assert [m.storage for m in rep_s.matrices] == [m.storage for m in rep_m.matrices]
    assert rep_s.tau == rep_m.tau and rep_s.err_achieved == rep_m.err_achieved
    assert rep_s.params_after == rep_m.params_after and rep_s.source_hash == rep_m.source_hash
    got = read_safetensors(streamed_dir)
    want = {k: v for k, v in model.state_dict().items()
            if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    assert set(got) == set(want)
    # a truncated dense Ŵ: W − tail in memory, the leading triplets of a compact cache entry when streamed
    dense_lrc = {f"model.layers.{m.name.split('.')[0]}.{_PART[m.name.split('.')[1]]}.weight" for m in rep_m.matrices
                 if m.label == "LRC" and m.storage == "dense"}
    for k in want:
        tol = dict(atol=max(atol, 1e-5), rtol=1e-2) if k in dense_lrc else dict(atol=atol, rtol=0)
        assert torch.allclose(got[k].float(), want[k].float(), **tol), k


_PART = {p: f"{'self_attn' if p.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{p}"
         for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}


@pytest.mark.parametrize("tie,min_ratio", [(True, 0.5), (False, 0.0)])
def test_streamed_compression_equals_in_memory(tmp_path, tie, min_ratio):
    model, path = _dense(tmp_path, tie=tie)
    cache = SpectrumCache(tmp_path / "cache-s")
    rep_s, extra = compress_streamed(path, tmp_path / "out", data_free(err=0.4, min_ratio=min_ratio), cache=cache,
                                     tolerance=0.05, shard_bytes=50_000)
    assert extra["shards"] > 1 and extra["memory_plan"]["cache_mode"] == "factors"
    rep_m = compress_model(model, data_free(err=0.4, min_ratio=min_ratio), cache=SpectrumCache(tmp_path / "cache-m"),
                           tolerance=0.05)
    assert any(m.storage == "dense" and m.label == "LRC" for m in rep_m.matrices)  # the dense Ŵ path too
    _same_compression(tmp_path / "out", model, rep_s, rep_m)
    loaded = load_checkpoint(tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "welore.json").read_text())
    assert meta["streamed"]["streamed"] and meta["factored"]
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded.model(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("recipe", [data_free(err=0.4, min_ratio=0.0, rank_multiple=8),
                                    calibrated(err=0.4, method="loss", rank_multiple=8)], ids=["welore", "loss"])
def test_streamed_compression_rounds_ranks_as_in_memory(tmp_path, recipe):
    model, path = _dense(tmp_path, tie=False, layers=3, seed=11)
    cal = _calibration() if recipe.calibrated else None
    rep_s, _ = compress_streamed(path, tmp_path / "out", recipe, calibration=cal, cache=SpectrumCache(tmp_path / "c1"))
    rep_m = compress_model(model, recipe, cal, cache=SpectrumCache(tmp_path / "c2"))
    assert [m.kept_rank for m in rep_s.matrices] == [m.kept_rank for m in rep_m.matrices]
    factored = [m for m in rep_s.matrices if m.storage == "factors"]
    assert factored and all(m.kept_rank % 8 == 0 for m in factored)
    assert abs(rep_s.err_achieved - 0.4) <= 0.005


def test_oddly_sharded_bf16_source(tmp_path):
    model, path = _dense(tmp_path, tie=False, seed=3)
    odd = _shard_oddly(path, tmp_path / "odd", n_files=4, dtype=torch.bfloat16)
    src = CheckpointSource(odd)
    assert src.dtype == torch.bfloat16 and src.n_layers == 3
    assert len({src.tensors[n].file for n in src.layer_names(0)}) > 1  # a layer spread over shards
    rep_s, _ = compress_streamed(odd, tmp_path / "out", data_free(err=0.4), cache=SpectrumCache(tmp_path / "c1"),
                                 tolerance=0.05, dtype=torch.bfloat16)
    in_memory = load_model(str(odd), device="cpu")  # the in-memory path on the same bf16 source (in fp32)
    rep_m = compress_model(in_memory.model, data_free(err=0.4), cache=SpectrumCache(tmp_path / "c2"), tolerance=0.05)
    assert all(t.dtype == torch.bfloat16 for t in read_safetensors(tmp_path / "out").values())
    in_memory.model.to(torch.bfloat16)  # the same factors, rounded to the output dtype
    _same_compression(tmp_path / "out", in_memory.model, rep_s, rep_m)


def test_streamed_perplexity_equals_in_memory(tmp_path):
    model, path = _dense(tmp_path, tie=False, layers=2)
    tok = ByteTokenizer()
    want = perplexity(model, tok, TEXTS, seq_len=32, windows=6)
    tokens = token_windows(tok, TEXTS, 32, 6)
    got = layered_perplexity(StreamedLayers(path), tokens)
    resident = layered_perplexity(ResidentLayers(model), tokens)
    assert got.tokens == want.tokens and got.windows == want.windows
    assert math.isclose(got.perplexity, want.perplexity, rel_tol=1e-5)
    assert math.isclose(resident.perplexity, want.perplexity, rel_tol=1e-5)
    # a compressed (factored) checkpoint streams the same way
    compress_streamed(path, tmp_path / "out", data_free(err=0.4), cache=SpectrumCache(tmp_path / "c"), tolerance=0.05)
    loaded = load_checkpoint(tmp_path / "out")
    factored = loaded.meta["factored"]
    assert factored
    got_c = layered_perplexity(StreamedLayers(tmp_path / "out", factored=factored), tokens)
    assert math.isclose(got_c.perplexity, perplexity(loaded.model, tok, TEXTS, 32, 6).perplexity, rel_tol=1e-5)


def test_streamed_bf16_source_keeps_embeddings_and_head_bf16(tmp_path):
    """A bf16 source's embeddings and LM head stay bf16 in the layer-by-layer store (half their
    float32 bytes; an 8B model's pair is 2.1 GB instead of 4.2), upcast where used: the
    perplexity is the in-memory float32 load's of the same checkpoint."""
    model, path = _dense(tmp_path, tie=False, layers=2, seed=4)
    odd = _shard_oddly(path, tmp_path / "bf16", n_files=2, dtype=torch.bfloat16)
    tokens = token_windows(ByteTokenizer(), TEXTS, 32, 6)
    store = StreamedLayers(odd)
    assert store.model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert store.model.get_output_embeddings().weight.dtype == torch.bfloat16
    assert store.model.model.norm.weight.dtype == torch.float32
    got = layered_perplexity(store, tokens)
    want = perplexity(load_model(str(odd), device="cpu").model, ByteTokenizer(), TEXTS, 32, 6)
    assert math.isclose(got.perplexity, want.perplexity, rel_tol=1e-5)


def _calibration(seed=0, n=6, seq_len=24):
    tokens = torch.randint(2, 250, (n, seq_len), generator=torch.Generator().manual_seed(seed))
    return Calibration(tokens, "random", "0" * 64, n)


@pytest.mark.parametrize("recipe", [
    dict(method="welore"),  # ranks from the weights, one dense calibration pass
    dict(method="loss"),  # ranks from the whitened spectra
    dict(method="welore", sequential=True, compensate=True),  # each layer compressed while open
])
def test_streamed_calibrated_compression_equals_in_memory(tmp_path, recipe):
    model, path = _dense(tmp_path, tie=False, layers=3, seed=11)
    config = calibrated(err=0.4, **recipe)
    cal = _calibration()
    rep_s, extra = compress_streamed(path, tmp_path / "out", config, calibration=cal,
                                     cache=SpectrumCache(tmp_path / "c1"), tolerance=0.05)
    rep_m = compress_model(model, config, cal, cache=SpectrumCache(tmp_path / "c2"), tolerance=0.05)
    assert rep_s.factorization == rep_m.factorization == "whitened"
    assert rep_s.calibration["sequential"] == rep_m.calibration["sequential"]
    assert [m.calib_error is None for m in rep_s.matrices] == [m.calib_error is None for m in rep_m.matrices]
    for a, b in zip(rep_s.matrices, rep_m.matrices):
        assert math.isclose(a.rel_error, b.rel_error, rel_tol=1e-4, abs_tol=1e-6), (a.name, a.rel_error, b.rel_error)
    _same_compression(tmp_path / "out", model, rep_s, rep_m, atol=1e-4)


def test_a_killed_compression_resumes_after_its_last_shard(tmp_path):
    model, path = _dense(tmp_path, layers=4, seed=5)
    cache = SpectrumCache(tmp_path / "cache")
    seen = []

    def stop_after_two_layers():
        return sum(1 for s in seen if s == "factorize") >= 2

    def progress(ev):
        seen.append(ev.stage)

    with pytest.raises(Cancelled):
        compress_streamed(path, tmp_path / "out", data_free(err=0.4), cache=cache, tolerance=0.05, shard_bytes=1,
                          progress=progress, should_stop=stop_after_two_layers)
    assert not (tmp_path / "out").exists()
    assert len(list((tmp_path / ".out.partial").glob("model-*.safetensors"))) == 2
    rep, extra = compress_streamed(path, tmp_path / "out", data_free(err=0.4), cache=cache, tolerance=0.05, shard_bytes=1)
    assert extra["resumed"] and extra["resumed_layers"] == [0, 1]
    assert rep.decomposed == 0  # the spectra came from the journal and the cache
    fresh = compress_model(model, data_free(err=0.4), cache=SpectrumCache(tmp_path / "c2"), tolerance=0.05)
    _same_compression(tmp_path / "out", model, rep, fresh)
    assert not (tmp_path / ".out.partial").exists()
    with pytest.raises(OutputExists):
        compress_streamed(path, tmp_path / "out", data_free(err=0.4), cache=cache, tolerance=0.05)


def test_compact_cache_entries_cap_and_stats(tmp_path):
    model, path = _dense(tmp_path, layers=2, seed=7)
    cache = SpectrumCache(tmp_path / "cache")
    _, extra = compress_streamed(path, tmp_path / "a", data_free(err=0.4, min_ratio=0.5), cache=cache, tolerance=0.05)
    shapes = [tuple(model.get_submodule(n).weight.shape) for n in
              [f"model.layers.{L}.{p}" for L in range(2) for p in
               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]]
    assert extra["cache"]["misses"] == 14 and extra["cache"]["hits"] == 0
    stored = sorted(cache.stored_rank(p.stem) for p in cache.root.glob("*.safetensors"))
    assert stored == sorted(needed_rank(s, 0.5) for s in shapes)  # the leading half, not all r
    assert extra["memory_plan"]["cache_bytes"] >= cache.size_bytes() * 0.9
    # warm: another ERR decomposes nothing
    warm = SpectrumCache(tmp_path / "cache")
    rep, extra2 = compress_streamed(path, tmp_path / "b", data_free(err=0.3, min_ratio=0.5), cache=warm, tolerance=0.05)
    assert rep.decomposed == 0 and extra2["cache"]["hits"] == 14
    # a cap smaller than the entries: singular values only, factors recomputed, same tensors
    capped = SpectrumCache(tmp_path / "cache-capped", max_bytes=2_000)
    rep_c, extra3 = compress_streamed(path, tmp_path / "c", data_free(err=0.3, min_ratio=0.5), cache=capped, tolerance=0.05)
    assert extra3["memory_plan"]["cache_mode"] == "values"
    assert all(capped.stored_rank(p.stem) == 0 for p in capped.root.glob("*.safetensors"))
    a, b = read_safetensors(tmp_path / "b"), read_safetensors(tmp_path / "c")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # LRU eviction: an old entry goes when a new one needs the room
    lru = SpectrumCache(tmp_path / "lru", max_bytes=3 * (4 * 64 * 2 + 64) * 4)
    for i in range(6):
        W = torch.randn(64, 64)
        U, S, Vh = torch.linalg.svd(W)
        SpectrumCache(tmp_path / "lru", max_bytes=lru.max_bytes).put(f"k{i}", U, S, Vh, keep=4)
    assert lru.size_bytes() <= lru.max_bytes + 2000 and not lru.has("k0") and lru.has("k5")


def test_pipelines_stream_above_the_threshold(tmp_path, monkeypatch):
    from welore_core.compression.pipeline import compress_checkpoint
    from welore_core.layerwise import plan

    model, path = _dense(tmp_path, layers=2, seed=9)
    monkeypatch.setattr(plan, "streamable", lambda spec, above_gb=None: plan.Path(spec))
    r = compress_checkpoint(str(path), tmp_path / "out", data_free(err=0.4, min_ratio=0.0),
                            cache=SpectrumCache(tmp_path / "c"), merged_out=tmp_path / "merged")
    assert r["streamed"] and r["memory_plan"]["estimated_peak_bytes"] > 0
    loaded = load_model(str(tmp_path / "out"), device="cpu")
    merged = load_model(str(tmp_path / "merged"), device="cpu")
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        assert torch.allclose(loaded.model(input_ids=ids).logits, merged.model(input_ids=ids).logits, atol=1e-4)
    monkeypatch.undo()
    assert plan.streamable(str(path), above_gb=0) == path
    assert plan.streamable(str(path), above_gb=1.0) is None


@pytest.mark.real_model
def test_smollm2_streamed_equals_in_memory(tmp_path, boolq_path):
    """Through the command line: `welore compress` / `welore eval` stream (WELORE_STREAM_ABOVE_GB=0)
    and give the in-memory ranks, tensors and perplexity."""
    from test_cli import last_json, welore

    env = {**os.environ, "WELORE_STREAM_ABOVE_GB": "0"}
    common = ["--err", "0.3", "--calibration", "none", "--json"]
    s = last_json(welore("compress", "smollm2-135m", *common, "--out", tmp_path / "s", env=env))
    m = last_json(welore("compress", "smollm2-135m", *common, "--out", tmp_path / "m"))
    assert s["streamed"] and not m.get("streamed")
    assert [x["kept_rank"] for x in s["matrices"]] == [x["kept_rank"] for x in m["matrices"]]
    assert s["source_hash"] == m["source_hash"] and s["params_after"] == m["params_after"]
    got, want = read_safetensors(tmp_path / "s"), read_safetensors(tmp_path / "m")
    assert set(got) == set(want)
    assert all(torch.allclose(got[k], want[k], atol=1e-6, rtol=0) for k in want)
    ev = ["--data", str(boolq_path), "--windows", "2", "--seq-len", "128", "--json"]
    for out in ("s", "m"):
        e_s = last_json(welore("eval", tmp_path / out, *ev, env=env))
        e_m = last_json(welore("eval", tmp_path / out, *ev))
        assert e_s["streamed"] and not e_m.get("streamed")
        assert e_s["tokens"] == e_m["tokens"]
        assert math.isclose(e_s["perplexity"], e_m["perplexity"], rel_tol=1e-4)


def test_cli_compress_streams_above_the_threshold(tmp_path):
    from test_cli import welore

    _, path = _dense(tmp_path, layers=2, seed=13)
    env = {**os.environ, "WELORE_STREAM_ABOVE_GB": "0", "WELORE_CACHE_DIR": str(tmp_path / "cache")}
    out = welore("compress", path, "--err", "0.4", "--min-ratio", "0", "--calibration", "none",
                 "--out", tmp_path / "out", env=env).stdout
    assert "streamed layer by layer (2 layers)" in out and "spectrum cache 0 hits, 14 misses" in out
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
