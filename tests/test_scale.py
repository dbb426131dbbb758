"""Scale: streamed compression's peak memory does not grow with depth (synthetic Llama checkpoints of
bench.scale's shape, hidden 512, 4 and 32 layers; under a minute on 2 CPU cores)."""

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_peak_rss_growth_is_flat_in_depth(tmp_path):
    from bench.scale import compress_row, import_baseline
    from bench.synthetic import SHAPES, write_synthetic

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    baseline = import_baseline(env)
    growth = {}
    for depth in (4, 32):
        model = write_synthetic(tmp_path / f"m{depth}", layers=depth, **SHAPES["bench"])
        r = compress_row(model, tmp_path, True, env)
        assert r["rc"] == 0 and r["report"]["streamed"]
        growth[depth] = r["peak_rss_mb"] - baseline
        shutil.rmtree(model)
    assert growth[32] <= 1.2 * growth[4], growth


def test_malloc_thresholds_are_fixed_on_glibc():
    """The CLI fixes glibc's mmap threshold (welore_core.heap): without it peak RSS grew with depth."""
    import platform

    from welore_core.heap import fix_malloc_thresholds

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    assert fix_malloc_thresholds() is True
