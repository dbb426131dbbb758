"""The cost of data-free WeLore compression on the real SmolLM2-135M → the `compression` section
of BENCHMARKS.md (the quality of the recipes is bench/recipes.py's section).

1. Cost, side by side in one run: our single-pass compression with a cold spectrum cache, the
   same with a warm cache at another ERR, and the reference code's two-pass procedure
   (singular values of every matrix, then a second SVD of each LRC). Best of --repeats.
2. Memory: peak RSS of a cold `welore compress` against the dense float32 model's bytes.

Usage: python -m bench.compression [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.report import machine, table, welore_json as cli, write_section
from welore_core.compression.allocation import allocate_welore
from welore_core.compression.config import CompressConfig
from welore_core.compression.factorize import factors
from welore_core.compression.model import compress_model
from welore_core.loading import load_model
from welore_core.lowrank import LowRankLinear, swap_module
from welore_core.spectrum import SpectrumCache
from welore_core.targets import target_names

MODEL = "smollm2-135m"
DATA_FREE = ("--calibration", "none")


def data_free(err: float, min_ratio: float) -> CompressConfig:
    return CompressConfig(err=err, min_ratio=min_ratio, calibration=None)


def reference_two_pass(model, err: float, min_ratio: float) -> float:
    """The published procedure: svdvals of every matrix, allocate, then SVD each LRC again."""
    t0 = time.perf_counter()
    names = target_names(model)
    weights = [model.get_submodule(n).weight.detach() for n in names]
    values = [torch.linalg.svdvals(W.float()) for W in weights]
    alloc = allocate_welore(values, [tuple(W.shape) for W in weights], err=err, min_ratio=min_ratio)
    for name, W, plan in zip(names, weights, alloc.plans):
        if plan.lrc:
            U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
            if plan.factored:
                A, B = factors(U, S, Vh, plan.kept)
                swap_module(model, name, LowRankLinear.from_factors(A, B))
            else:
                with torch.no_grad():
                    model.get_submodule(name).weight.copy_((U[:, :plan.kept] * S[:plan.kept]) @ Vh[:plan.kept])
    return time.perf_counter() - t0


def cost_rows(repeats: int) -> list[list]:
    rows = []
    for err, min_ratio in ((0.3, 0.5), (0.5, 0.5), (0.1, 0.0)):
        cold, warm, ref = [], [], []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as d:
                cache = SpectrumCache(Path(d))
                model = load_model(MODEL, device="cpu").model
                cold.append(compress_model(model, data_free(err, min_ratio), cache=cache).seconds)
                other = 0.2 if err != 0.2 else 0.4  # warm: the same model at another ERR
                model = load_model(MODEL, device="cpu").model
                warm.append(compress_model(model, data_free(other, min_ratio), cache=cache).seconds)
            model = load_model(MODEL, device="cpu").model
            ref.append(reference_two_pass(model, err, min_ratio))
        c, w, r = min(cold), min(warm), min(ref)
        rows.append([f"{err} (min_ratio {min_ratio})", r, c, w, f"{c / r:.2f}×", f"{w / c:.3f}×"])
    return rows


def memory_row(work: Path) -> list:
    with tempfile.TemporaryDirectory() as d:
        env = {**os.environ, "WELORE_CACHE_DIR": d}
        # the model conversion lives in the cache too: convert once, then measure a cold-spectrum run
        cli("compress", MODEL, "--err", "0.3", *DATA_FREE, "--out", work / "mem-warmup", "--overwrite", env=env)
        for f in (Path(d) / "svd").iterdir():
            f.unlink()
        r = cli("compress", MODEL, "--err", "0.3", *DATA_FREE, "--out", work / "mem", "--overwrite", env=env)
    probe = ("import resource, torch, transformers, transformers.models.llama.modeling_llama, tokenizers, "
             "welore_core.compression.pipeline, welore_core.cli.compress;"
             "from welore_core.cli.common import peak_rss_mb; print(peak_rss_mb())")
    base = float(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.split()[-1])
    model_mb = r["params_before"] * 4 / 2**20
    return [f"{model_mb:.0f}", f"{base:.0f}", f"{r['peak_rss_mb']:.0f}", f"{r['peak_rss_mb'] - base:.0f}",
            f"{r['peak_rss_mb'] / model_mb:.2f}×", f"{(r['peak_rss_mb'] - base) / model_mb:.2f}×"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        cli("spectrum", MODEL)  # make sure the GGUF conversion and spectra exist (not timed)
        cost = cost_rows(args.repeats)
        print(table(["ERR", "reference two-pass s", "ours cold s", "ours warm s", "cold/reference", "warm/cold"], cost))
        mem = memory_row(work)
        print(table(["dense fp32 MB", "RSS after imports MB", "peak RSS MB", "growth MB", "peak/model", "growth/model"], [mem]))
    body = "\n\n".join([
        "## Compression (`python -m bench.compression`)",
        f"Machine: {machine()}. Model: SmolLM2-135M (packaged GGUF, dequantised to float32).",
        "### Cost of one compression: cold and warm spectrum cache vs the reference two-pass procedure",
        "Seconds of the compression itself (spectra + allocation + factorisation, model already loaded), "
        f"best of {args.repeats}, all measured in this run. Warm = the same model at another ERR with the cache filled.",
        table(["ERR", "reference two-pass s", "ours cold s", "ours warm s", "cold/reference", "warm/cold"], cost),
        "### Peak memory of a cold data-free `welore compress` (ERR 0.3)",
        table(["dense fp32 MB", "RSS after imports MB", "peak RSS MB", "growth MB", "peak/model", "growth/model"], [mem]),
        "Quality of the recipes (the calibrated default, data-free WeLore and uniform, other allocations): "
        "§ compression-recipes (`python -m bench.recipes`).",
    ])
    write_section("compression", body)


if __name__ == "__main__":
    main()
