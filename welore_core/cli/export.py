"""`welore export CKPT --merged-out DIR [--out DIR] [--dtype D]`: a compressed or fine-tuned
checkpoint as a dense model for plain transformers (and/or the factorised one in another dtype)."""

from __future__ import annotations

import argparse

from .common import add_dtype_flag, add_json_flag, check_outputs, emit


def register(sub) -> None:
    p = sub.add_parser("export", help="merge a compressed or fine-tuned checkpoint into dense weights",
                       description="Write CKPT (a WeLore checkpoint) as a dense model (W = B*A for every "
                       "low-rank matrix) that plain transformers loads with no code, and/or re-write the "
                       "factorised checkpoint in another dtype.")
    p.add_argument("checkpoint", metavar="CKPT", help="a WeLore checkpoint directory (welore compress/finetune --out)")
    p.add_argument("--merged-out", metavar="DIR", help="directory for the dense (merged) export")
    p.add_argument("--out", metavar="DIR", help="directory for the factorised checkpoint, re-written in --dtype")
    add_dtype_flag(p, "the exported weights (auto: the checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="replace --merged-out / --out if they exist")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import export_checkpoint
    from ..settings import get_core_settings

    check_outputs(args, "merged_out", "out")
    result = export_checkpoint(args.checkpoint, merged_out=args.merged_out, out=args.out, dtype=args.dtype,
                               overwrite=args.overwrite, cache_dir=get_core_settings().cache_dir)
    written = [f"merged export {result['merged_out']}" if result["merged_out"] else "",
               f"factorised checkpoint {result['out']}" if result["out"] else ""]
    emit(result, args.json, f"wrote {' and '.join(w for w in written if w)} ({result['dtype']} weights) "
                            f"from {result['checkpoint']} ({result['factored']} low-rank matrices)")
    return 0
