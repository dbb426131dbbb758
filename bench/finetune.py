"""Fine-tuning benchmark: dense full FT, compressed full FT, WeLore-COFT and LoRA on the same
data, sequence length and batch, all rows in one run, one after another, each in its own
process (so its peak memory is its own). Writes the `finetune` section of BENCHMARKS.md.

  python -m bench.finetune [--steps 150] [--threads 2] [--lr 5e-4] [--eval-every 10]

Rows run in fp32 (the CPU default) and, for dense full FT and COFT, also with
`--precision bf16` (bf16 autocast: matrix products in bf16, fp32 master weights, gradients
and AdamW state), so each ratio can be read at equal precision and against the fp32 baseline.
Same steps: every row trains --steps steps (validation every --eval-every steps, time left
out of training time). Same wall time: each row's held-out perplexity at the last validation
inside T = the training time of --same-time-of's --steps steps (read from its curve, so on
its own --steps cosine schedule). Then a few steps with --gradient-checkpointing for memory,
and a one-step profile per row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.report import machine, table, write_section

ROWS = {  # name → (model key, method, precision)
    "dense full FT": ("dense", "full", "fp32"),
    "compressed full FT": ("compressed", "full", "fp32"),
    "WeLore-COFT": ("compressed", "welore", "fp32"),
    "LoRA (dense)": ("dense", "lora", "fp32"),
    "dense full FT (bf16)": ("dense", "full", "bf16"),
    "WeLore-COFT (bf16)": ("compressed", "welore", "bf16"),
}
BASELINE = "dense full FT"
GC_ROWS = ("dense full FT", "WeLore-COFT", "dense full FT (bf16)", "WeLore-COFT (bf16)")


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def finetune_cmd(args, model: str, method: str, precision: str, steps: int, out: Path,
                 extra: list[str] = ()) -> list[str]:
    return [sys.executable, "-m", "welore_core.cli", "finetune", model, "--data", args.data, "--method", method,
            "--precision", precision, "--steps", str(steps), "--lr", str(args.lr),
            "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
            "--val-sequences", str(args.val_sequences), "--lora-rank", str(args.lora_rank), "--seed", "0",
            "--out", str(out), "--overwrite", "--json", *extra]


def env(args) -> dict:
    e = dict(os.environ)
    e["OMP_NUM_THREADS"] = str(args.threads)
    e["MKL_NUM_THREADS"] = str(args.threads)
    e.setdefault("TOKENIZERS_PARALLELISM", "false")
    return e


def run_row(args, models: dict, name: str, steps: int, out: Path, log, extra: list[str] = ()) -> dict:
    key, method, precision = ROWS[name]
    cmd = finetune_cmd(args, models[key], method, precision, steps, out, list(extra))
    print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd[3:])}  (load {loadavg()})", file=log, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(args))
    if proc.returncode != 0:
        raise SystemExit(f"row failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"    -> {r['tokens_per_s'] or 0:.1f} tok/s, ppl {r['val_perplexity_before']:.4g} -> "
          f"{r['val_perplexity_after']:.4g}, peak {r['memory']['peak_mb']:.0f} MB", file=log, flush=True)
    return r


def ensure_compressed(args, log) -> str:
    if args.compressed:
        return args.compressed
    out = Path(args.workdir) / f"compressed-err{args.err}-mr{args.min_ratio}"
    if not (out / "welore.json").is_file():
        print(f"compressing {args.model} at ERR {args.err}, min_ratio {args.min_ratio} → {out}", file=log, flush=True)
        subprocess.run([sys.executable, "-m", "welore_core.cli", "compress", args.model, "--err", str(args.err),
                        "--min-ratio", str(args.min_ratio), "--out", str(out), "--overwrite"],
                       check=True, capture_output=True, env=env(args))
    return str(out)


def flop_model(compressed: str) -> dict:
    """Matmul FLOPs per training token per (model key, method) (attention score/value products
    left out) from the checkpoint's shapes: forward 2·Σ(weights in matmuls); backward
    input-gradients as much again; weight-gradients 2·(trainable weights in matmuls)."""
    meta = json.loads((Path(compressed) / "welore.json").read_text())
    cfg = json.loads((Path(compressed) / "config.json").read_text())
    dense = comp = lrc = 0
    for m in meta["matrices"]:
        rows, cols = m["shape"]
        dense += rows * cols
        if m["storage"] == "factors":
            k = m["kept_rank"]
            comp += k * (rows + cols)
            lrc += k * (rows + cols)
        else:
            comp += rows * cols
    head = cfg["vocab_size"] * cfg["hidden_size"]
    f = lambda fwd, wgrad: 2 * fwd + 2 * fwd + 2 * wgrad
    return {"dense/full": f(dense + head, dense + head), "compressed/full": f(comp + head, comp + head),
            "compressed/welore": f(comp + head, lrc), "dense/lora": f(dense + head, 0)}


def predicted(flops: dict, name: str) -> float:
    return flops["/".join(ROWS[BASELINE][:2])] / flops["/".join(ROWS[name][:2])]


def profile_steps(args, models: dict, names: list[str]) -> dict:
    """Where one training step's time goes, per row (torch.profiler, CPU, in this process)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from welore_core.finetune.config import FinetuneConfig
    from welore_core.finetune.data import BatchStream, build_dataset
    from welore_core.finetune.methods import apply_method, base_causal_lm
    from welore_core.finetune.trainer import Trainer
    from welore_core.loading import load_model

    torch.set_num_threads(args.threads)
    out = {}
    for n in names:
        key, method, precision = ROWS[n]
        loaded = load_model(models[key], device="cpu", dtype=torch.float32)
        cfg = FinetuneConfig(method=method, steps=100, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                             lora_rank=args.lora_rank, precision=precision)
        ds = build_dataset(loaded.tokenizer, args.data, seq_len=args.seq_len, val_fraction=0.1, val_sequences=1,
                           choice_examples=0)
        model = apply_method(loaded.model, cfg)
        tr = Trainer(model, base_causal_lm(model), cfg, BatchStream(ds.train, args.batch_size, 0, 0),
                     torch.device("cpu"), val=[], pad_id=0)
        tr.train_step()  # warm-up: optimizer state allocated
        tr.state.step += 1
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            tr.train_step()
            total = time.perf_counter() - t0
        ev = prof.key_averages()
        self_s = lambda pred: sum(e.self_cpu_time_total for e in ev if pred(e.key)) / 1e6
        opt = sum(e.cpu_time_total for e in ev if e.key.startswith("Optimizer.step")) / 1e6
        mm = self_s(lambda k: k in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"))
        attn = self_s(lambda k: "scaled_dot_product" in k or "flash_attention" in k)
        cast = self_s(lambda k: k in ("aten::copy_", "aten::_to_copy"))
        out[n] = {"step_s": total, "matmul_s": mm, "attention_s": attn, "optimizer_s": opt, "cast_copy_s": cast,
                  "other_s": max(0.0, total - mm - attn - opt - cast)}
        print(f"profile {n}: " + ", ".join(f"{k} {v:.2f}" for k, v in out[n].items()), file=sys.stderr, flush=True)
        del tr, model, loaded
    return out


def at_time(r: dict, budget: float) -> tuple[int, float, float]:
    """(steps done, their training seconds, held-out perplexity) at the last validation inside
    `budget` training seconds: the row's final result if it finished within it."""
    total = r["throughput"]["train_seconds"]
    if total <= budget:
        return r["steps"], total, r["val_perplexity_after"]
    best = (0, 0.0, r["val_perplexity_before"])
    for step, _, ppl, seconds in r["val"]["curve"]:
        if seconds <= budget:
            best = (step, seconds, ppl)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--compressed", help="an existing WeLore checkpoint of --model (else compressed here)")
    ap.add_argument("--err", type=float, default=0.5)
    ap.add_argument("--min-ratio", type=float, default=0.5)
    ap.add_argument("--data", default="boolq-passages")
    ap.add_argument("--steps", type=int, default=150, help="steps of every row (the issue's goal: 150)")
    ap.add_argument("--eval-every", type=int, default=10, help="validation every N steps (same-wall-time reading)")
    ap.add_argument("--same-time-of", default="WeLore-COFT", choices=list(ROWS),
                    help="the row whose training time is the same-wall-time budget")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--val-sequences", type=int, default=16)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per row (OMP_NUM_THREADS)")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of: " + ", ".join(ROWS))
    ap.add_argument("--workdir", default="/tmp/welore-bench-finetune")
    ap.add_argument("--gc-steps", type=int, default=4,
                    help="steps of dense full FT and COFT with gradient checkpointing, for memory (0: skip)")
    ap.add_argument("--from-results", help="re-render the section from the results.json of an earlier run")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-step time profile")
    ap.add_argument("--no-write", action="store_true", help="print the tables, leave BENCHMARKS.md alone")
    args = ap.parse_args()

    if args.from_results:
        publish(args, json.loads(Path(args.from_results).read_text()))
        return
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from: {', '.join(ROWS)}")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    log = sys.stderr
    t_start, load_start = time.time(), loadavg()
    compressed = ensure_compressed(args, log)
    models = {"dense": args.model, "compressed": compressed}

    same_steps = {n: run_row(args, models, n, args.steps, work / f"steps-{i}", log,
                             ["--eval-every", str(args.eval_every)] if args.eval_every else [])
                  for i, n in enumerate(names)}
    gc_memory = {n: run_row(args, models, n, args.gc_steps, work / f"gc-{i}", log, ["--gradient-checkpointing"])
                 for i, n in enumerate(x for x in GC_ROWS if x in names)} if args.gc_steps else {}
    prof = {} if args.no_profile else profile_steps(args, models, names)

    ctx = {"args": vars(args), "same_steps": same_steps, "gc_memory": gc_memory, "profile": prof,
           "flops_per_token": flop_model(compressed),
           "load_start": load_start, "load_end": loadavg(), "minutes": (time.time() - t_start) / 60,
           "machine": machine(), "names": names}
    (work / "results.json").write_text(json.dumps(ctx, default=str))
    publish(args, ctx)


