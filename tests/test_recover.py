"""`welore compress … --recover STEPS`: compression followed, in the same command, by distilled
WeLore-COFT from the dense source; the quality block reports before and after (tiny model with a
trained tokenizer, a few steps)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from welore_core.compression.config import RECOVER_OPTIONS, RECOVER_TEXT, CalibrationConfig, CompressConfig
from welore_core.compression.pipeline import compress_checkpoint
from welore_core.errors import OutputExists

WORDS = "the a river stone light green runs under over house bird sings quietly morning field".split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_llama import make_tiny_llama, train_tokenizer

    rnd = random.Random(1)
    docs = [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(40, 80))) + "." for _ in range(120)]
    root = tmp_path_factory.mktemp("recover")
    make_tiny_llama(seed=5, vocab=320).save_pretrained(root / "dense")
    train_tokenizer(docs).save_pretrained(root / "dense")
    (root / "text.txt").write_text("\n\n".join(docs) + "\n")
    return root


def recipe(text) -> CompressConfig:
    return CompressConfig(err=0.4, min_ratio=0.0, calibration=CalibrationConfig(data=str(text), samples=4,
                                                                               seq_len=64))


def test_recover_fine_tunes_the_factors_from_the_dense_teacher(tiny, tmp_path, fresh_cache):
    out = tmp_path / "c"
    r = compress_checkpoint(str(tiny / "dense"), out, recipe(tiny / "text.txt"), recover=3,
                            recover_data=str(tiny / "text.txt"), cache=fresh_cache, device="cpu")
    q = r["quality"]
    assert q["perplexity_before_recovery"] > 0 and q["perplexity"] > 0
    assert q["ratio"] == pytest.approx(q["perplexity"] / q["perplexity_dense"])
    assert r["recovery"]["steps"] == 3 and r["recovery"]["teacher"] == str(tiny / "dense")
    meta = json.loads((out / "welore.json").read_text())
    assert meta["training"]["config"]["teacher"] == str(tiny / "dense")  # distilled from the dense source
    assert {k: meta["training"]["config"][k] for k in RECOVER_OPTIONS} == RECOVER_OPTIONS
    assert meta["recipe"] == r["recipe"] and meta["factored"]  # still the compressed, factorised model
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # the intermediate checkpoint is gone


def test_outputs_are_checked_before_any_work(tiny, tmp_path, fresh_cache, monkeypatch):
    out = tmp_path / "c"
    out.mkdir()
    (out / "keep").write_text("x")
    import welore_core.compression.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("work started before the check"))
    with pytest.raises(OutputExists):
        compress_checkpoint(str(tiny / "dense"), out, recipe(tiny / "text.txt"), recover=3, cache=fresh_cache)
    merged = tmp_path / "m"
    merged.mkdir()
    (merged / "keep").write_text("x")
    with pytest.raises(OutputExists):
        compress_checkpoint(str(tiny / "dense"), tmp_path / "new", recipe(tiny / "text.txt"), merged_out=merged,
                            cache=fresh_cache)
    assert (out / "keep").read_text() == "x" and not (tmp_path / "new").exists()


def test_what_recover_runs_is_stated_where_users_read_it():
    from api.jobs.params import CompressParams
    from welore_core.cli import build_parser

    guide = (Path(__file__).resolve().parent.parent / "docs" / "guide" / "cli-and-recipes.md").read_text()
    row = next(line for line in guide.splitlines() if line.startswith("| `--recover STEPS`"))
    compress = next(a for a in build_parser()._subparsers._group_actions[0].choices["compress"]._actions
                    if "--recover" in a.option_strings)
    assert RECOVER_TEXT in row and RECOVER_TEXT in compress.help
    assert RECOVER_TEXT in CompressParams.model_fields["recover"].description
