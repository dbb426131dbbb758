"""Scale: `welore compress` of synthetic Llama checkpoints of one shape and growing depth, streamed
layer by layer vs loaded whole (the baseline, same run), and a Llama-3-8B-shaped checkpoint.

Each row is one `welore compress --err 0.3 --json` in a child process with a fresh spectrum cache
(cold): peak RSS (the child's VmHWM, polled from outside so a run stopped at its time budget is
measured too), the growth above the import baseline (a child that imports the same modules),
seconds, seconds per layer and the cache's bytes. The 8B-shaped model (bf16 shards, 32 GB in
float32) runs streamed only, niced, under `--big-seconds`; with `--work DIR`, a run stopped there
continues from its journal (layers whose spectra are done, shards written) at the next invocation.
Parts are saved in `--results` (default bench/results/scale.json, kept in the repository) as they
finish and the section is rendered from all of them, so the depth rows (which want a quiet machine:
their seconds are compared) and the long 8B-shaped run can be measured at different times
(`--depths none --big`), and a fresh checkout re-renders the section without measuring
(`--depths none`).

    python -m bench.scale [--depths 4,8,16,32|none] [--big] [--big-seconds 1200] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import RESULTS, machine, table, write_section
from bench.synthetic import SHAPES, write_synthetic

ROOT = Path(__file__).resolve().parent.parent
RESULTS_FILE = RESULTS / "scale.json"
SECTION = "scale"
GB = 1e9


def _vmhwm_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def run_child(args: list[str], env: dict, timeout: float | None = None, nice: int = 0) -> dict:
    """Run a command, polling its peak RSS; returns {rc, seconds, peak_rss_mb, stdout, timed_out}."""
    t0 = time.perf_counter()
    cmd = (["nice", "-n", str(nice)] if nice else []) + args
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    target = proc.pid
    peak, timed_out = 0.0, False
    out_chunks: list[str] = []
    import threading

    def drain(stream, sink):
        for line in stream:
            sink.append(line)

    err_lines: list[str] = []
    threads = [threading.Thread(target=drain, args=(proc.stdout, out_chunks), daemon=True),
               threading.Thread(target=drain, args=(proc.stderr, err_lines), daemon=True)]
    for t in threads:
        t.start()
    while proc.poll() is None:
        peak = max(peak, _vmhwm_mb(target) or 0.0)
        if timeout is not None and time.perf_counter() - t0 > timeout:
            timed_out = True
            proc.kill()
            break
        time.sleep(0.2)
    proc.wait()
    for t in threads:
        t.join(timeout=5)
    return {"rc": proc.returncode, "seconds": time.perf_counter() - t0, "peak_rss_mb": peak,
            "stdout": "".join(out_chunks), "stderr": "".join(err_lines[-50:]), "timed_out": timed_out}


def import_baseline(env: dict) -> float:
    code = ("import torch, transformers, welore_core.pipelines, welore_core.compression.streamed.compress, "
            "welore_core.compression.model; from transformers import LlamaForCausalLM; "
            "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024.0


def compress_row(model: Path, work: Path, streamed: bool, env: dict, timeout=None, nice=0, cache=None,
                 extra_env=None) -> dict:
    cache = cache or Path(tempfile.mkdtemp(dir=work, prefix="cache-"))
    out = work / f"out-{model.name}-{'s' if streamed else 'm'}"
    child_env = {**env, "WELORE_CACHE_DIR": str(cache), "WELORE_STREAM_ABOVE_GB": "0" if streamed else "1e9",
                 **(extra_env or {})}
    r = run_child([sys.executable, "-m", "welore_core.cli", "compress", str(model), "--err", "0.3",
                   "--calibration", "none", "--out", str(out), "--overwrite", "--json"], child_env, timeout=timeout, nice=nice)
    if r["rc"] != 0 and not r["timed_out"]:
        raise RuntimeError(f"compress {model} failed:\n{r['stderr']}")
    cache_bytes = sum(f.stat().st_size for f in (cache / "svd").glob("*.safetensors")) if (cache / "svd").is_dir() else 0
    report = json.loads(r["stdout"].strip().splitlines()[-1]) if r["rc"] == 0 else None
    return {**r, "report": report, "cache_bytes": cache_bytes, "cache": cache, "out": out}


def journal_layers(out: Path) -> tuple[int, int]:
    """(layers whose spectra the journal holds, shards written) of a stopped streamed run."""
    try:
        state = json.loads((out.with_name(f".{out.name}.partial") / "progress.json").read_text())
    except (OSError, json.JSONDecodeError):
        return 0, 0
    return len(state.get("extra", {}).get("spectra", {})), len(state.get("written", {}))


def depth_rows(work: Path, depths: list[int], shape: str, env: dict, baseline: float) -> tuple[list, dict]:
    rows, peaks = [], {}
    for depth in depths:
        model = write_synthetic(work / f"{shape}-{depth}", layers=depth, **SHAPES[shape])
        size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        for streamed in ((True, False) if depth in (min(depths), max(depths)) else (True,)):
            r = compress_row(model, work, streamed, env, nice=10)
            peaks[(depth, streamed)] = r["peak_rss_mb"] - baseline
            rep = r["report"]
            rows.append([depth, "streamed" if streamed else "in memory (baseline)", f"{size / GB:.2f}",
                         f"{r['peak_rss_mb']:.0f}", f"{r['peak_rss_mb'] - baseline:.0f}", f"{r['seconds']:.1f}",
                         f"{r['seconds'] / depth:.2f}", f"{r['cache_bytes'] / 1e6:.0f}", f"{rep['err_achieved']:.3f}"])
            print(rows[-1], flush=True)
            shutil.rmtree(r["out"], ignore_errors=True)
            shutil.rmtree(r["cache"], ignore_errors=True)
        shutil.rmtree(model, ignore_errors=True)
    return rows, peaks


def big_rows(work: Path, env: dict, baseline: float, seconds: float, layers: int) -> list:
    """The 8B-shaped row(s). With --work, an existing complete model there is reused, and a run
    stopped at its budget keeps its journal and cache, so the next invocation continues it."""
    rows = []
    free = shutil.disk_usage(work).free
    need = layers * 0.47 * GB + 2.2 * GB
    model = work / f"llama3-8b-{layers}"
    if not (model / "config.json").is_file() and free < 2.5 * need:
        return [[f"8B-shaped, {layers} layers", "skipped", f"needs {need / GB:.1f} GB, {free / GB:.1f} GB free"]
                + [""] * 6]
    if not (model / "config.json").is_file():
        write_synthetic(model, layers=layers, **SHAPES["llama3-8b"])
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    cache = work / "cache-8b"  # no cap (a user's default): the leading factors are cached if half the free disk holds them
    runs = [compress_row(model, work, True, env, timeout=seconds, nice=10, cache=cache)]
    for r in runs:
        done, shards = journal_layers(r["out"]) if r["timed_out"] else (layers, None)
        what = "complete" if not r["timed_out"] else (f"stopped at {seconds:.0f} s: spectra of {done}/{layers} layers"
                                                       + (f", {shards} shards" if shards else ""))
        rows.append([f"8B-shaped, {layers} layers", what, f"{size / GB:.1f}", f"{r['peak_rss_mb']:.0f}",
                     f"{r['peak_rss_mb'] - baseline:.0f}", f"{r['seconds']:.0f}",
                     f"{r['seconds'] / max(done, 1):.0f}", f"{r['cache_bytes'] / 1e6:.0f}",
                     f"{r['report']['err_achieved']:.3f}" if r["report"] else "-"])
        print(rows[-1], flush=True)
        if not r["timed_out"]:
            shutil.rmtree(r["out"], ignore_errors=True)
            shutil.rmtree(cache, ignore_errors=True)
    return rows


def render(saved: dict) -> str:
    body = []
    d = saved.get("depth")
    if d:
        shape = SHAPES[d["shape"]]
        peaks = {(int(k.split(":")[0]), k.endswith("s")): v for k, v in d["peaks"].items()}
        depths = sorted({k[0] for k in peaks})
        lo, hi = min(depths), max(depths)
        growth_s = peaks[(hi, True)] / peaks[(lo, True)]
        growth_m = peaks[(hi, False)] / peaks[(lo, False)]
        heads = ["layers", "path", "source GB (bf16)", "peak RSS MB", "above import MB", "seconds", "s / layer",
                 "cache MB", "ERR"]
        body += [f"Machine: {d['machine']}. `welore compress --err 0.3` (data-free WeLore, min_ratio 0.5), cold "
                 f"spectrum cache, child processes niced; import baseline {d['baseline']:.0f} MB (a child importing "
                 "the same modules).", "",
                 f"### Depth: synthetic Llama, hidden {shape['hidden']}, intermediate {shape['intermediate']}, "
                 f"GQA {shape['heads']}/{shape['kv_heads']}, vocab {shape.get('vocab', 49152):,} (bf16 shards)", "",
                 table(heads, d["rows"]), "",
                 f"Peak RSS growth above the import baseline, {hi} vs {lo} layers: streamed **{growth_s:.2f}x** "
                 f"(goal <= 1.2x: {'met' if growth_s <= 1.2 else 'NOT met'}), in memory {growth_m:.2f}x."]
    b = saved.get("big")
    if b:
        body += ["", "### Llama-3-8B-shaped (hidden 4096, intermediate 14336, GQA 32/8, vocab 128,256; bf16 shards, "
                 f"32 GB in float32), streamed, spectrum cache uncapped (the default: it holds the leading factors when "
                 "half the free disk does, so each matrix is decomposed once)", "",
                 f"Machine: {b['machine']}; import baseline {b['baseline']:.0f} MB.", "",
                 table(["model", "run", "source GB", "peak RSS MB", "above import MB", "seconds", "s / layer",
                        "cache MB", "ERR"], b["rows"]), "",
                 "Goal: peak RSS <= 6 GB on this 24 GB machine — "
                 + ("met." if all(float(r[3]) <= 6000 for r in b["rows"] if r[3]) else "NOT met.")
                 + " The run includes the quality check (dense and compressed perplexity, both streamed). A run "
                 "stopped at its budget keeps its journal; the next one skips every layer whose spectra it holds "
                 "and every shard written."]
    return "## Scale: layer-streamed compression\n\n" + "\n".join(body)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", default="4,8,16,32", help="comma-separated depths, or none (keep the saved rows)")
    ap.add_argument("--shape", default="bench", choices=sorted(SHAPES))
    ap.add_argument("--big", action="store_true", help="also the Llama-3-8B-shaped checkpoint")
    ap.add_argument("--big-layers", type=int, default=32)
    ap.add_argument("--big-seconds", type=float, default=1200.0, help="time budget of the 8B-shaped run")
    ap.add_argument("--work", default=None, help="directory for the synthetic checkpoints (default: a temp dir; "
                    "give one to reuse the 8B-shaped model and continue a stopped run)")
    ap.add_argument("--results", type=Path, default=RESULTS_FILE,
                    help="the parts measured so far (the section is rendered from all of them)")
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="welore-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    saved = json.loads(args.results.read_text()) if args.results.is_file() else {}

    def save(part: str, value: dict) -> None:
        saved[part] = value
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(saved, indent=1))

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    baseline = import_baseline(env) if args.depths != "none" or args.big else None
    if args.depths != "none":
        depths = [int(d) for d in args.depths.split(",")]
        rows, peaks = depth_rows(work, depths, args.shape, env, baseline)
        save("depth", {"machine": machine(), "baseline": baseline, "shape": args.shape, "rows": rows,
                       "peaks": {f"{k[0]}:{'s' if k[1] else 'm'}": v for k, v in peaks.items()}})
    if args.big:
        save("big", {"machine": machine(), "baseline": baseline,
                     "rows": big_rows(work, env, baseline, args.big_seconds, args.big_layers)})
    body = render(saved)
    write_section(SECTION, body)
    print(body)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
