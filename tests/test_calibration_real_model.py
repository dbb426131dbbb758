"""Calibrated WeLore end to end on the packaged SmolLM2-135M: at ERR 0.3 (min_ratio 0.5), with
the same WeLore ranks, the whitened factorisation calibrated on BoolQ passages (Wikipedia)
gives a lower perplexity than plain WeLore on held-out text of another domain
(CommonsenseQA dev questions and choices). Through compress_checkpoint, so welore.json's
calibration record is checked too."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.real_model

CALIB = dict(data="boolq", samples=16, seq_len=256)  # 4,096 tokens: > the widest input (1,536)
EVAL = dict(seq_len=256, windows=4)


def recipe(err: float, **calibration):
    """WeLore ranks (method welore, min_ratio 0.5); whitened with `calibration` (None: data-free)."""
    from welore_core.compression.config import CalibrationConfig, CompressConfig

    if not calibration:
        return CompressConfig(err=err, min_ratio=0.5, calibration=None)
    return CompressConfig(err=err, min_ratio=0.5, method="welore", calibration=CalibrationConfig(**CALIB, **calibration))


@pytest.fixture(scope="module")
def held_out_text(tmp_path_factory, data_dir):
    lines = []
    with open(data_dir / "commonsenseqa" / "dev_rand_split.jsonl") as f:
        for line in f:
            q = json.loads(line)["question"]
            lines.append(q["stem"] + " " + " ".join(f"({c['label']}) {c['text']}" for c in q["choices"]))
    path = tmp_path_factory.mktemp("heldout") / "csqa_questions.txt"
    path.write_text("\n".join(lines[:400]) + "\n")
    return path


def test_whitened_beats_plain_on_other_domain_text(tmp_path, held_out_text):
    from welore_core.checkpoint import read_meta
    from welore_core.compression.pipeline import compress_checkpoint
    from welore_core.pipelines import evaluate_model

    plain = compress_checkpoint("smollm2-135m", tmp_path / "plain", recipe(0.3), device="cpu")
    white = compress_checkpoint("smollm2-135m", tmp_path / "white", recipe(0.3, sequential=False), device="cpu")
    assert [m["kept_rank"] for m in white["matrices"]] == [m["kept_rank"] for m in plain["matrices"]]

    meta = read_meta(tmp_path / "white")
    assert meta["factorization"] == "whitened" and meta["method"] == "welore"
    c = meta["calibration"]
    assert (c["data"], c["samples"], c["seq_len"], c["sequential"]) == ("boolq", 16, 256, False)
    assert len(c["data_hash"]) == 64 and c["damp"] > 0
    assert read_meta(tmp_path / "plain")["factorization"] == "plain"

    ppl_plain = evaluate_model(str(tmp_path / "plain"), str(held_out_text), device="cpu", **EVAL)["perplexity"]
    ppl_white = evaluate_model(str(tmp_path / "white"), str(held_out_text), device="cpu", **EVAL)["perplexity"]
    print(f"held-out perplexity at ERR 0.3: plain {ppl_plain:.1f}, whitened {ppl_white:.1f}")
    assert ppl_white < ppl_plain


def test_compensate_beats_sequential_at_err_05(tmp_path, held_out_text):
    """ERR 0.5 (min_ratio 0.5): fitting o_proj/down_proj to the dense blocks' outputs lowers the
    perplexity of the sequential whitened compression on other-domain text."""
    from welore_core.checkpoint import read_meta
    from welore_core.compression.pipeline import compress_checkpoint
    from welore_core.pipelines import evaluate_model

    ppl = {}
    for name, compensate in (("seq", False), ("comp", True)):
        compress_checkpoint("smollm2-135m", tmp_path / name, recipe(0.5, sequential=True, compensate=compensate),
                            device="cpu")
        ppl[name] = evaluate_model(str(tmp_path / name), str(held_out_text), device="cpu", **EVAL)["perplexity"]
    assert read_meta(tmp_path / "comp")["calibration"]["compensate"] is True
    assert read_meta(tmp_path / "seq")["calibration"]["compensate"] is False
    print(f"held-out perplexity at ERR 0.5: sequential {ppl['seq']:.1f}, compensated {ppl['comp']:.1f}")
    assert ppl["comp"] < ppl["seq"]
