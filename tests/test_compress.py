"""Compression on tiny seeded Llama models: exact factors, counts, the spectrum cache, and
the checkpoint round trips (strict reload, merged export in plain transformers)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from welore_core import spectrum as spectrum_mod
from welore_core.checkpoint import load_checkpoint, save_checkpoint, save_merged
from welore_core.compression.model import compress_model
from welore_core.errors import (CorruptCheckpoint, InvalidArgument, ModelNotFound, NonFiniteWeights,
                                OutputExists, UnsupportedModel)
from welore_core.loading import load_model
from welore_core.lowrank import LowRankLinear
from welore_core.targets import target_names

from recipes import data_free
from tiny_llama import make_tiny_llama


def _logits(model, seed=0):
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _weights(model):
    return {n: model.get_submodule(n).weight.detach().clone() for n in target_names(model)}


def test_factors_equal_the_rank_k_truncated_svd(fresh_cache):
    model = make_tiny_llama(seed=1)
    before = _weights(model)
    report = compress_model(model, data_free(err=0.4, min_ratio=0.0), cache=fresh_cache)
    n_factored = 0
    for name, m in zip(before, report.matrices):  # both in target order
        assert name.endswith(m.name.split(".")[1])
        W = before[name].double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        k = m.kept_rank
        expected = (U[:, :k] * S[:k]) @ Vh[:k]
        mod = model.get_submodule(name)
        got = mod.merged_weight() if isinstance(mod, LowRankLinear) else mod.weight
        torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=1e-4)
        assert m.rel_error == pytest.approx(float((W - expected).norm() / W.norm()), abs=1e-5)
        if isinstance(mod, LowRankLinear):
            n_factored += 1
            assert mod.A.shape == (k, W.shape[1]) and mod.B.shape == (W.shape[0], k)
            # A = √S_k·V_kᵀ, B = U_k·√S_k (up to a shared sign per singular pair)
            torch.testing.assert_close(mod.A.double().norm(dim=1) ** 2, S[:k], atol=1e-4, rtol=1e-4)
    assert n_factored > 0


def test_counts_match_formulas(fresh_cache):
    model = make_tiny_llama(seed=2)
    total_before = sum(p.numel() for p in model.parameters())
    report = compress_model(model, data_free(err=0.5, min_ratio=0.5), cache=fresh_cache, tolerance=0.1)
    saved = 0
    for m in report.matrices:
        rows, cols = m.shape
        assert m.rank == min(rows, cols)
        if m.label == "N-LRC":
            assert m.kept_rank == m.rank and m.storage == "dense"
        else:
            assert m.reduction > 0.5
            if m.storage == "factors":
                saved += rows * cols - m.kept_rank * (rows + cols)
    assert report.params_before == total_before
    assert report.params_after == total_before - saved == sum(p.numel() for p in model.parameters())
    assert report.target_params_before - report.target_params_after == saved
    assert report.n_lrc + report.n_nlrc == len(report.matrices) == 14
    dropped = sum(m.rank - m.kept_rank for m in report.matrices)
    assert report.err_achieved == pytest.approx(dropped / sum(m.rank for m in report.matrices))


def test_uniform_and_welore_allocations_differ(fresh_cache):
    w = compress_model(make_tiny_llama(seed=3), data_free(err=0.3, min_ratio=0.0), cache=fresh_cache)
    u = compress_model(make_tiny_llama(seed=3), data_free(err=0.3, method="uniform"), cache=fresh_cache)
    assert u.tau is None and u.min_ratio is None
    assert len({round(m.reduction, 2) for m in u.matrices}) <= 3  # rounding of the same fraction
    assert len({round(m.reduction, 2) for m in w.matrices}) > 3
    assert [m.kept_rank for m in w.matrices] != [m.kept_rank for m in u.matrices]


def test_each_matrix_is_decomposed_once_and_a_warm_cache_decomposes_none(fresh_cache, monkeypatch):
    calls = []
    real_svd = spectrum_mod.svd
    monkeypatch.setattr(spectrum_mod, "svd", lambda W: calls.append(tuple(W.shape)) or real_svd(W))
    model = make_tiny_llama(seed=4)
    cold = compress_model(model, data_free(err=0.3, min_ratio=0.0), cache=fresh_cache)
    assert len(calls) == 14 and cold.decomposed == 14
    for svd_fn in ("svd", "svdvals"):  # nothing else may decompose behind the cache's back
        monkeypatch.setattr(torch.linalg, svd_fn, lambda *a, **k: pytest.fail("second decomposition"))
    warm_model = make_tiny_llama(seed=4)
    warm = compress_model(warm_model, data_free(err=0.5, min_ratio=0.5), cache=fresh_cache, tolerance=0.1)
    assert warm.decomposed == 0 and len(calls) == 14
    again = compress_model(make_tiny_llama(seed=4), data_free(err=0.3, min_ratio=0.0), cache=fresh_cache)
    assert [m.kept_rank for m in again.matrices] == [m.kept_rank for m in cold.matrices]
    assert again.source_hash == cold.source_hash


def test_the_cache_cap_applies_to_an_in_memory_compression(tmp_path):
    """WELORE_CACHE_MAX_GB caps the cache of a compression given none, in memory as streamed: a
    1-byte cap keeps only the entries of the latest run (a run never evicts its own)."""
    from welore_core.settings import CoreSettings, configure, reset

    configure(CoreSettings(cache_dir=tmp_path, cache_max_gb=1e-9))
    try:
        runs = []
        for seed in (5, 6):
            compress_model(make_tiny_llama(seed=seed), data_free(err=0.3, min_ratio=0.0))
            runs.append({p.name for p in (tmp_path / "svd").glob("*.safetensors")})
    finally:
        reset()
    assert runs[0] and runs[1] and runs[1] == {p.name for p in (tmp_path / "svd").glob("*.safetensors")}
    assert not runs[0] & runs[1]


def test_save_load_round_trip_and_merged_export(fresh_cache, tmp_path):
    model = make_tiny_llama(seed=5)
    report = compress_model(model, data_free(err=0.5, min_ratio=0.5), cache=fresh_cache, tolerance=0.1)
    expected = _logits(model)
    out = save_checkpoint(model, None, tmp_path / "ckpt", {"kind": "compressed", **report.to_dict()})
    meta = json.loads((out / "welore.json").read_text())
    assert meta["format_version"] == 1 and meta["method"] == "welore"
    assert set(meta["factored"]) == {n for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert {"tau", "err_requested", "err_achieved", "params_before", "params_after", "matrices"} <= set(meta)
    loaded = load_checkpoint(out)
    torch.testing.assert_close(_logits(loaded.model), expected)
    assert loaded.meta["err_achieved"] == report.err_achieved

    merged = save_merged(model, None, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    assert not any(isinstance(m, LowRankLinear) for m in plain.modules())
    torch.testing.assert_close(_logits(plain), expected, atol=1e-5, rtol=1e-4)


def test_load_model_dispatches_welore_checkpoints(fresh_cache, tmp_path):
    model = make_tiny_llama(seed=6)
    report = compress_model(model, data_free(err=0.5, min_ratio=0.5), cache=fresh_cache, tolerance=0.1)
    save_checkpoint(model, None, tmp_path / "c", report.to_dict())
    loaded = load_model(str(tmp_path / "c"), device="cpu")
    assert loaded.source.kind == "welore" and loaded.meta is not None
    torch.testing.assert_close(_logits(loaded.model), _logits(model))


def test_non_finite_weights_are_refused_before_writing(fresh_cache, tmp_path):
    model = make_tiny_llama(seed=7)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeights, match="up_proj"):
        compress_model(model, data_free(err=0.3, min_ratio=0.0), cache=fresh_cache)
    with pytest.raises(NonFiniteWeights):
        save_checkpoint(model, None, tmp_path / "out" / "bad", {})
    assert not (tmp_path / "out").exists()  # nothing written, not even a temp directory


def test_a_crash_while_writing_leaves_no_checkpoint_and_keeps_the_old_one(fresh_cache, tmp_path, monkeypatch):
    model = make_tiny_llama(seed=8)
    compress_model(model, data_free(err=0.3, min_ratio=0.0), cache=fresh_cache)
    out = save_checkpoint(model, None, tmp_path / "ckpt", {"note": "first"})
    import welore_core.checkpoint as ck

    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError):
        save_checkpoint(model, None, out, {"note": "second"}, overwrite=True)
    assert json.loads((out / "welore.json").read_text())["note"] == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "ckpt"]
    with pytest.raises(OSError):
        save_checkpoint(model, None, tmp_path / "new", {})
    assert not (tmp_path / "new").exists()


def test_existing_output_needs_overwrite(fresh_cache, tmp_path):
    model = make_tiny_llama(seed=9)
    save_checkpoint(model, None, tmp_path / "c", {})
    with pytest.raises(OutputExists, match="--overwrite"):
        save_checkpoint(model, None, tmp_path / "c", {})


def test_corrupt_checkpoints_give_clear_errors(fresh_cache, tmp_path):
    model = make_tiny_llama(seed=10)
    report = compress_model(model, data_free(err=0.5, min_ratio=0.5), cache=fresh_cache, tolerance=0.1)
    out = save_checkpoint(model, None, tmp_path / "c", report.to_dict())
    weights = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CorruptCheckpoint, match="model.safetensors"):
        load_checkpoint(out)
    (out / "model.safetensors").write_bytes(weights)
    meta = json.loads((out / "welore.json").read_text())
    first = next(iter(meta["factored"]))
    meta["factored"][first] += 1
    (out / "welore.json").write_text(json.dumps(meta))
    with pytest.raises(CorruptCheckpoint, match="shapes disagree|do not match"):
        load_checkpoint(out)
    (out / "welore.json").write_text("{not json")
    with pytest.raises(CorruptCheckpoint, match="not valid JSON"):
        load_checkpoint(out)
    meta["format_version"] = 99
    (out / "welore.json").write_text(json.dumps(meta))
    with pytest.raises(CorruptCheckpoint, match="format_version"):
        load_checkpoint(out)


def test_bad_inputs(fresh_cache, tmp_path):
    with pytest.raises(ModelNotFound, match="registry name"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedModel, match="gpt2"):
        load_model(str(tmp_path / "gpt2"))
    model = make_tiny_llama(seed=11)
    with pytest.raises(InvalidArgument, match="method"):
        compress_model(model, data_free(err=0.3, method="magic"), cache=fresh_cache)
    compress_model(model, data_free(err=0.5, min_ratio=0.0), cache=fresh_cache)
    with pytest.raises(InvalidArgument, match="already WeLore-compressed"):
        compress_model(model, data_free(err=0.5), cache=fresh_cache)
