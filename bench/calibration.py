"""Calibration-aware WeLore on SmolLM2-135M: perplexity on text held out from calibration,
seconds and peak memory, for ERR 0.1 (min_ratio 0), 0.3 and 0.5 (min_ratio 0.5) ×
{plain, whitened with weight ranks, whitened with activation ranks, scaled}; then the levers
(calibration tokens, sequential mode, damping) and ERR 0.5 whitened + WeLore-COFT.

Data (written once under the cache directory, from ../shared/data):
  calibration      BoolQ dev passages, first half (Wikipedia)       → also the COFT training text
  held-out BoolQ   BoolQ dev passages, second half (same domain, unseen)
  other domain     CommonsenseQA dev: question, lettered choices and answer, one item a line
  mixed            the calibration passages interleaved with SVAMP and coin-flip items (no CommonsenseQA)
  csqa_train       CommonsenseQA train, formatted like the dev items (COFT text of the eighth study)
  task_mixed       the calibration passages, each followed by two CommonsenseQA train items

Each configuration runs in its own process (clean peak RSS / GPU memory); results are
appended to BENCHMARKS.md (section "calibration") as they come. Usage:
    python bench/calibration.py [--samples 32] [--windows 8] [--coft-steps 150] [--skip-levers]
    python bench/calibration.py --sequential-study [--samples 16] [--windows 4]
    python bench/calibration.py --mixed-study [--windows 16] [--coft-batch 4] [--coft-lr 2e-4]
    python bench/calibration.py --generated-study [--windows 16] [--gen-sequences 512] [--gen-tokens 512]
    python bench/calibration.py --sink-study [--windows 16] [--coft-batch 4] [--coft-lr 2e-4]
    python bench/calibration.py --compensate-study [--windows 16]
    python bench/calibration.py --compensated-coft-study [--windows 16] [--coft-batch 64] [--coft-lr 2e-4]
    python bench/calibration.py --task-coft-study [--windows 16] [--coft-batch 8] [--coft-lr 2e-4]
`--sequential-study` runs the second round of levers (sequential mode at every ERR, 64
calibration windows, damping), then WeLore-COFT from its best ERR 0.5 compression, into its
own section ("calibration-sequential") so the main table above stays as measured.
The studies' rows are listed in bench/calibration_studies.py. `--mixed-study` runs the third
round: calibration text mixing domains (BoolQ passages interleaved with SVAMP and coin-flip
items) against BoolQ alone, and WeLore-COFT distilled from the dense model (`teacher=`)
against plain COFT (section "calibration-mixed").
`--generated-study` runs the fourth round (meant for a GPU; float32 weights): text sampled from
the dense model itself as calibration text and as distillation text for COFT, larger COFT
batches and rates (section "calibration-generated").
`--sink-study` runs the fifth round: the first token of every calibration window (the attention
sink) weighted in the Gram matrices (`sink_weight`), at every ERR (section "calibration-sink").
`--compensate-study` runs the sixth round: `compensate` (o_proj / down_proj fitted to the dense
blocks' outputs in the sequential pass) against the best rows so far (section "calibration-compensated").
`--compensated-coft-study` runs the seventh round (meant for a GPU): distilled WeLore-COFT at batch 64 and
128 from the compensated ERR 0.5 start (section "calibration-compensated-coft").
`--task-coft-study` runs the eighth round: the same start, distilled WeLore-COFT on text of the evaluated
task (CommonsenseQA train items; the dev items evaluated are unseen), as WeLore fine-tunes per task, and
on the calibration passages interleaved with those items (section "calibration-task-coft"; ~14 min a COFT
row on a fast 2-core CPU).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import machine, table, write_section  # noqa: E402

MODEL = "smollm2-135m"
MAIN = [(0.1, 0.0), (0.3, 0.5), (0.5, 0.5)]
VARIANTS = {  # label → compress_model keyword arguments
    "plain": {},
    "whitened, weight ranks": {"factorization": "whitened", "rank_from": "weights"},
    "whitened, activation ranks": {"factorization": "whitened", "rank_from": "activations"},
    "scaled (α 0.5)": {"factorization": "scaled", "rank_from": "weights"},
}
GOALS = {0.1: 1.05, 0.3: 2.0, 0.5: 15.0}


def data_files() -> dict[str, Path]:
    from welore_core.corpus import iter_jsonl, resolve_data
    from welore_core.settings import get_core_settings

    d = Path(get_core_settings().cache_dir) / "bench-calibration"
    d.mkdir(parents=True, exist_ok=True)
    files = {"calib": d / "boolq_calib.jsonl", "boolq": d / "boolq_heldout.jsonl", "csqa": d / "csqa_dev.jsonl",
             "mixed": d / "mixed_calib.jsonl", "csqa_train": d / "csqa_train.jsonl",
             "task_mixed": d / "task_mixed.jsonl"}
    if not all(f.is_file() for f in files.values()):
        passages = []
        for _, obj in iter_jsonl(resolve_data("boolq")):
            if obj["passage"] not in passages:
                passages.append(obj["passage"])
        half = len(passages) // 2
        for f, part in ((files["calib"], passages[:half]), (files["boolq"], passages[half:])):
            f.write_text("".join(json.dumps({"text": p}) + "\n" for p in part))
        csqa = {name: [csqa_text(obj) for _, obj in iter_jsonl(resolve_data(name))]
                for name in ("commonsenseqa-dev", "commonsenseqa")}
        mixed = mixed_texts(passages[:half])
        task_mixed = [t for i, p in enumerate(passages[:half]) for t in (p, *csqa["commonsenseqa"][2 * i:2 * i + 2])]
        for key, texts in (("csqa", csqa["commonsenseqa-dev"]), ("csqa_train", csqa["commonsenseqa"]),
                           ("mixed", mixed), ("task_mixed", task_mixed)):
            files[key].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return files


def csqa_text(obj: dict) -> str:
    """One CommonsenseQA item as text: question, lettered choices and the answer."""
    q = obj["question"]
    choices = " ".join(f"({c['label']}) {c['text']}" for c in q["choices"])
    answer = next((c["text"] for c in q["choices"] if c["label"] == obj.get("answerKey")), "")
    return f"Question: {q['stem']} Choices: {choices} Answer: {answer}"


def mixed_texts(passages: list[str]) -> list[str]:
    """Calibration text of several domains, interleaved so that any number of leading windows
    holds all of them: each BoolQ passage (Wikipedia) is followed by two SVAMP math word problems
    and one coin-flip puzzle, with their answers, until those run out. CommonsenseQA, the
    other-domain evaluation text, is not in it."""
    from welore_core.settings import get_core_settings

    data = Path(get_core_settings().data_dir)
    svamp = [f"{o['Body']} {o['Question']} Answer: {o['Answer']:g}"
             for o in json.loads((data / "svamp" / "SVAMP.json").read_text())]
    coins = [f"{o['question']} Answer: {o['answer']}"
             for o in json.loads((data / "coin_flip" / "coin_flip.json").read_text())["examples"]]
    out = []
    for i, p in enumerate(passages):
        out += [p, *svamp[2 * i:2 * i + 2], *coins[i:i + 1]]
    return out


def write_generated(path: Path, sequences: int, tokens: int, batch: int, seed: int = 0) -> dict:
    """Text sampled from the dense model itself (each sequence starts from a random vocabulary
    token, then plain sampling at temperature 1): general text in the model's own distribution,
    of no evaluation corpus. One JSON line {"text": ...} a sequence."""
    import torch

    from welore_core.loading import load_model

    loaded = load_model(MODEL)
    model, tok = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    texts, n_tokens, t0 = [], 0, time.perf_counter()
    for start in range(0, sequences, batch):
        first = torch.randint(0, len(tok), (min(batch, sequences - start), 1), generator=g).to(device)
        with torch.no_grad():
            out = model.generate(first, attention_mask=torch.ones_like(first), do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, max_new_tokens=tokens, pad_token_id=tok.eos_token_id)
        for row in out:
            n_tokens += int((row != tok.eos_token_id).sum())
            texts.append(tok.decode(row, skip_special_tokens=True))
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return {"label": "generated", "sequences": len(texts), "tokens": n_tokens,
            "seconds": time.perf_counter() - t0}


def report_steps(label: str, every: int = 10):
    """A ProgressFn printing every `every`-th COFT step to stderr (run_child echoes it as it comes)."""
    def report(event) -> None:
        if event.stage == "train" and (event.done % every == 0 or event.done == event.total):
            m = event.metrics
            print(f"[{label}] step {event.done}/{event.total}: loss {m['loss']:.4f}, "
                  f"{m['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)
    return report


def child(cfg: dict) -> dict:
    """One configuration: load, (compress), (fine-tune), evaluate on both held-out corpora."""
    import torch

    from welore_core.calibration import load_calibration
    from welore_core.compress import compress_model
    from welore_core.corpus import read_texts
    from welore_core.evaluate import perplexity
    from welore_core.loading import load_model

    if cfg.get("generate"):
        return write_generated(Path(cfg["files"]["generated"]), **cfg["generate"])
    files = {k: Path(v) for k, v in cfg["files"].items()}
    text = files[cfg.get("calib_text", "calib")]  # calibration text
    coft_text = files[cfg.get("coft_text", cfg.get("calib_text", "calib"))]  # COFT text: the same unless set
    dtype = getattr(torch, cfg["dtype"]) if cfg.get("dtype") else None  # None: the device's default
    loaded = load_model(MODEL, dtype=dtype)
    model, tok = loaded.model, loaded.tokenizer
    out = {"label": cfg["label"]}
    t0 = time.perf_counter()
    if cfg.get("err") is not None:
        kw = dict(cfg.get("kw", {}))
        if kw.get("factorization"):
            kw["calibration"] = load_calibration(tok, str(text), cfg["samples"], cfg["seq_len"])
        report = compress_model(model, err=cfg["err"], min_ratio=cfg["min_ratio"], **kw)
        out.update(err=report.err_achieved, params_kept=report.params_kept_achieved, n_lrc=report.n_lrc,
                   calibration=report.calibration)
        if cfg.get("coft_steps"):
            from welore_core.checkpoint import save_checkpoint
            from welore_core.finetune.pipeline import finetune_checkpoint

            ckpt = Path(cfg["workdir"]) / "coft-src"
            save_checkpoint(model, tok, ckpt, {"kind": "compressed", **report.to_dict()}, overwrite=True)
            out["compress_seconds"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            ft = finetune_checkpoint(str(ckpt), Path(cfg["workdir"]) / "coft-out", data=str(coft_text),
                                     method="welore", steps=cfg["coft_steps"], batch_size=cfg["coft_batch"],
                                     seq_len=cfg["coft_seq_len"], val_sequences=8, overwrite=True,
                                     progress=report_steps(cfg["label"]), **cfg.get("coft_options", {}))
            out["coft_seconds"] = time.perf_counter() - t1
            out["coft"] = {"tokens_per_s": ft["tokens_per_s"], "train_seconds": ft["throughput"]["train_seconds"],
                           "final_loss": ft["loss_curve"][-1][1]}
            model = load_model(str(Path(cfg["workdir"]) / "coft-out"), dtype=dtype).model
    out.setdefault("compress_seconds", time.perf_counter() - t0)
    for name in ("csqa", "boolq"):
        r = perplexity(model, tok, read_texts(str(files[name])), cfg["eval_seq_len"], cfg["windows"])
        out[f"ppl_{name}"] = r.perplexity
        out[f"tokens_{name}"] = r.tokens
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["machine"] = machine()
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def run_child(cfg: dict) -> dict:
    """Run one configuration in its own process; its step reports are echoed as they come."""
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout:
        p = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(cfg)], stdout=stdout,
                             stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
        err = collections.deque(maxlen=200)  # the tail, for a failure's message
        for line in p.stderr:
            err.append(line)
            if line.startswith(f"[{cfg['label']}] step "):
                print(line, end="", file=sys.stderr, flush=True)
        p.wait()
        stdout.seek(0)
        out = stdout.read()
    if p.returncode != 0:
        tail = "".join(err).strip()
        print(tail[-3000:], file=sys.stderr)
        return {"label": cfg["label"], "failed": tail.splitlines()[-1] if tail else "failed"}
    r = json.loads(out.strip().splitlines()[-1])
    r["wall_seconds"] = time.perf_counter() - t
    return r


def fmt_row(r: dict, dense: dict, err=None, mr=None) -> list:
    if "failed" in r:
        return [err if err is not None else "-", mr if mr is not None else "-", r["label"], "failed: " + r["failed"][:80],
                "", "", "", "", "", "", ""]
    mem = r.get("peak_gpu_mb") or r["peak_rss_mb"]
    return [err if err is not None else "-", mr if mr is not None else "-", r["label"],
            f"{r['err']:.3f}" if "err" in r else "-", f"{r['params_kept']:.3f}" if "params_kept" in r else "1",
            f"{r['ppl_csqa']:,.2f}", f"{r['ppl_csqa'] / dense['ppl_csqa']:,.3f}×",
            f"{r['ppl_boolq']:,.2f}", f"{r['ppl_boolq'] / dense['ppl_boolq']:,.3f}×",
            f"{r['compress_seconds']:.0f}" + (f" ({r['calibration']['factorized']} new)" if r.get("calibration") else ""),
            f"{mem:,.0f}"]


HEADERS = ["ERR", "min_ratio", "variant", "ERR achieved", "params kept", "ppl other-domain (CSQA)", "× dense",
           "ppl held-out BoolQ", "× dense", "compress s", "peak MB"]


def render(args, main_rows, lever_rows, coft_rows, notes) -> str:
    body = [
        "## Calibration-aware WeLore (whitened / scaled factorisation under WeLore ranks)",
        "",
        f"`python bench/calibration.py` — {machine()}. SmolLM2-135M ({MODEL}), float32. Calibration: the "
        f"first {args.samples} windows × {args.seq_len} tokens of the first half of the BoolQ dev passages "
        f"(Wikipedia). Perplexity on {args.windows} windows × {args.eval_seq_len} tokens (fewer than the "
        "standard 24, to fit this shared 2-core CPU) of text held out from calibration: "
        "**other domain** = CommonsenseQA dev questions with their lettered choices and answer; "
        "**held-out BoolQ** = the second half of the BoolQ passages. `compress s` = spectra (cached), "
        "calibration and factorisation; calibrated SVDs are cached like plain ones (key: weights, "
        "model, calibration tokens, dtype, factorisation), so `(n new)` counts the W·S SVDs computed by "
        "that row — rows that reuse cached ones are faster than a cold run; peak MB = the process's peak RSS "
        "(model load + compression + evaluation; GPU: peak allocated).",
        "",
        table(HEADERS, main_rows),
    ]
    if lever_rows:
        body += ["", "### Levers at fixed ranks", "", table(HEADERS, lever_rows)]
    if coft_rows:
        body += ["", "### Then WeLore-COFT (only the LRC factors trained)", "", table(HEADERS, coft_rows)]
    if notes:
        body += ["", "\n\n".join(notes)]
    return "\n".join(body)


MEMORY_NOTE = (
    "How statistics are gathered: the calibration windows' hidden states at the input of one "
    "decoder layer are kept (N×L×hidden: 16×512×576 float32 = 19 MB here) and the model is run one "
    "layer at a time; hooks on the layer's target linears accumulate one float64 Gram matrix per "
    "distinct input (q/k/v share one, gate/up share one: 3×576² + 1536² doubles = 27 MB per layer "
    "here, vs. 0.8 GB for all 30 layers at once). The layer's W·S SVDs are computed, its "
    "statistics dropped, and its outputs become the next layer's inputs, so the whole calibration "
    "costs one forward pass plus the Gram products, and `sequential` costs one more layer forward "
    "per layer. The peak-memory column is dominated by the model and the evaluation, not by "
    "calibration.")


def render_saved(args, workdir: Path) -> int:
    results = json.loads((workdir / "results.json").read_text())
    dense = results["dense"]
    main_rows = [fmt_row(dense, dense)]
    for err, mr in MAIN:
        for label in VARIANTS:
            if f"{err}/{label}" in results:
                main_rows.append(fmt_row(results[f"{err}/{label}"], dense, err, mr))
    lever_rows = [fmt_row(r, dense, float(k.split("/")[1]), 0.5) for k, r in results.items() if k.startswith("lever/")]
    coft_rows, notes = [], []
    if "coft" in results:
        src = results["coft"]["label"].split(" + ")[0]
        coft_rows = [fmt_row(results[f"0.5/{src}"], dense, 0.5, 0.5), fmt_row(results["coft"], dense, 0.5, 0.5)]
    notes.append(MEMORY_NOTE)
    for err, goal in GOALS.items():
        ratios = [results[f"{err}/{l}"].get("ppl_csqa", float("inf")) / dense["ppl_csqa"] for l in VARIANTS
                  if f"{err}/{l}" in results]
        if ratios:
            levers = [r.get("ppl_csqa", float("inf")) / dense["ppl_csqa"] for k, r in results.items()
                      if k.startswith(f"lever/{err}/")]
            best = min(ratios + levers)
            notes.append(f"Goal ERR {err}: ≤ {goal}× dense on held-out other-domain text — best here "
                         f"{best:.3f}× ({'met' if best <= goal else 'not met'}).")
    extra = workdir / "notes.md"
    if extra.is_file():
        notes.append(extra.read_text().strip())
    write_section("calibration", render(args, main_rows, lever_rows, coft_rows, notes))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--coft-steps", type=int, default=150)
    ap.add_argument("--coft-batch", type=int, default=2)
    ap.add_argument("--coft-seq-len", type=int, default=256)
    ap.add_argument("--skip-levers", action="store_true")
    ap.add_argument("--skip-coft", action="store_true")
    from bench.calibration_studies import STUDIES  # (imports this module: load it after the definitions)

    for name, spec in STUDIES.items():
        ap.add_argument(spec["flag"], action="store_true", help=f"{spec['title']} (section {name})")
    ap.add_argument("--gen-sequences", type=int, default=0, help="--generated-study: sequences to sample")
    ap.add_argument("--gen-tokens", type=int, default=0, help="--generated-study: tokens per sequence")
    ap.add_argument("--resume-study", action="store_true",
                    help="the studies (--sequential-study etc.): reuse the rows of the last run with the same settings")
    ap.add_argument("--coft-lr", type=float, default=5e-4, help="studies: COFT peak learning rate")
    ap.add_argument("--coft-precision", default="bf16", help="studies: COFT precision (fp32|bf16)")
    ap.add_argument("--render-only", action="store_true",
                    help="re-render BENCHMARKS.md from the last run's results.json (run with the same flags)")
    args = ap.parse_args()
    if args.child:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import warnings

        warnings.filterwarnings("ignore")
        print(json.dumps(child(json.loads(args.child)), default=str))
        return 0

    files = {k: str(v) for k, v in data_files().items()}
    workdir = Path(files["calib"]).parent
    base = {"files": files, "samples": args.samples, "seq_len": args.seq_len, "windows": args.windows,
            "eval_seq_len": args.eval_seq_len, "workdir": str(workdir)}
    results: dict = {}
    main_rows, lever_rows, coft_rows, notes = [], [], [], []
    if args.render_only:
        return render_saved(args, workdir)
    study = next((name for name, spec in STUDIES.items() if getattr(args, spec["flag"][2:].replace("-", "_"))),
                 None)
    if study:
        from bench.calibration_studies import run_study

        return run_study(args, base, study)

    def save():
        write_section("calibration", render(args, main_rows, lever_rows, coft_rows, notes))
        (workdir / "results.json").write_text(json.dumps(results, indent=2, default=str))

    dense = run_child({**base, "label": "dense"})
    results["dense"] = dense
    print("dense", dense, flush=True)
    main_rows.append(fmt_row(dense, dense))
    for err, mr in MAIN:
        for label, kw in VARIANTS.items():
            r = run_child({**base, "label": label, "err": err, "min_ratio": mr, "kw": kw})
            results[f"{err}/{label}"] = r
            print(err, label, r, flush=True)
            main_rows.append(fmt_row(r, dense, err, mr))
            save()

    def best_whitened(err):
        cands = [(results[f"{err}/{l}"].get("ppl_csqa", float("inf")), l) for l in VARIANTS if "whitened" in l]
        return min(cands)[1]

    if not args.skip_coft:
        label = best_whitened(0.5)
        r = run_child({**base, "label": f"{label} + {args.coft_steps} COFT steps", "err": 0.5, "min_ratio": 0.5,
                       "kw": VARIANTS[label], "coft_steps": args.coft_steps, "coft_batch": args.coft_batch,
                       "coft_seq_len": args.coft_seq_len})
        results["coft"] = r
        print("coft", r, flush=True)
        coft_rows.append(fmt_row(results[f"0.5/{label}"], dense, 0.5, 0.5))
        coft_rows.append(fmt_row(r, dense, 0.5, 0.5))
        notes.append(f"COFT: {args.coft_steps} steps × {args.coft_batch} sequences × {args.coft_seq_len} tokens "
                     "of the calibration text (BoolQ passages, first half), `finetune_checkpoint(method=\"welore\")` "
                     f"defaults otherwise; fine-tuning took {r.get('coft_seconds', float('nan')):.0f} s.")
        save()

    if not args.skip_levers:
        levers = [
            (0.5, f"whitened, weight ranks, {max(args.samples // 4, 1)} samples", {"factorization": "whitened"},
             {"samples": max(args.samples // 4, 1)}),
            (0.5, f"whitened, weight ranks, {args.samples * 3} samples", {"factorization": "whitened"},
             {"samples": args.samples * 3}),
            (0.5, "whitened, weight ranks, sequential", {"factorization": "whitened", "sequential": True}, {}),
            (0.5, "whitened, activation ranks, sequential",
             {"factorization": "whitened", "rank_from": "activations", "sequential": True}, {}),
            (0.3, "whitened, weight ranks, damp 1e-4", {"factorization": "whitened", "damp": 1e-4}, {}),
            (0.5, "whitened, weight ranks, damp 1e-4", {"factorization": "whitened", "damp": 1e-4}, {}),
        ]
        for err, label, kw, extra in levers:
            r = run_child({**base, **extra, "label": label, "err": err, "min_ratio": 0.5, "kw": kw})
            results[f"lever/{err}/{label}"] = r
            print("lever", err, label, r, flush=True)
            lever_rows.append(fmt_row(r, dense, err, 0.5))
            save()

    for err, goal in GOALS.items():
        ratios = [results[f"{err}/{l}"].get("ppl_csqa", float("inf")) / dense["ppl_csqa"] for l in VARIANTS]
        notes.append(f"Goal ERR {err}: ≤ {goal}× dense on held-out text — best here {min(ratios):.3f}× "
                     f"({'met' if min(ratios) <= goal else 'not met'}).")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
