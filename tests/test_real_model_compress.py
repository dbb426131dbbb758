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
    r = last_json(welore("compress", "smollm2-135m", "--err", "0.3", "--min-ratio", "0.5", "--calibration", "none",
                         "--out", out, "--merged-out", merged, "--json"))
    assert abs(r["err_achieved"] - 0.3) <= 0.005
    assert r["params_after"] < r["params_before"]
    assert 0.8 < r["params_kept_achieved"] < 0.92  # reference: 0.859 of the linear parameters
    assert (out / "model.safetensors").stat().st_size < (merged / "model.safetensors").stat().st_size
    meta = json.loads((out / "welore.json").read_text())
    assert len(meta["factored"]) > 0 and meta["source"]["model"] == "smollm2-135m"
    reloaded, plain = _ppl(out, boolq_path), _ppl(merged, boolq_path)
    assert math.isfinite(reloaded["perplexity"])
    assert reloaded["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-3)


@pytest.fixture(scope="module")
def csqa_questions(work, data_dir):
    """Held-out text of another domain than the calibration text: CommonsenseQA dev questions and choices."""
    lines = []
    with open(data_dir / "commonsenseqa" / "dev_rand_split.jsonl") as f:
        for line in f:
            q = json.loads(line)["question"]
            lines.append(q["stem"] + " " + " ".join(f"({c['label']}) {c['text']}" for c in q["choices"]))
    path = work / "csqa_questions.txt"
    path.write_text("\n".join(lines[:400]) + "\n")
    return path


@pytest.mark.slow  # calibrated compression of SmolLM2 (64 x 512 tokens): well over 10 min on a loaded 2-core box
def test_default_recipe_gives_a_usable_model_and_its_quality_block_matches_eval(work, csqa_questions):
    """No flag beyond the target: calibrated on the shipped text, ≤ 2× the dense perplexity on
    another domain's text at ERR 0.3, and the reported quality block is what `welore eval` measures."""
    out = work / "default-0.3"
    r = last_json(welore("compress", "smollm2-135m", "--err", "0.3", "--out", out, "--json", timeout=3600))
    assert r["recipe"]["calibration"] is not None and r["recipe"]["method"] == "loss"
    assert abs(r["err_achieved"] - 0.3) <= 0.005 and r["warning"] is None
    q = r["quality"]
    assert set(q) >= {"perplexity_dense", "perplexity", "ratio", "tokens"}
    assert q["ratio"] == pytest.approx(q["perplexity"] / q["perplexity_dense"])
    windows, seq_len = str(q["tokens"] // 511), "512"  # the quality slice: windows of 512 tokens, 511 predicted
    dense = last_json(welore("eval", "smollm2-135m", "--data", q["data"], "--windows", windows, "--seq-len", seq_len,
                             "--json"))
    comp = last_json(welore("eval", out, "--data", q["data"], "--windows", windows, "--seq-len", seq_len, "--json"))
    assert dense["tokens"] == comp["tokens"] == q["tokens"]
    assert comp["perplexity"] == pytest.approx(q["perplexity"], rel=0.02)  # the checkpoint is written in bf16
    assert dense["perplexity"] == pytest.approx(q["perplexity_dense"], rel=0.02)
    other = {m: last_json(welore("eval", m, "--data", csqa_questions, "--windows", "4", "--seq-len", "256", "--json"))
             for m in ("smollm2-135m", out)}
    ratio = other[out]["perplexity"] / other["smollm2-135m"]["perplexity"]
    print(f"default recipe at ERR 0.3: {ratio:.2f}x the dense perplexity on CommonsenseQA questions")
    assert ratio <= 2.0, ratio
