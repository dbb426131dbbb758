"""Calibrated WeLore on tiny seeded models: the whitening maths (output error never above the
plain truncation's, full rank reproduces W, Cholesky fallbacks), statistics gathered once per
distinct input, layer-by-layer inputs equal to the full forward's, cache keys, sequential mode,
the compensated closing matrices, the welore.json record and the argument errors."""

from __future__ import annotations

import json

import pytest
import torch

from welore_core.checkpoint import read_meta, save_checkpoint
from welore_core.compression.calibration import Calibration, LayerInputs, load_calibration
from welore_core.compression.config import CalibrationConfig, CompressConfig, ExperimentalConfig
from welore_core.compression.factorize import factors, truncated
from welore_core.compression.input_stats import InputStats
from welore_core.compression.model import compress_model
from welore_core.compression.whiten import compensated_weight, gram_root, output_error, transformed_svd
from welore_core.errors import InvalidArgument
from welore_core.layerwise.layers import ResidentLayers
from welore_core.targets import closes_block, decoder_layers, target_names

from recipes import calibrated, data_free


def non_white_inputs(tokens: int, n: int, seed: int = 0) -> torch.Tensor:
    """Correlated inputs with a steep channel spectrum (tokens×n), like real activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -3, n, dtype=torch.float64)[None, :]
    return torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix.T + 0.1


def plain_truncation(W: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return truncated(U, S, Vh, k)


@pytest.mark.parametrize("damp", [0.0, 1e-2, 1.0])
def test_whitened_output_error_never_above_plain_at_any_rank(damp):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(24, 16, generator=g, dtype=torch.float64)
    X = non_white_inputs(200, 16)
    T = gram_root(X.T @ X, damp)
    U, S, Vh = transformed_svd(W, T)
    for k in range(1, 17):
        e_white = output_error(W, truncated(U, S, Vh, k), X)
        e_plain = output_error(W, plain_truncation(W, k), X)
        assert e_white <= e_plain * (1 + 1e-9) + 1e-9, (k, e_white, e_plain)
        if k < 16:
            assert e_white < 0.9 * e_plain, (k, e_white, e_plain)  # strictly lower for non-white X


def test_undamped_whitened_error_equals_tail_of_ws_spectrum():
    """With δ = 0 the output error on X is exactly the discarded singular values of W·S."""
    W = torch.randn(10, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    X = non_white_inputs(100, 12, seed=3)
    U, S, Vh = transformed_svd(W, gram_root(X.T @ X, damp=0.0))
    for k in (1, 4, 9):
        assert output_error(W, truncated(U, S, Vh, k), X) == pytest.approx(float(S[k:].norm()), rel=1e-8)


@pytest.mark.parametrize("shape", [(20, 12), (12, 20)])
def test_full_rank_reproduces_W(shape):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    X = non_white_inputs(50, shape[1])
    T = gram_root(X.T @ X)
    U, S, Vh = transformed_svd(W, T)
    r = min(shape)
    A, B = factors(U, S, Vh, r)
    assert A.shape == (r, shape[1]) and B.shape == (shape[0], r)
    torch.testing.assert_close(B @ A, W, rtol=1e-9, atol=1e-9)


def test_cholesky_fallback_for_rank_deficient_gram():
    """Fewer tokens than inputs and a dead channel: G is singular, plain Cholesky fails, damping
    rescues it; the result still reproduces W at full rank and beats plain on the tokens."""
    n = 16
    X = non_white_inputs(6, n, seed=5)  # rank ≤ 6 < 16
    X[:, 3] = 0.0  # a channel that never fires: an exact zero pivot
    G = X.T @ X
    assert torch.linalg.matrix_rank(G) < n
    T = gram_root(G, damp=0.0)
    assert T.how.startswith("cholesky (damping"), T.how
    W = torch.randn(8, n, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    U, S, Vh = transformed_svd(W, T)
    torch.testing.assert_close(truncated(U, S, Vh, 8), W, rtol=1e-7, atol=1e-7)
    for k in range(1, 8):
        assert output_error(W, truncated(U, S, Vh, k), X) <= output_error(W, plain_truncation(W, k), X) + 1e-9
    assert gram_root(G).how == "cholesky"  # the default damping handles it on the first try


def test_eigh_fallback_and_identity_for_degenerate_grams():
    indefinite = torch.tensor([[1.0, 1e5], [1e5, 1.0]], dtype=torch.float64)
    T = gram_root(indefinite)
    assert T.how == "eigh (clamped)" and not T.triangular
    W = torch.randn(3, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    U, S, Vh = transformed_svd(W, T)
    torch.testing.assert_close(truncated(U, S, Vh, 2), W)
    assert gram_root(torch.zeros(4, 4)).how.startswith("identity")
    with pytest.raises(InvalidArgument):
        gram_root(torch.zeros(3, 4))


def tokens(n: int = 6, L: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, L), generator=torch.Generator().manual_seed(seed))


def calib(t: torch.Tensor) -> Calibration:
    return Calibration(t, "random", "0" * 64, t.shape[0])


def test_layer_inputs_match_the_full_forward(tiny_llama):
    model = tiny_llama(layers=3)
    t = tokens()
    with torch.no_grad():
        hidden = model(input_ids=t, output_hidden_states=True).hidden_states
    inputs = LayerInputs(model, t)
    for L, layer in enumerate(model.model.layers):
        torch.testing.assert_close(torch.cat(inputs.hidden), hidden[L])
        inputs.run(layer)
    # hidden_states[-1] is after the final norm; compare through it
    torch.testing.assert_close(model.model.norm(torch.cat(inputs.hidden)), hidden[-1])


def test_sensitivity_layer_by_layer_equals_the_whole_models_backward(tiny_llama, monkeypatch, tmp_path):
    """c_W = mean (∂ Σ NLL / ∂ y_W)², carried back one decoder layer at a time (as a streamed model
    needs), equals autograd through the whole model; no weight gradient is formed."""
    import welore_core.compression.sensitivity as sens

    model = tiny_llama(layers=3)
    t = tokens(n=5, L=16)
    names = target_names(model)
    monkeypatch.setattr(sens, "BATCH_TOKENS", 32)  # 2 windows a batch → 3 batches
    c = sens.output_sensitivity(ResidentLayers(model), names, t, tmp_path)
    assert all(p.grad is None for p in model.parameters()) and not list(tmp_path.iterdir())
    sums = {n: 0.0 for n in names}

    def hook(name):
        def forward_hook(module, args, out):
            out.register_hook(lambda g: sums.__setitem__(name, sums[name] + float(g.double().pow(2).sum())))
        return forward_hook

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    out = model(input_ids=t, labels=t)
    (out.loss * t.shape[0] * (t.shape[1] - 1)).backward()  # HF's mean over every next token → the sum
    for h in handles:
        h.remove()
    reference = torch.tensor([sums[n] / (t.shape[0] * t.shape[1] * model.get_submodule(n).out_features)
                              for n in names], dtype=torch.float64)
    torch.testing.assert_close(c, reference, rtol=1e-4, atol=0.0)
    assert (c > 0).all() and c.max() / c.min() > 2  # the matrices differ: weights worth having


def test_one_gram_per_distinct_input(tiny_llama):
    model = tiny_llama()
    t = tokens(n=5, L=16)
    names = [n for n in target_names(model) if n.startswith("model.layers.0.")]
    inputs = LayerInputs(model, t)
    with InputStats({n: model.get_submodule(n) for n in names}) as stats:
        inputs.run(model.model.layers[0], stats)
    short = [[n.rsplit(".", 1)[-1] for n in g] for g in stats.groups]
    assert short == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    assert stats.updates == 4 * len(inputs.hidden)  # q/k/v and gate/up computed once each
    assert stats.tokens == [80] * 4
    # the q/k/v Gram is exactly XᵀX of the normed layer input
    x = model.model.layers[0].input_layernorm(torch.cat(LayerInputs(model, t).hidden)).reshape(-1, 64).double()
    torch.testing.assert_close(stats.gram[0], x.T @ x)


def test_layer_inputs_batches_and_gram_over_batches(tiny_llama, monkeypatch):
    import welore_core.compression.calibration as cal

    model = tiny_llama()
    t = tokens(n=7, L=16)
    monkeypatch.setattr(cal, "BATCH_TOKENS", 32)  # 2 windows a batch → 4 batches
    inputs = LayerInputs(model, t)
    assert [h.shape[0] for h in inputs.hidden] == [2, 2, 2, 1]
    names = [n for n in target_names(model) if n.startswith("model.layers.1.")]
    with InputStats({n: model.get_submodule(n) for n in names}) as stats:
        inputs.run(model.model.layers[0], update=True)
        inputs.run(model.model.layers[1], stats)
    assert stats.updates == 4 * 4 and stats.tokens == [7 * 16] * 4
    monkeypatch.setattr(cal, "BATCH_TOKENS", 4096)
    whole = LayerInputs(model, t)
    whole.run(model.model.layers[0])
    with InputStats({n: model.get_submodule(n) for n in names}) as one:
        whole.run(model.model.layers[1], one)
    for a, b in zip(stats.gram, one.gram):
        torch.testing.assert_close(a, b)


def test_compress_calibrated_tiny(tiny_llama, fresh_cache):
    t = tokens()
    model = tiny_llama()
    report = compress_model(model, calibrated(err=0.3, min_ratio=0.0), calib(t), cache=fresh_cache, tolerance=0.05)
    plain = compress_model(tiny_llama(), data_free(err=0.3, min_ratio=0.0), cache=fresh_cache, tolerance=0.05)
    # method welore: the very same ranks (from the weights) as plain WeLore
    assert [m.kept_rank for m in report.matrices] == [m.kept_rank for m in plain.matrices]
    assert report.factorization == "whitened" and report.method == "welore"
    c = report.calibration
    assert c["samples"] == 6 and c["seq_len"] == 32 and c["tokens"] == 192 and not c["sequential"]
    assert c["factorized"] == report.n_lrc and c["layer_forwards"] == 2  # only LRCs need W·S
    assert all((m.calib_error is not None) == (m.label == "LRC") for m in report.matrices)
    assert all(m.rel_error >= p.rel_error - 1e-6 for m, p in zip(report.matrices, plain.matrices))  # plain is
    # Frobenius-optimal on W itself; the calibrated one trades weight error for output error
    with torch.no_grad():
        logits = model(input_ids=t).logits
    assert torch.isfinite(logits).all()


def test_whitened_model_is_closer_on_calibration_tokens(tiny_llama, fresh_cache):
    t = tokens(n=8, L=32)
    dense = tiny_llama()
    with torch.no_grad():
        ref = dense(input_ids=t).logits
    out = {}
    for f in ("plain", "whitened"):
        m = tiny_llama()
        if f == "plain":
            compress_model(m, data_free(err=0.4, min_ratio=0.0), cache=fresh_cache, tolerance=0.05)
        else:
            compress_model(m, calibrated(err=0.4, min_ratio=0.0), calib(t), cache=fresh_cache, tolerance=0.05)
        with torch.no_grad():
            out[f] = float((m(input_ids=t).logits - ref).norm())
    assert out["whitened"] < out["plain"]


def test_calibrated_cache_keys(tiny_llama, fresh_cache):
    t = tokens()
    first = compress_model(tiny_llama(), calibrated(err=0.3, min_ratio=0.0), calib(t), cache=fresh_cache,
                           tolerance=0.05)
    again_model = tiny_llama()
    again = compress_model(again_model, calibrated(err=0.2, min_ratio=0.0), calib(t), cache=fresh_cache,
                           tolerance=0.05)
    assert again.calibration["factorized"] == 0 and again.calibration["layer_forwards"] == 0
    other = compress_model(tiny_llama(), calibrated(err=0.3, min_ratio=0.0), calib(tokens(seed=1)), cache=fresh_cache,
                           tolerance=0.05)
    assert other.calibration["factorized"] == other.n_lrc  # new tokens → new entries
    damped = compress_model(tiny_llama(), calibrated(err=0.3, min_ratio=0.0, damp=0.5), calib(t), cache=fresh_cache,
                            tolerance=0.05)
    assert damped.calibration["factorized"] == damped.n_lrc and damped.calibration["damp"] == 0.5
    assert first.calibration["tokens_hash"] == again.calibration["tokens_hash"] != other.calibration["tokens_hash"]


def test_loss_ranks_and_sequential(tiny_llama, fresh_cache):
    t = tokens()
    w = compress_model(tiny_llama(), calibrated(err=0.3, min_ratio=0.0), calib(t), cache=fresh_cache, tolerance=0.05)
    a = compress_model(tiny_llama(), calibrated(err=0.3, min_ratio=0.0, method="loss"), calib(t), cache=fresh_cache,
                       tolerance=0.05)
    assert a.method == "loss" and a.tau is None
    assert a.calibration["factorized"] == len(a.matrices) - w.n_lrc  # W·S of every matrix; LRCs' cached
    assert [m.kept_rank for m in a.matrices] != [m.kept_rank for m in w.matrices]
    assert abs(a.err_achieved - 0.3) <= 0.05

    model = tiny_llama()
    s = compress_model(model, calibrated(err=0.3, min_ratio=0.0, sequential=True), calib(t), cache=fresh_cache,
                       tolerance=0.05)
    assert s.calibration["sequential"] and [m.kept_rank for m in s.matrices] == [m.kept_rank for m in w.matrices]
    # layer 0 sees the same inputs either way; layer 1 sees layer 0 compressed
    lrc = [i for i, m in enumerate(w.matrices) if m.label == "LRC"]
    assert s.matrices[lrc[0]].calib_error == pytest.approx(w.matrices[lrc[0]].calib_error, rel=1e-5)
    assert s.matrices[lrc[-1]].calib_error != pytest.approx(w.matrices[lrc[-1]].calib_error, rel=1e-5)
    assert s.calibration["layer_forwards"] == 3  # layer 0 twice (dense stats, compressed output), layer 1 once
    again = compress_model(tiny_llama(), calibrated(err=0.3, min_ratio=0.0, sequential=True), calib(t),
                           cache=fresh_cache, tolerance=0.05)
    assert again.calibration["layer_forwards"] == 0
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=t).logits).all()


def test_compensated_truncation_is_the_best_rank_k_map_to_the_dense_outputs():
    """Inputs X̂ that differ from the dense X (a compressed block upstream): the whitened truncation
    of W' = W·C·Ĝ⁻¹ under Ĝ is closer to the dense outputs W·Xᵀ than that of W, at every rank, and
    (no ridge, no damping) its error is the least-squares residual plus the dropped spectrum."""
    g = torch.Generator().manual_seed(5)
    W = torch.randn(12, 16, generator=g, dtype=torch.float64)
    X = non_white_inputs(400, 16, seed=6)
    Xh = X @ (torch.eye(16, dtype=torch.float64) + 0.2 * torch.randn(16, 16, generator=g, dtype=torch.float64)) \
        + 0.05 * torch.randn(400, 16, generator=g, dtype=torch.float64)
    G = Xh.T @ Xh
    target = W @ X.T

    def err(W_hat):
        return float(torch.linalg.matrix_norm(target - W_hat @ Xh.T))

    Wc = compensated_weight(W, X.T @ Xh, G, ridge=0.0)
    fit = err(Wc)
    Uc, Sc, Vc = transformed_svd(Wc, gram_root(G, damp=0.0))
    Uw, Sw, Vw = transformed_svd(W, gram_root(G, damp=1e-2))
    for k in range(1, 17):
        e_comp, e_own = err(truncated(Uc, Sc, Vc, k)), err(truncated(Uw, Sw, Vw, k))
        assert e_comp < e_own, (k, e_comp, e_own)
        assert e_comp ** 2 == pytest.approx(fit ** 2 + float(Sc[k:].norm()) ** 2, rel=1e-6)
    # inputs equal to the dense ones: nothing to compensate
    Z = torch.randn(400, 16, generator=g, dtype=torch.float64)
    assert torch.allclose(compensated_weight(W, Z.T @ Z, Z.T @ Z, ridge=0.0), W, atol=1e-8)
    with pytest.raises(InvalidArgument, match="cross and Gram"):
        compensated_weight(W, torch.eye(15), torch.eye(16))


def test_compensate_fits_the_closing_matrices_to_the_dense_blocks(tiny_llama, fresh_cache):
    t = tokens()
    kw = dict(cache=fresh_cache, tolerance=0.05)
    seq, comp = (calibrated(err=0.3, min_ratio=0.0, sequential=True, compensate=on) for on in (False, True))
    dense = tiny_llama()
    seq_model, comp_model = tiny_llama(), tiny_llama()
    s = compress_model(seq_model, seq, calib(t), **kw)
    c = compress_model(comp_model, comp, calib(t), **kw)
    assert c.calibration["compensate"] and not s.calibration["compensate"]
    assert [m.kept_rank for m in c.matrices] == [m.kept_rank for m in s.matrices]
    assert c.calibration["factorized"] == c.n_lrc  # new keys: nothing reused from the plain sequential run
    names = target_names(dense)
    lrc = {n for n, m in zip(names, c.matrices) if m.label == "LRC"}
    assert any(closes_block(n) for n in lrc if n.startswith("model.layers.0."))
    # layer 0 (same inputs either way): its other matrices are the sequential ones, its closers differ
    for n, ms, mc in zip(names, s.matrices, c.matrices):
        if n.startswith("model.layers.0.") and n in lrc:
            assert (mc.calib_error == pytest.approx(ms.calib_error, rel=1e-6)) != closes_block(n), n
    # layer 0's output on the calibration tokens is closer to the dense layer's
    inputs = LayerInputs(dense, t)
    h, kwargs = inputs.hidden[0], inputs.kwargs[0]
    with torch.no_grad():
        out = {k: decoder_layers(m)[0](h, **kwargs) for k, m in (("dense", dense), ("seq", seq_model),
                                                                   ("comp", comp_model))}
    out = {k: v[0] if isinstance(v, tuple) else v for k, v in out.items()}
    e_seq = float((out["seq"] - out["dense"]).norm())
    e_comp = float((out["comp"] - out["dense"]).norm())
    assert e_comp < 0.9 * e_seq, (e_comp, e_seq)
    # three layer runs where the closers are fitted (statistics, compressed pass, output), none when cached
    assert c.calibration["layer_forwards"] > s.calibration["layer_forwards"]
    again = compress_model(tiny_llama(), comp, calib(t), **kw)
    assert again.calibration["layer_forwards"] == 0 and again.calibration["factorized"] == 0


def test_checkpoint_records_calibration(tiny_llama, fresh_cache, tmp_path, byte_tokenizer):
    texts = tmp_path / "calib.jsonl"
    texts.write_text("".join(json.dumps({"text": f"calibration passage number {i}, " * 4}) + "\n" for i in range(40)))
    c = load_calibration(byte_tokenizer, CalibrationConfig(data=str(texts), samples=4, seq_len=64))
    assert c.tokens.shape == (4, 64)
    model = tiny_llama()
    recipe = calibrated(err=0.3, min_ratio=0.0, data=str(texts), damp=0.05)
    report = compress_model(model, recipe, c, cache=fresh_cache, tolerance=0.05)
    save_checkpoint(model, None, tmp_path / "ckpt", {"kind": "compressed", **report.to_dict()})
    meta = read_meta(tmp_path / "ckpt")
    assert meta["factorization"] == "whitened" and meta["method"] == "welore"
    rec = meta["calibration"]
    assert rec["data"] == str(texts) and len(rec["data_hash"]) == 64
    assert (rec["samples"], rec["seq_len"], rec["damp"], rec["sequential"], rec["sink_weight"]) == (4, 64, 0.05,
                                                                                                False, 1.0)
    assert CompressConfig.from_dict(meta["recipe"]) == recipe.resolve()  # the whole recipe is stored
    plain = compress_model(tiny_llama(), data_free(err=0.3, min_ratio=0.0), cache=fresh_cache, tolerance=0.05)
    assert plain.factorization == "plain" and plain.calibration is None
    assert all(m.calib_error is None for m in plain.matrices)


def test_argument_errors(tiny_llama, fresh_cache, byte_tokenizer):
    t = calib(tokens())
    with pytest.raises(InvalidArgument, match="this recipe is calibrated"):
        compress_model(tiny_llama(), calibrated(err=0.3), cache=fresh_cache)
    with pytest.raises(InvalidArgument, match="data-free recipe"):
        compress_model(tiny_llama(), data_free(err=0.3), t, cache=fresh_cache)
    with pytest.raises(InvalidArgument, match="needs calibration"):
        data_free(err=0.3, method="loss")
    for bad in ("plain", "scaled", "svd-llm"):
        with pytest.raises(InvalidArgument, match="factorization must be one of whitened"):
            CompressConfig(err=0.3, calibration=CalibrationConfig(factorization=bad))
    with pytest.raises(InvalidArgument, match="max_position_embeddings"):
        compress_model(tiny_llama(), calibrated(err=0.3), calib(tokens(n=1, L=300)), cache=fresh_cache)
    with pytest.raises(InvalidArgument, match="tokenizer"):
        load_calibration(None, CalibrationConfig(samples=4))
    with pytest.raises(InvalidArgument, match="sink_weight weighs calibration tokens"):
        data_free(err=0.3, experimental=ExperimentalConfig(sink_weight=8))
    with pytest.raises(InvalidArgument, match=r"sink_weight must be in \(0, "):
        calibrated(err=0.3, sink_weight=0)
    with pytest.raises(InvalidArgument, match="enable sequential"):
        calibrated(err=0.3, compensate=True)


def test_cli_flags_reach_the_pipeline(monkeypatch):
    from welore_core.cli import build_parser
    import welore_core.cli.compress as cli

    import welore_core.compression.pipeline as pipeline

    seen = {}
    monkeypatch.setattr(pipeline, "compress_checkpoint", lambda *a, **kw: seen.update(args=a, **kw) or {})
    monkeypatch.setattr(cli, "emit", lambda *a, **kw: None)
    monkeypatch.setattr(cli, "human_report", lambda r: "")
    args = build_parser().parse_args(
        ["compress", "m", "--err", "0.3", "--out", "o", "--calibration", "boolq", "--calib-samples", "32",
         "--calib-seq-len", "256", "--factorization", "whitened", "--method", "welore", "--sequential",
         "--sink-weight", "64", "--compensate"])
    args.func(args)
    model, out, config = seen["args"]
    assert (model, out) == ("m", "o")
    assert config == CompressConfig(err=0.3, method="welore", calibration=CalibrationConfig(
        data="boolq", samples=32, seq_len=256, factorization="whitened", sequential=True, compensate=True),
        experimental=ExperimentalConfig(sink_weight=64.0))


def test_sink_weight_counts_each_windows_first_token_w_times(tiny_llama):
    model = tiny_llama()
    t = tokens(n=5, L=16)
    names = [n for n in target_names(model) if n.startswith("model.layers.0.")]
    x = model.model.layers[0].input_layernorm(torch.cat(LayerInputs(model, t).hidden)).double()  # 5×16×64
    for w in (1.0, 50.0):
        inputs = LayerInputs(model, t)
        with InputStats({n: model.get_submodule(n) for n in names}, sink_weight=w) as stats:
            inputs.run(model.model.layers[0], stats)
        d = torch.ones(5, 16, 1, dtype=torch.float64)
        d[:, 0] = w
        torch.testing.assert_close(stats.gram[0], torch.einsum("bti,btj->ij", x * d, x))
        assert stats.tokens[0] == 80


def test_sink_weight_protects_the_first_tokens_and_has_its_own_cache_key(tiny_llama, fresh_cache):
    """A heavy weight on each window's first token cuts the truncation error there (layer 0 sees
    the same inputs either way); weight 1 keeps the unweighted cache keys."""
    t = tokens(n=8, L=32)
    dense = tiny_llama()
    x0 = dense.model.layers[0].input_layernorm(dense.model.embed_tokens(t))[:, 0]  # first tokens' q/k/v input
    errs, keys = {}, {}
    for w in (1.0, 1000.0):
        model = tiny_llama()
        report = compress_model(model, calibrated(err=0.4, min_ratio=0.0, sink_weight=w), calib(t), cache=fresh_cache,
                                tolerance=0.05)
        assert report.calibration["sink_weight"] == w
        name = "model.layers.0.self_attn.v_proj"
        with torch.no_grad():
            errs[w] = float((model.get_submodule(name)(x0) - dense.get_submodule(name)(x0)).norm())
        keys[w] = report.calibration["factorized"]
    assert errs[1000.0] < 0.5 * errs[1.0], errs
    assert keys[1000.0] > 0  # new keys: nothing reused from the unweighted run
    again = compress_model(tiny_llama(), calibrated(err=0.4, min_ratio=0.0, sink_weight=1), calib(t),
                           cache=fresh_cache, tolerance=0.05)
    assert again.calibration["factorized"] == 0  # sink_weight=1 is the unweighted statistics: cached
