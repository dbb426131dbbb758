"""Scale (slow, not in the default run): streamed compression's peak memory does not grow with depth."""

import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_peak_rss_growth_is_flat_in_depth(tmp_path):
    from bench.scale import compress_row, import_baseline
    from bench.synthetic import SHAPES, write_synthetic

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    baseline = import_baseline(env)
    growth = {}
    for depth in (4, 16):
        model = write_synthetic(tmp_path / f"m{depth}", layers=depth, **SHAPES["small"])
        r = compress_row(model, tmp_path, True, env)
        assert r["rc"] == 0 and r["report"]["streamed"]
        growth[depth] = r["peak_rss_mb"] - baseline
        shutil.rmtree(model)
    assert growth[16] <= 1.2 * growth[4], growth
