"""The default recipe on the real SmolLM2-135M: `welore compress smollm2-135m --err 0.3` with no other
flag gives a usable model on held-out text of another domain, and its quality block matches
`welore eval` on the same held-out slice."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.real_model


def welore(*args) -> dict:
    proc = subprocess.run([sys.executable, "-m", "welore_core.cli", *map(str, args), "--json"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def csqa_file(data_dir, path):
    rows = [json.loads(line) for line in (data_dir / "commonsenseqa" / "dev_rand_split.jsonl").read_text().splitlines()
            if line.strip()]
    with open(path, "w") as f:
        for obj in rows:
            q = obj["question"]
            choices = " ".join(f"({c['label']}) {c['text']}" for c in q["choices"])
            f.write(json.dumps({"text": f"Question: {q['stem']} Choices: {choices}"}) + "\n")
    return path


def test_default_err_03_is_usable_and_its_quality_block_matches_eval(tmp_path, data_dir):
    out = tmp_path / "c03"
    r = welore("compress", "smollm2-135m", "--err", "0.3", "--out", out)
    assert r["recipe"]["calibration"]["data"] == "general" and r["method"] == "loss"
    assert abs(r["err_achieved"] - 0.3) <= 0.005
    q = r["quality"]
    assert set(q) >= {"perplexity_dense", "perplexity", "ratio", "tokens"}
    assert q["ratio"] == pytest.approx(q["perplexity"] / q["perplexity_dense"])
    assert r["warning"] is None  # a usable model gets no warning

    # the quality block's numbers are what `welore eval` gives on the same held-out slice
    heldout = ["--data", "general-heldout", "--windows", "4", "--seq-len", "512"]
    assert welore("eval", out, *heldout)["perplexity"] == pytest.approx(q["perplexity"], rel=1e-4)
    assert welore("eval", "smollm2-135m", *heldout)["perplexity"] == pytest.approx(q["perplexity_dense"], rel=1e-4)

    # held-out text of another domain (CommonsenseQA questions: not in the calibration text)
    other = ["--data", csqa_file(data_dir, tmp_path / "csqa.jsonl"), "--windows", "8"]
    ratio = welore("eval", out, *other)["perplexity"] / welore("eval", "smollm2-135m", *other)["perplexity"]
    assert ratio <= 2.0, f"default ERR 0.3 is {ratio:.2f}x the dense perplexity on CommonsenseQA text"

    # the stored recipe reproduces the checkpoint: same tensors
    again = tmp_path / "again"
    welore("compress", "smollm2-135m", "--recipe", out / "welore.json", "--out", again)
    from safetensors.torch import load_file

    a, b = load_file(str(out / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_data_free_heavy_compression_warns_with_a_better_recipe(tmp_path):
    r = welore("compress", "smollm2-135m", "--err", "0.5", "--calibration", "none", "--out", tmp_path / "c")
    assert r["quality"]["ratio"] > 5
    assert "calibrated compression" in r["warning"] and "--recover" in r["warning"]


def test_an_unusable_target_is_refused_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "welore_core.cli", "compress", "smollm2-135m", "--err", "0.95",
                           "--out", str(tmp_path / "c")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "no usable model" in proc.stderr and "--recover" in proc.stderr
    assert not (tmp_path / "c").exists()
