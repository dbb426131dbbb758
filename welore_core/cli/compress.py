"""`welore compress MODEL (--err F | --params-kept F) --out DIR`: WeLore or uniform compression,
data-free (plain SVD) or calibrated (`--calibration DATA`: whitened or scaled factorisation)."""

from __future__ import annotations

import argparse

from .common import (add_device_flag, add_json_flag, check_outputs, emit, fraction, peak_rss_mb, positive_int,
                     progress_for)


def register(sub) -> None:
    p = sub.add_parser("compress", help="compress a model with WeLore (or the uniform baseline)")
    p.add_argument("model", help="registry name (smollm2-135m), .gguf file or model directory")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--err", type=fraction, help="effective rank reduction to reach (fraction of ranks removed)")
    target.add_argument("--params-kept", type=fraction, help="fraction of target-matrix parameters to keep")
    p.add_argument("--method", choices=["welore", "uniform"], default="welore")
    p.add_argument("--min-ratio", type=fraction, default=0.5,
                   help="a matrix is a Low-Rank Component when it drops more than this fraction of ranks (default 0.5)")
    cal = p.add_argument_group("calibration (activation-aware factorisation under WeLore's ranks)")
    cal.add_argument("--calibration", metavar="DATA",
                     help="calibration text: a .txt/.jsonl file or a built-in name (boolq, commonsenseqa, ...)")
    cal.add_argument("--calib-samples", type=positive_int, default=None,
                     help="calibration windows (default 64; the first N of DATA)")
    cal.add_argument("--calib-seq-len", type=positive_int, default=None,
                     help="tokens per calibration window (default 512)")
    cal.add_argument("--factorization", choices=["plain", "whitened", "scaled"], default=None,
                     help="plain SVD of W (data-free; the default without --calibration), whitened "
                          "(SVD of W·S, S·Sᵀ = XᵀX; the default with --calibration) or scaled (ASVD)")
    cal.add_argument("--rank-from", choices=["weights", "activations"], default="weights",
                     help="apply WeLore's tau to the spectra of W (the paper; default) or of W·S")
    cal.add_argument("--sequential", action="store_true",
                     help="gather layer L's statistics with layers 0..L-1 already compressed")
    cal.add_argument("--compensate", action="store_true",
                     help="with --sequential: fit each layer's o_proj and down_proj to the dense block's "
                          "outputs, absorbing what the layer's other compressed matrices lose")
    cal.add_argument("--alpha", type=float, default=None, help="scaled: exponent of mean|x| (default 0.5)")
    cal.add_argument("--damp", type=float, default=None,
                     help="whitened: Cholesky damping, fraction of the Gram's mean diagonal (default 0.01)")
    cal.add_argument("--sink-weight", type=float, default=None, metavar="W",
                     help="count the first token of every calibration window W times in the statistics "
                          "(the attention sink: its value reaches every later token; default 1)")
    p.add_argument("--out", required=True, help="directory for the compressed checkpoint")
    p.add_argument("--merged-out", help="also write a dense (merged) export loadable by plain transformers")
    p.add_argument("--overwrite", action="store_true", help="replace --out / --merged-out if they exist")
    add_device_flag(p)
    add_json_flag(p)
    p.set_defaults(func=run)


def human_report(r: dict) -> str:
    lines = [f"{'matrix':<16}{'shape':>11}{'rank':>6}{'kept':>6}{'reduce':>8}  {'label':<6}{'storage':<8}{'rel_err':>8}"]
    for m in r["matrices"]:
        lines.append(f"{m['name']:<16}{'x'.join(map(str, m['shape'])):>11}{m['rank']:>6}{m['kept_rank']:>6}"
                     f"{m['reduction']:>8.3f}  {m['label']:<6}{m['storage']:<8}{m['rel_error']:>8.4f}")
    tau = f"{r['tau']:.4f}" if r["tau"] is not None else "-"
    lines += [
        "",
        f"method {r['method']}  tau {tau}  min_ratio {r['min_ratio']}  factorization "
        f"{r.get('factorization', 'plain')}  ranks from {r.get('rank_from', 'weights')}",
        *calibration_lines(r.get("calibration")),
        f"ERR requested {r['err_requested']}  achieved {r['err_achieved']:.4f}",
        f"target-matrix parameters kept {r['params_kept_achieved']:.4f} "
        f"({r['target_params_after']:,} of {r['target_params_before']:,})",
        f"model parameters {r['params_before']:,} -> {r['params_after']:,}",
        f"LRC {r['n_lrc']}  N-LRC {r['n_nlrc']}  decomposed now {r['decomposed']}",
        f"written to {r['out']}" + (f" (merged export: {r['merged_out']})" if r["merged_out"] else ""),
        f"{r['seconds']:.1f} s (compression {r['compress_seconds']:.1f} s), peak RSS {r['peak_rss_mb']:.0f} MB",
    ]
    return "\n".join(lines)


def calibration_lines(c: dict | None) -> list[str]:
    if not c:
        return []
    mode = ("  sequential" if c["sequential"] else "") + ("  compensated" if c.get("compensate") else "")
    sink = f"  sink weight {c['sink_weight']:g}" if c.get("sink_weight", 1) != 1 else ""
    lines = [f"calibration {c['data']} ({c['samples']} x {c['seq_len']} tokens, sha256 {c['data_hash'][:12]})"
             f"{mode}{sink}  matrices factorised now {c['factorized']}, "
             f"layer forwards {c['layer_forwards']}, {c['seconds']:.1f} s"]
    if c.get("fallbacks"):
        lines.append("whitening fallbacks: " + ", ".join(f"{k}: {v}" for k, v in c["fallbacks"].items()))
    return lines


def run(args: argparse.Namespace) -> int:
    from ..pipelines import compress_checkpoint

    check_outputs(args, "out", "merged_out")
    with progress_for(args) as bar:
        result = compress_checkpoint(args.model, args.out, err=args.err, params_kept=args.params_kept,
                                     method=args.method, min_ratio=args.min_ratio, merged_out=args.merged_out,
                                     overwrite=args.overwrite, device=args.device, progress=bar,
                                     calibration=args.calibration, calib_samples=args.calib_samples,
                                     calib_seq_len=args.calib_seq_len, factorization=args.factorization,
                                     rank_from=args.rank_from, sequential=args.sequential, alpha=args.alpha,
                                     damp=args.damp, sink_weight=args.sink_weight, compensate=args.compensate)
    result["peak_rss_mb"] = peak_rss_mb()
    emit(result, args.json, human_report(result))
    return 0
