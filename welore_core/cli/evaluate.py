"""`welore eval MODEL --data FILE`: perplexity on fixed non-overlapping windows."""

from __future__ import annotations

import argparse

from ..corpus import read_texts
from ..evaluate import perplexity
from ..loading import load_model
from ..progress import TqdmProgress
from .common import add_device_flag, add_json_flag, emit, positive_int


def register(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a model (dense or compressed) on a corpus")
    p.add_argument("model", help="registry name, .gguf file, model directory or WeLore checkpoint")
    p.add_argument("--data", required=True, help=".txt or .jsonl (text/passage field) file, or a built-in name")
    p.add_argument("--seq-len", type=positive_int, default=512, help="tokens per window (default 512)")
    p.add_argument("--windows", type=positive_int, default=24, help="number of windows (default 24)")
    add_device_flag(p)
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    texts = read_texts(args.data)
    loaded = load_model(args.model, device=args.device)
    bar = TqdmProgress()
    result = perplexity(loaded.model, loaded.tokenizer, texts, args.seq_len, args.windows, progress=bar)
    bar.close()
    out = {"model": args.model, "data": args.data, **result.to_dict()}
    emit(out, args.json, f"perplexity {result.perplexity:.4g} over {result.tokens} tokens "
         f"({result.windows} windows of {result.seq_len}) in {result.seconds:.1f} s")
    return 0
