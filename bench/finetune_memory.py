"""Fine-tuning memory with frozen weights in fp32 vs bf16: WeLore-COFT on the compressed
SmolLM2 (ERR 0.5), a few steps per row, each row in its own process, all in one run. Writes
the `finetune-memory` section of BENCHMARKS.md.

  python -m bench.finetune_memory [--steps 5] [--threads 2]

Rows: fp32 frozen weights with fp32 compute (the CPU default, the baseline), fp32 frozen with
bf16 autocast (what bf16 frozen weights compute with: the ratio at equal compute), and bf16
frozen (`--frozen-dtype bf16`). Training state bytes are exact (weights by dtype, gradients,
AdamW state, from metrics.json); peak memory is the resident set during training (VmHWM reset
when training starts) and over the whole process (loading in fp32 included).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.finetune import ensure_compressed, env, loadavg
from bench.report import machine, table, write_section

ROWS = {  # name → (precision, frozen dtype)
    "fp32 frozen, fp32 compute": ("fp32", "fp32"),
    "fp32 frozen, bf16 autocast": ("bf16", "fp32"),
    "bf16 frozen, bf16 autocast": ("bf16", "bf16"),
}
BASELINE = "fp32 frozen, fp32 compute"
SAME_COMPUTE = "fp32 frozen, bf16 autocast"


def row_cmd(args, compressed: str, name: str, out: Path) -> list[str]:
    precision, frozen = ROWS[name]
    cmd = [sys.executable, "-m", "welore_core.cli", "finetune", compressed, "--data", args.data,
           "--precision", precision, "--frozen-dtype", frozen, "--steps", str(args.steps), "--lr", str(args.lr),
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--val-sequences", str(args.val_sequences), "--seed", "0", "--device", "cpu",
           "--out", str(out), "--overwrite", "--json"]
    return cmd


def run_rows(args, compressed: str, work: Path) -> dict:
    """Each row in its own process: one after another, or all at once with --parallel (peak memory
    is per process either way; tokens/s is then not comparable between rows)."""
    started, done = {}, {}
    for i, name in enumerate(ROWS):
        print(f"[{time.strftime('%H:%M:%S')}] {name} (load {loadavg()})", file=sys.stderr, flush=True)
        cmd = row_cmd(args, compressed, name, work / f"memory-{i}")
        started[name] = (cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                               env=env(args)))
        if not args.parallel:
            done[name] = started[name][1].communicate()
    rows = {}
    for name, (cmd, proc) in started.items():
        out, err = done[name] if name in done else proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"row failed: {' '.join(cmd)}\n{err[-3000:]}")
        rows[name] = json.loads(out.strip().splitlines()[-1])
    return rows


def _mb(n: float) -> float:
    return round(n / 2**20, 1)


def _x(a, b) -> str:
    return f"{a / b:.2f}×" if a and b else "-"


def render(ctx: dict) -> str:
    a, res = ctx["args"], ctx["rows"]
    base, same = res[BASELINE], res[SAME_COMPUTE]
    headers = ["frozen weights, compute", "fp32 weights MB", "bf16 weights MB", "trainable params", "gradients MB",
               "AdamW state MB", "training state MB", "× baseline", "× fp32 frozen (bf16 autocast)",
               "peak RSS training MB", "× baseline", "× fp32 frozen (bf16 autocast)", "peak RSS process MB",
               "tokens/s", "× baseline", f"loss step 1 → {a['steps']}", "val ppl after"]
    rows = []
    for name, r in res.items():
        m = r["memory"]
        w = m["weight_bytes_by_dtype"]
        state, peak = m["training_state_bytes"], m["peak_mb"]
        c = r["loss_curve"]
        rows.append([name, _mb(w.get("float32", 0)), _mb(w.get("bfloat16", 0)), f"{m['trainable_params'] / 1e6:.2f}M",
                     _mb(m["grad_bytes"]), _mb(m["optimizer_state_bytes"]), _mb(state),
                     _x(state, base["memory"]["training_state_bytes"]), _x(state, same["memory"]["training_state_bytes"]),
                     round(peak), _x(peak, base["memory"]["peak_mb"]), _x(peak, same["memory"]["peak_mb"]),
                     round(r["peak_rss_mb"]) if r.get("peak_rss_mb") else "-", round(r["tokens_per_s"], 1) if r["tokens_per_s"] else "-",
                     _x(r["tokens_per_s"], base["tokens_per_s"]), f"{c[0][1]:.3f} → {c[-1][1]:.3f}",
                     f"{r['val_perplexity_after']:.4g}"])
    return "\n".join([
        "## Fine-tuning memory: frozen weights in fp32 vs bf16 (WeLore-COFT)", "",
        f"`python -m bench.finetune_memory --steps {a['steps']} --threads {a['threads']}` — {ctx['machine']}; "
        f"load average {ctx['load_start']} → {ctx['load_end']}; {ctx['minutes']:.1f} min. SmolLM2-135M compressed "
        f"at ERR {a['err']} (min_ratio {a['min_ratio']}), {a['data']}, batch {a['batch_size']} × {a['seq_len']} "
        f"tokens, {a['steps']} steps per row, lr {a['lr']}, each row in its own process, "
        f"{'all at once' if a.get('parallel') else 'one after another'}.", "",
        table(headers, rows), "",
        "Training state = every parameter as held (by dtype) + gradients + AdamW state, exact bytes from the "
        "run's metrics.json. Peak RSS training = the resident set's peak while training (reset when training "
        "starts: weights, activations, gradients, optimizer, allocator slack); peak RSS process = the whole "
        "process, loading in fp32 and writing the fp32 checkpoint included. Tokens/s on a shared 2-core CPU "
        "from a few steps is indicative only." + (f" {ctx['note']}" if ctx.get("note") else ""),
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--compressed", help="an existing WeLore checkpoint of --model (else compressed here)")
    ap.add_argument("--err", type=float, default=0.5)
    ap.add_argument("--min-ratio", type=float, default=0.5)
    ap.add_argument("--data", default="boolq-passages")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--val-sequences", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per row (OMP_NUM_THREADS)")
    ap.add_argument("--workdir", default="/tmp/welore-bench-finetune")
    ap.add_argument("--parallel", action="store_true", help="run the rows at once (memory only; tokens/s skewed)")
    ap.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    ap.add_argument("--from-results", help="re-render the section from the memory-results.json of an earlier run")
    args = ap.parse_args()
    if args.from_results:
        return publish(args, json.loads(Path(args.from_results).read_text()))

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0, load_start = time.time(), loadavg()
    compressed = ensure_compressed(args, sys.stderr)
    rows = run_rows(args, compressed, work)
    note = ("The rows ran at the same time (--parallel): tokens/s is not comparable between them." if args.parallel
            else "")
    ctx = {"args": vars(args), "rows": rows, "note": note, "load_start": load_start, "load_end": loadavg(),
           "minutes": (time.time() - t0) / 60, "machine": machine()}
    (work / "memory-results.json").write_text(json.dumps(ctx, default=str))
    publish(args, ctx)


def publish(args, ctx: dict) -> None:
    body = render(ctx)
    print(body)
    if not args.no_write:
        write_section("finetune-memory", body)


if __name__ == "__main__":
    main()
