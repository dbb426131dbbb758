"""`welore compress MODEL (--err F | --params-kept F | --recipe FILE) --out DIR`: calibrated WeLore
compression by default, data-free with `--calibration none`; `--recover STEPS` fine-tunes after.

The recipe flags are generated from compression.config.OPTIONS (one flag per CompressConfig field; welore_core/options.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..compression.config import OPTIONS, RECOVER_TEXT, CompressConfig
from ..errors import InvalidArgument
from .common import (add_device_flag, add_json_flag, add_option_flag, check_outputs, emit, given_options, peak_rss_mb,
                     positive_int, progress_for)


def add_recipe_flags(p: argparse.ArgumentParser) -> None:
    """One flag per OPTIONS entry; every default stays None so the config's own default applies."""
    target = p.add_mutually_exclusive_group()
    cal = p.add_argument_group("calibration (activation-aware factorisation; on by default)")
    for o in OPTIONS.values():
        group = target if o.target else cal if o.path[0] in ("calibration", "experimental") else p
        add_option_flag(group, o, **({"metavar": "DATA"} if o.name == "calibration" else {}))
    p.add_argument("--recipe", metavar="FILE", help="a recipe JSON file, or a checkpoint's welore.json, to "
                        "reproduce; flags given as well override it")


def register(sub) -> None:
    p = sub.add_parser("compress", help="compress a model with WeLore (calibrated by default)",
                       description="Compress MODEL to a low-rank checkpoint. Give a target (--err or --params-kept) "
                       "or a --recipe. By default the factorisation is calibrated on text shipped with welore and "
                       "ranks go where they cost the model's loss least; --calibration none gives the "
                       "paper's data-free WeLore.")
    p.add_argument("model", help="registry name (smollm2-135m), .gguf file or model directory")
    add_recipe_flags(p)
    p.add_argument("--recover", type=positive_int, default=None, metavar="STEPS",
                   help=f"then fine-tune the low-rank factors for STEPS steps, distilled from MODEL ({RECOVER_TEXT})")
    p.add_argument("--recover-data", metavar="DATA", help="text for --recover (default: the shipped general text)")
    p.add_argument("--out", required=True, help="directory for the compressed checkpoint")
    p.add_argument("--merged-out", help="also write a dense (merged) export loadable by plain transformers")
    p.add_argument("--overwrite", action="store_true", help="replace --out / --merged-out if they exist")
    add_device_flag(p)
    add_json_flag(p)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> CompressConfig:
    """The recipe: --recipe FILE (or a checkpoint's welore.json) as the base, then the flags given."""
    flags = given_options(args, OPTIONS)
    if not args.recipe:
        if "err" not in flags and "params_kept" not in flags:
            raise InvalidArgument("give a target: --err F (fraction of ranks removed), --params-kept F (fraction "
                                  "of target-matrix parameters kept) or --recipe FILE")
        return CompressConfig.from_options(flags)
    path = Path(args.recipe)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"cannot read the recipe {path}: {exc}; expected a JSON recipe or a "
                              "checkpoint's welore.json") from exc
    if isinstance(data, dict) and "format_version" in data:  # a checkpoint's welore.json
        if not isinstance(data.get("recipe"), dict):
            raise InvalidArgument(f"{path} records no recipe (written by an older welore); pass the flags instead")
        data = data["recipe"]
    base = CompressConfig.from_dict(data).to_options()
    if "err" in flags or "params_kept" in flags:  # a target given on the command line replaces the recipe's
        base.pop("err"), base.pop("params_kept")
    if str(flags.get("calibration", "")).lower() == "none":  # so do the recipe's calibration settings
        base = {k: v for k, v in base.items() if OPTIONS[k].path[0] != "calibration"}
    return CompressConfig.from_options({**base, **flags})


def human_report(r: dict) -> str:
    lines = [f"{'matrix':<16}{'shape':>11}{'rank':>6}{'kept':>6}{'reduce':>8}  {'label':<6}{'storage':<8}{'rel_err':>8}"]
    for m in r["matrices"]:
        lines.append(f"{m['name']:<16}{'x'.join(map(str, m['shape'])):>11}{m['rank']:>6}{m['kept_rank']:>6}"
                     f"{m['reduction']:>8.3f}  {m['label']:<6}{m['storage']:<8}{m['rel_error']:>8.4f}")
    tau = f"  tau {r['tau']:.4f}" if r["tau"] is not None else ""
    lines += [
        "",
        f"method {r['method']}{tau}  min_ratio {r['min_ratio']}  factorization {r.get('factorization', 'plain')}",
        *calibration_lines(r.get("calibration")),
        f"ERR requested {r['err_requested']}  achieved {r['err_achieved']:.4f}",
        f"target-matrix parameters kept {r['params_kept_achieved']:.4f} "
        f"({r['target_params_after']:,} of {r['target_params_before']:,})",
        f"model parameters {r['params_before']:,} -> {r['params_after']:,}",
        f"LRC {r['n_lrc']}  N-LRC {r['n_nlrc']}  decomposed now {r['decomposed']}",
        *quality_lines(r.get("quality")),
        *streamed_lines(r),
        f"written to {r['out']}" + (f" (merged export: {r['merged_out']})" if r["merged_out"] else ""),
        f"{r['seconds']:.1f} s (compression {r['compress_seconds']:.1f} s), peak RSS {r['peak_rss_mb']:.0f} MB",
    ]
    return "\n".join(lines)


def streamed_lines(r: dict) -> list[str]:
    """Streamed (a model above WELORE_STREAM_ABOVE_GB): the memory plan and the spectrum cache's use."""
    if not r.get("streamed"):
        return []
    plan, cache = r["memory_plan"], r["cache"]
    done = r.get("resumed_layers")
    resumed = f", layers {done[0]}-{done[-1]} kept from an interrupted run" if done else ""
    return [f"streamed layer by layer ({plan['layers']} layers{resumed}): estimated peak "
            f"{plan['estimated_peak_bytes'] / 1e9:.2f} GB; spectrum cache {cache['hits']} hits, {cache['misses']} misses, "
            f"{cache['bytes_written'] / 1e6:.0f} MB written ({plan['cache_mode']})"]


def quality_lines(q: dict | None) -> list[str]:
    if not q:
        return []
    before = (f" (before recovery {q['perplexity_before_recovery']:.4g})"
              if q.get("perplexity_before_recovery") is not None else "")
    return [f"quality: perplexity {q['perplexity']:.4g}{before} vs dense {q['perplexity_dense']:.4g} = "
            f"{q['ratio']:.2f}x on {q['tokens']} held-out tokens"]


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
    import sys

    from ..compression.pipeline import compress_checkpoint

    check_outputs(args, "out", "merged_out")
    config = config_from_args(args)
    with progress_for(args) as bar:
        result = compress_checkpoint(args.model, args.out, config, merged_out=args.merged_out,
                                     overwrite=args.overwrite, recover=args.recover or 0,
                                     recover_data=args.recover_data, device=args.device, progress=bar)
    result["peak_rss_mb"] = peak_rss_mb()
    if result.get("warning"):
        print(f"warning: {result['warning']}", file=sys.stderr)
    emit(result, args.json, human_report(result))
    return 0
