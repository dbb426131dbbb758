"""`welore eval MODEL --data FILE`: perplexity on fixed non-overlapping windows.

The window flags are generated from evaluate_config.OPTIONS (one flag per EvaluateConfig field)."""

from __future__ import annotations

import argparse

from ..evaluate_config import OPTIONS, EvaluateConfig
from .common import add_device_flag, add_json_flag, add_option_flag, emit, given_options, progress_for


def register(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a model (dense or compressed) on a corpus")
    p.add_argument("model", help="registry name, .gguf file, model directory or WeLore checkpoint")
    p.add_argument("--data", required=True, help=".txt or .jsonl (text/passage field) file, or a built-in name")
    for o in OPTIONS.values():
        add_option_flag(p, o)
    add_device_flag(p)
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluate import EvalResult
    from ..pipelines import evaluate_model

    config = EvaluateConfig.from_options(given_options(args, OPTIONS))
    with progress_for(args) as bar:
        out = evaluate_model(args.model, args.data, **config.to_dict(), device=args.device, progress=bar)
    result = EvalResult(**{k: out[k] for k in EvalResult.__dataclass_fields__})
    emit(out, args.json, f"perplexity {result.perplexity:.4g} over {result.tokens} tokens "
         f"({result.windows} windows of {result.seq_len}) in {result.seconds:.1f} s")
    return 0
