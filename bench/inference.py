"""Inference benchmark on the real SmolLM2-135M → the `inference` section of BENCHMARKS.md.

Dense against factorised (the default recipe at ERR 0.3 and 0.5; speed does not depend on
quality), each stored in fp32 and bf16: file size, prefill and decode tokens/s at batch 1 and 8
with 1 and 2 threads, and peak memory. Every (model, dtype) runs in a fresh process (so its peak
RSS is its own) and the rows are interleaved over --rounds (median kept), so load on this shared
machine falls on all rows alike. Prefill: a --prompt-token prompt, logits of the last position
only (as generation does). Decode: --new-tokens greedy steps with the KV cache.

A second table times each factorised matrix against its dense Ŵ (batch 1 and 8, 1 thread), the
check of where the two small GEMMs lose to one.

Usage: python -m bench.inference [--rounds N] [--prompt-tokens N] [--new-tokens N] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "smollm2-135m"
ERRS = (0.3, 0.5)
DTYPES = ("fp32", "bf16")
THREADS = (1, 2)
BATCHES = (1, 8)


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def child(path: str, dtype: str, prompt: int, new_tokens: int) -> dict:
    """One process: load `path` in `dtype`, then prefill/decode timings for each thread count."""
    import torch

    from welore_core.dtypes import to_torch
    from welore_core.loading import load_model

    base = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    model = load_model(path, device="cpu", dtype=to_torch(dtype)).model
    load_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    out = {"load_s": load_s, "base_rss_mb": base}
    with torch.inference_mode():
        for threads in THREADS:
            torch.set_num_threads(threads)
            for batch in BATCHES:
                ids = torch.randint(100, 20000, (batch, prompt), generator=gen)
                model(ids[:, :8], logits_to_keep=1)  # warm-up
                t = time.perf_counter()
                res = model(ids, use_cache=True, logits_to_keep=1)
                prefill = time.perf_counter() - t
                past, nxt = res.past_key_values, res.logits[:, -1:].argmax(-1)
                t = time.perf_counter()
                for _ in range(new_tokens):
                    res = model(nxt, past_key_values=past, use_cache=True)
                    past, nxt = res.past_key_values, res.logits[:, -1:].argmax(-1)
                decode = time.perf_counter() - t
                out[f"prefill_t{threads}_b{batch}"] = batch * prompt / prefill
                out[f"decode_t{threads}_b{batch}"] = batch * new_tokens / decode
    out["peak_rss_mb"] = _rss_mb("VmHWM")
    return out


def matrices(path: str, repeats: int = 30) -> list[list]:
    """Per factorised matrix shape/rank: µs of dense Ŵ vs B·(A·x), batch 1 and 8, 1 thread."""
    import torch
    import torch.nn.functional as F

    from welore_core.loading import load_model
    from welore_core.lowrank import LowRankLinear

    torch.set_num_threads(1)
    model = load_model(path, device="cpu", dtype=torch.float32).model
    groups: dict[tuple, list] = {}
    for name, m in model.named_modules():
        if isinstance(m, LowRankLinear):
            groups.setdefault((name.rsplit(".", 1)[-1], m.out_features, m.in_features), []).append(m)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times) * 1e6

    rows = []
    with torch.inference_mode():
        for (kind, m_out, n_in), mods in sorted(groups.items()):
            mod = sorted(mods, key=lambda x: x.rank)[len(mods) // 2]  # the median-rank one of its kind
            W = mod.merged_weight().contiguous()
            row = [kind, f"{m_out}x{n_in}", len(mods), mod.rank,
                   round(mod.rank * (m_out + n_in) / (m_out * n_in), 3)]
            for batch in BATCHES:
                x = torch.randn(batch, n_in)
                dense = best(lambda: F.linear(x, W))
                low = best(lambda: mod(x))
                row += [round(dense, 1), round(low, 1), round(dense / low, 2)]
            rows.append(row)
    return rows


def run_child(path: str, dtype: str, args) -> dict:
    code = (f"import json, bench.inference as b; print('RESULT', json.dumps(b.child({path!r}, {dtype!r}, "
            f"{args.prompt_tokens}, {args.new_tokens})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.rsplit("RESULT ", 1)[1])


def prepare(workdir: Path) -> dict[tuple, str]:
    """The six model directories: dense and ERR 0.3/0.5 (the default recipe), each in fp32 and bf16."""
    import torch

    from welore_core.checkpoint import export_checkpoint, save_merged
    from welore_core.loading import gguf_to_safetensors, load_model, registry_path

    dense = str(gguf_to_safetensors(registry_path(MODEL)))
    paths = {("dense", "fp32"): dense}
    if not (workdir / "dense-bf16").is_dir():
        loaded = load_model(dense, device="cpu", dtype=torch.float32)
        save_merged(loaded.model, loaded.tokenizer, workdir / "dense-bf16", dtype=torch.bfloat16)
    paths[("dense", "bf16")] = str(workdir / "dense-bf16")
    for err in ERRS:
        fp32 = workdir / f"err{err}-fp32"
        if not fp32.is_dir():
            subprocess.run([sys.executable, "-m", "welore_core.cli", "compress", MODEL, "--err", str(err),
                            "--dtype", "fp32", "--out", str(fp32), "--quiet"], check=True)
        if not (workdir / f"err{err}-bf16").is_dir():
            export_checkpoint(fp32, out=workdir / f"err{err}-bf16", dtype="bf16")
        paths[(f"ERR {err}", "fp32")], paths[(f"ERR {err}", "bf16")] = str(fp32), str(workdir / f"err{err}-bf16")
    return paths


def file_mb(path: str) -> float:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors")) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--workdir", default=None, help="keep the prepared checkpoints here (default: a temp dir)")
    args = ap.parse_args()
    from bench.report import machine, table, write_section

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="welore-inference-"))
    workdir.mkdir(parents=True, exist_ok=True)
    paths = prepare(workdir)
    runs: dict[tuple, list[dict]] = {key: [] for key in paths}
    for r in range(args.rounds):
        order = list(paths) if r % 2 == 0 else list(reversed(paths))  # interleaved, alternating order
        for key in order:
            runs[key].append(run_child(paths[key], key[1], args))
            print(f"round {r + 1}: {key[0]} {key[1]} done", file=sys.stderr, flush=True)
    med = {key: {k: statistics.median(run[k] for run in rs) for k in rs[0]} for key, rs in runs.items()}

    dense_file = file_mb(paths[("dense", "fp32")])
    rows = []
    for key in paths:
        m, ref = med[key], med[("dense", key[1])]
        row = [key[0], key[1], round(file_mb(paths[key])), round(file_mb(paths[key]) / dense_file, 3)]
        for t in THREADS:
            for what in ("decode", "prefill"):
                for b in BATCHES:
                    k = f"{what}_t{t}_b{b}"
                    row.append(f"{m[k]:.1f} ({m[k] / ref[k]:.2f}x)")
        growth, ref_growth = m["peak_rss_mb"] - m["base_rss_mb"], ref["peak_rss_mb"] - ref["base_rss_mb"]
        row += [f"{m['peak_rss_mb']:.0f} ({m['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x)",
                f"{growth:.0f} ({growth / ref_growth:.2f}x)"]
        rows.append(row)
    headers = ["model", "dtype", "file MB", "file / dense fp32"]
    headers += [f"{w} b{b} t{t} tok/s" for t in THREADS for w in ("decode", "prefill") for b in BATCHES]
    headers += ["peak RSS MB", "peak − imports MB"]
    mat = matrices(paths[("ERR 0.5", "fp32")])
    mat_headers = ["matrix", "shape", "count", "median rank", "params factors/dense"]
    mat_headers += [f"{w} b{b}" for b in BATCHES for w in ("dense µs", "factors µs", "speed-up")]
    body = "\n\n".join([
        f"## Inference: dense vs factorised (`python -m bench.inference`)\n\n{machine()}. SmolLM2-135M; "
        f"ERR rows are the default recipe (`welore compress MODEL --err F --dtype fp32`); prompt {args.prompt_tokens} tokens, "
        f"{args.new_tokens} decode steps; median of {args.rounds} interleaved rounds, each (model, dtype) in a fresh "
        "process. Ratios in parentheses are against dense of the same dtype in the same run; peak RSS is the "
        "process's VmHWM, `peak − imports` subtracts the RSS after importing torch/transformers/welore.",
        table(headers, rows),
        "Each factorised matrix kind of the ERR 0.5 model (its median-rank member) against its dense Ŵ, one thread, "
        "best of 30 calls, fp32:",
        table(mat_headers, mat),
    ])
    print(body)
    write_section("inference", body)


if __name__ == "__main__":
    main()
