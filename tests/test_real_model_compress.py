"""End to end on the real SmolLM2-135M and BoolQ passages, through the command line."""

import json
import math

import pytest

from test_cli import last_json, welore

pytestmark = pytest.mark.real_model
WINDOWS = "6"  # 6 windows of 512 tokens: enough to separate the methods, quick on a CPU


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("real")


def _ppl(model, boolq_path):
    return last_json(welore("eval", model, "--data", boolq_path, "--windows", WINDOWS, "--json"))


def test_welore_beats_uniform_at_err_0_1(work, boolq_path):
    results = {}
    for method in ("welore", "uniform"):
        out = work / f"{method}-0.1"
        r = last_json(welore("compress", "smollm2-135m", "--err", "0.1", "--min-ratio", "0", "--method", method,
                             "--calibration", "none", "--out", out, "--json"))
        assert abs(r["err_achieved"] - 0.1) <= 0.005
        assert r["n_lrc"] == 210 and r["n_nlrc"] == 0  # every matrix truncated
        results[method] = _ppl(out, boolq_path)
    w, u = results["welore"]["perplexity"], results["uniform"]["perplexity"]
    assert math.isfinite(w) and math.isfinite(u)
    assert w * 5 < u, (w, u)  # reference: ~4.1e3 vs ~7.2e4


def test_err_0_3_checkpoint_is_smaller_and_merged_export_agrees(work, boolq_path):
    out, merged = work / "c-0.3", work / "m-0.3"
    # fp32 weights: the merged export must compute what the factors compute, up to fp32 rounding (in bf16
    # each write rounds W = B·A once more, and this data-free model's perplexity of ~7e4 amplifies that)
    r = last_json(welore("compress", "smollm2-135m", "--err", "0.3", "--min-ratio", "0.5", "--calibration", "none",
                         "--dtype", "fp32", "--out", out, "--merged-out", merged, "--json"))
    assert abs(r["err_achieved"] - 0.3) <= 0.005
    assert r["params_after"] < r["params_before"]
    assert 0.8 < r["params_kept_achieved"] < 0.92  # reference: 0.859 of the linear parameters
    assert (out / "model.safetensors").stat().st_size < (merged / "model.safetensors").stat().st_size
    meta = json.loads((out / "welore.json").read_text())
    assert len(meta["factored"]) > 0 and meta["source"]["model"] == "smollm2-135m"
    reloaded, plain = _ppl(out, boolq_path), _ppl(merged, boolq_path)
    assert math.isfinite(reloaded["perplexity"])
    assert reloaded["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-3)