def _mem(r: dict) -> float:
    """Weights + growth of the resident set while training: the CPU analogue of the GPU's
    max_memory_allocated (leaves out the process's libraries and data)."""
    m = r["memory"]
    return m["model_param_bytes"] / 2**20 + m["peak_growth_mb"]


def _ratio(a, b) -> str:
    return f"{a / b:.2f}×" if a and b else "-"


def render(ctx: dict) -> str:
    a = ctx["args"]
    same_steps, prof, names, flops = ctx["same_steps"], ctx["profile"], ctx["names"], ctx["flops_per_token"]
    base = same_steps.get(BASELINE)
    dense_ppl = base["val_perplexity_before"] if base else None
    ref = same_steps.get(a["same_time_of"])
    budget = ref["throughput"]["train_seconds"] if ref else None
    steps = a["steps"]
    headers = ["method", "precision", "trainable params", "tokens/s", "× dense FT (fp32)", "tokens per CPU-s",
               "× dense FT (fp32)", "predicted × (FLOPs)", "peak RSS MB", "weights + growth MB", "× dense FT (fp32)",
               "trainable+grad+Adam MB", "val ppl before", f"val ppl after {steps} steps"]
    if budget:
        headers += [f"steps in {budget:.0f} s", f"val ppl at {budget:.0f} s"]
    rows = []
    for n in names:
        r = same_steps[n]
        p, m, t = r["params"], r["memory"], r["throughput"]
        state_mb = (m["trainable_param_bytes"] + m["grad_bytes"] + m["optimizer_state_bytes"]) / 2**20
        bt = base["throughput"] if base else {}
        row = [n.replace(" (bf16)", ""), ROWS[n][2], f"{p['trainable'] / 1e6:.1f}M / {p['total'] / 1e6:.1f}M "
               f"({p['trainable_pct']:.1f}%)", round(t["tokens_per_s"], 1), _ratio(t["tokens_per_s"], bt.get("tokens_per_s")),
               round(t["tokens_per_cpu_s"], 1), _ratio(t["tokens_per_cpu_s"], bt.get("tokens_per_cpu_s")),
               f"{predicted(flops, n):.2f}×", round(m["peak_mb"]), round(_mem(r)),
               _ratio(_mem(r), _mem(base)) if base else "-", round(state_mb),
               round(r["val_perplexity_before"], 1), round(r["val_perplexity_after"], 1)]
        if budget:
            k, _, ppl = at_time(r, budget)
            row += [k, round(ppl, 1)]
        rows.append(row)
    lines = [
        "## Fine-tuning: WeLore-COFT vs full fine-tuning vs LoRA", "",
        f"`python -m bench.finetune --steps {steps} --threads {a['threads']} --lr {a['lr']} --eval-every "
        f"{a['eval_every']} --val-sequences {a['val_sequences']} --gc-steps {a['gc_steps']}`. {a['model']} "
        f"compressed at ERR {a['err']} with min_ratio {a['min_ratio']}. Data `{a['data']}`"
        + (" (BoolQ passages as plain text: causal LM on every token, packed)" if a["data"] == "boolq-passages" else "")
        + f"; held-out documents chosen by content hash (validation: {a['val_sequences']} sequences of "
        f"{a['seq_len']} tokens). Every row: AdamW lr {a['lr']}, 6% warm-up then cosine to 10%, clipping 1.0, batch "
        f"{a['batch_size']}×{a['seq_len']} tokens, seed 0; LoRA rank {a['lora_rank']} (alpha 16) on "
        f"q,k,v,o,gate,up,down; rows one after another, each in its own process with {a['threads']} torch threads. "
        "bf16 = `--precision bf16`: bf16 autocast, fp32 master weights, gradients and AdamW state.", "",
        f"Machine: {ctx['machine']}. Load average at start {ctx['load_start']}, at end {ctx['load_end']}. "
        f"Total bench time {ctx['minutes']:.0f} min.", "",
        f"Same steps ({steps}) and same wall time ({budget:.0f} s of training = {a['same_time_of']}'s {steps} steps; "
        "each row's perplexity at its last validation inside that time, on its own schedule):" if budget else
        f"Same steps ({steps}):", "",
        table(headers, rows), "",
        "tokens/s excludes each run's first 2 steps and all validation time; tokens per CPU-second is the same "
        "count over process CPU time. Peak RSS: the process's peak resident set while training; weights + growth: "
        "parameter bytes plus the growth of the resident set during training (the CPU analogue of GPU "
        "max_memory_allocated, without the ~0.5 GB of libraries and data every process holds); "
        "trainable+grad+Adam: exact tensor bytes. \"predicted ×\": dense full FT's matmul FLOPs per token over the "
        "row's (forward 2·W, input-gradients 2·W, weight-gradients 2·W_trainable; attention products left out), "
        "the same at either precision.",
    ]
    tps = {n: r["tokens_per_s"] for n, r in same_steps.items()}
    if all(n in tps for n in (BASELINE, "WeLore-COFT", "dense full FT (bf16)", "WeLore-COFT (bf16)")):
        lines += ["", "At equal precision: WeLore-COFT / dense full FT = "
                  f"{_ratio(tps['WeLore-COFT'], tps[BASELINE])} (fp32); WeLore-COFT (bf16) / dense full FT (bf16) = "
                  f"{_ratio(tps['WeLore-COFT (bf16)'], tps['dense full FT (bf16)'])}."]
    if dense_ppl:
        lines += ["", f"Dense model, no training, same held-out windows: perplexity {dense_ppl:.1f}."]
    for n in ("WeLore-COFT", "WeLore-COFT (bf16)"):
        r = same_steps.get(n)
        if r and dense_ppl:
            curve = ", ".join(f"{c[0]}: {c[2]:,.1f}" for c in r["val"]["curve"] if c[0] % 25 == 0)
            lines += ["", f"**{n}**, {r['steps']} steps: held-out perplexity {r['val_perplexity_before']:,.0f} → "
                      f"{r['val_perplexity_after']:.1f} = {r['val_perplexity_after'] / dense_ppl:.2f}× the dense "
                      f"model's {dense_ppl:.1f} (goal ≤ 10×; reference 417 = 20.7×); along the way (step: ppl) {curve}."]
    gm = ctx.get("gc_memory") or {}
    if gm:
        gb = gm.get(BASELINE)
        gh = ["method (gradient checkpointing on)", "precision", "peak RSS MB", "× dense FT (fp32)",
              "weights + growth MB", "× dense FT (fp32)", "tokens/s"]
        gr = [[n.replace(" (bf16)", ""), ROWS[n][2], round(r["memory"]["peak_mb"]),
               _ratio(r["memory"]["peak_mb"], gb["memory"]["peak_mb"]) if gb else "-",
               round(_mem(r)), _ratio(_mem(r), _mem(gb)) if gb else "-",
               round(r["tokens_per_s"], 1) if r["tokens_per_s"] else "-"] for n, r in gm.items()]
        lines += ["", f"Memory with `--gradient-checkpointing` ({a['gc_steps']} steps each; activations recomputed in "
                  "the backward pass, so weights, gradients and optimizer state dominate):", "", table(gh, gr)]
    if prof:
        ph = ["method", "precision", "step s (profiled)", "matmul", "attention", "optimizer (AdamW)", "casts/copies",
              "other"]
        pr = [[n.replace(" (bf16)", ""), ROWS[n][2], round(v["step_s"], 2)] + [
            f"{v[k] / v['step_s']:.0%}" for k in ("matmul_s", "attention_s", "optimizer_s", "cast_copy_s", "other_s")]
            for n, v in prof.items()]
        lines += ["", "Where one step's time goes (torch.profiler, one step after one warm-up step, in the bench "
                  "process, same threads; self time of the ops; other = norms, activations, loss, embedding):", "",
                  table(ph, pr)]
    return "\n".join(lines)


READING = ("How to read these numbers (why 2.5× the tokens/s of dense full fine-tuning is out of reach at equal "
           "precision on this model, what bf16 autocast and gradient checkpointing change, the allocator's share of "
           "the peak): docs/research/finetune-reading.md.")


def publish(args, ctx: dict) -> None:
    body = render(ctx)
    print(body)
    if not args.no_write:
        write_section("finetune", body + "\n\n" + READING)


if __name__ == "__main__":
    main()
