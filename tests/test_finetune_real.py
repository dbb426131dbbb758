"""Fine-tuning the real packaged model (SmolLM2-135M): WeLore-COFT brings a heavily
compressed model (ERR 0.5, min_ratio 0.5: held-out perplexity in the tens of thousands or
more) back by at least 10× in a couple of dozen steps on BoolQ passages; and a task run
(BoolQ yes/no, LoRA on the dense model) reports option-likelihood accuracy."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.real_model


def _cli(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "welore_core.cli", "finetune", *args, "--json"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    from welore_core.compression.config import CompressConfig
    from welore_core.compression.pipeline import compress_checkpoint

    out = tmp_path_factory.mktemp("real") / "c05"
    compress_checkpoint("smollm2-135m", out, CompressConfig(err=0.5, min_ratio=0.5, calibration=None))
    return out


def test_coft_recovers_the_compressed_model_on_boolq_passages(compressed, tmp_path):
    out = tmp_path / "coft"
    # Held-out = BoolQ passages never trained on (split by passage hash), 16 windows of 128 tokens.
    r = _cli(str(compressed), "--data", "boolq-passages", "--method", "welore", "--steps", "24", "--lr", "5e-4",
             "--batch-size", "4", "--seq-len", "128", "--val-sequences", "16", "--out", str(out))
    assert r["data"]["format"] == "text" and r["data"]["split"] == "documents"
    assert 30.0 < r["params"]["trainable_pct"] < 40.0  # LRC factors + norms of a 50%-ERR model
    assert r["val_perplexity_before"] > 1e4
    assert r["val_perplexity_after"] * 10 <= r["val_perplexity_before"], (r["val_perplexity_before"],
                                                                          r["val_perplexity_after"])
    meta = json.loads((out / "welore.json").read_text())
    assert meta["training"]["status"] == "complete"
    assert len(meta["factored"]) == sum(m["storage"] == "factors" for m in meta["matrices"]) > 0

    from welore_core.loading import load_model
    loaded = load_model(str(out), device="cpu")
    assert loaded.meta["training"]["val_after"]["perplexity"] == pytest.approx(r["val_perplexity_after"])


def test_lora_on_a_task_reports_choice_accuracy(tmp_path):
    r = _cli("smollm2-135m", "--data", "boolq", "--method", "lora", "--steps", "2", "--batch-size", "2",
             "--seq-len", "192", "--val-sequences", "4", "--choice-examples", "12", "--out", str(tmp_path / "lora"))
    assert r["data"]["format"] == "boolq"
    acc = r["accuracy"]
    assert acc["before"]["examples"] == acc["after"]["examples"] == 12
    assert 0.0 <= acc["after"]["accuracy"] <= 1.0
    assert r["params"]["trainable_pct"] < 5.0
    meta = json.loads((tmp_path / "lora" / "welore.json").read_text())
    assert meta["factored"] == {} and meta["training"]["method"] == "lora"
