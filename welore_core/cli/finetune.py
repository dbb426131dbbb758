"""`welore finetune MODEL --data FILE|boolq|commonsenseqa --method welore|full|lora --out DIR`:
WeLore-COFT (train only the low-rank factors) or the full / LoRA baselines. `--nproc N` (or
`torchrun --nproc-per-node N -m welore_core.cli finetune …`) trains data-parallel in N processes."""

from __future__ import annotations

import argparse
import os
import sys

from .common import (add_device_flag, add_dtype_flag, add_json_flag, emit, fraction, peak_rss_mb,
                     positive_int, progress_for)


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def register(sub) -> None:
    from ..finetune.config import DATA_FORMATS, FROZEN_DTYPES, METHODS, PRECISIONS
    from ..corpus import builtin_names

    p = sub.add_parser("finetune", help="fine-tune a model: WeLore-COFT (low-rank factors only), full or LoRA",
                       description="Fine-tune MODEL (registry name, model directory or WeLore checkpoint). "
                       "--method welore trains only the factors of the Low-Rank Components of a compressed "
                       "checkpoint; full trains everything; lora trains peft LoRA adapters on a dense model.")
    p.add_argument("model", help="registry name (smollm2-135m), model directory or WeLore checkpoint")
    p.add_argument("--data", required=True, help="a .jsonl (text, or prompt+completion) or .txt file, or a built-in "
                   f"name ({', '.join(builtin_names())}): boolq-passages is BoolQ's passages as plain text, general "
                   "the text shipped with welore (what --recover distils on)")
    p.add_argument("--data-format", choices=DATA_FORMATS, default="auto",
                   help="how to read --data (default: detected from the first JSONL object)")
    p.add_argument("--method", choices=METHODS, default="welore")
    p.add_argument("--out", required=True, help="directory for the fine-tuned checkpoint and metrics.json")
    p.add_argument("--steps", type=positive_int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--lr", type=_positive_float, default=2e-4, help="peak learning rate (default 2e-4)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="sequences per micro-batch (default 4)")
    p.add_argument("--seq-len", type=positive_int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per step (default 1)")
    p.add_argument("--warmup-steps", type=int, default=-1, help="linear warm-up steps (default: 6%% of --steps)")
    p.add_argument("--min-lr-ratio", type=fraction, default=0.1, help="cosine floor as a fraction of --lr (default 0.1)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off; default 1.0)")
    p.add_argument("--eval-every", type=_nonneg_int, default=0, help="validate every N steps (0: before/after only)")
    p.add_argument("--save-every", type=_nonneg_int, default=0, help="write a resumable checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out (same settings)")
    p.add_argument("--freeze-norms", action="store_true", help="welore: freeze the norm weights as well")
    p.add_argument("--lora-rank", type=positive_int, default=8)
    p.add_argument("--lora-alpha", type=_positive_float, default=16.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=fraction, default=0.1,
                   help="share of documents/examples held out for validation (default 0.1)")
    p.add_argument("--val-sequences", type=positive_int, default=32, help="held-out sequences scored (default 32)")
    p.add_argument("--choice-examples", type=_nonneg_int, default=100,
                   help="held-out multiple-choice items scored for accuracy (BoolQ/CommonsenseQA; default 100)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations to save memory")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 autocast on GPU, fp32 on CPU; bf16: autocast on either (fp32 weights and "
                        "optimizer state; ~2x faster on CPUs with AVX-512 BF16)")
    p.add_argument("--frozen-dtype", choices=FROZEN_DTYPES, default="auto",
                   help="dtype the frozen weights (N-LRCs, embeddings, LM head, frozen norms) are held in while "
                        "training; trainable factors keep fp32 master weights, gradients and AdamW state. auto: "
                        "bf16 on a GPU (unless --precision fp32), fp32 on a CPU. bf16 computes under bf16 autocast")
    p.add_argument("--nproc", type=positive_int, default=1,
                   help="train data-parallel in N processes on this machine (starts torchrun; gloo on CPU, "
                        "nccl with one GPU per process); each takes its share of every batch (default 1)")
    p.add_argument("--teacher", default="", metavar="MODEL",
                   help="distil from MODEL (registry name or directory; same tokenizer), e.g. the model the "
                        "checkpoint was compressed from: the loss matches its next-token distribution")
    p.add_argument("--distill-weight", type=fraction, default=1.0,
                   help="with --teacher: loss = (1-w)*cross-entropy + w*KL(teacher||model) (default 1.0)")
    p.add_argument("--merged-out", metavar="DIR",
                   help="also write a dense (merged) export of the result, loadable by plain transformers")
    add_dtype_flag(p)
    p.add_argument("--overwrite", action="store_true", help="replace --out / --merged-out if they exist")
    add_device_flag(p)
    add_json_flag(p)
    p.set_defaults(func=run)


def _fmt(v, spec=".4g"):
    return "-" if v is None else format(v, spec)


def human_report(r: dict) -> str:
    pr, th, mem, val = r["params"], r["throughput"], r["memory"], r["val"]
    lines = [
        f"method {r['method']}  steps {r['steps']}  data {r['data']['spec']} ({r['data']['format']}, "
        f"{r['data']['train_sequences']} train / {r['data']['val_sequences']} held-out sequences)",
        f"trainable parameters {pr['trainable']:,} of {pr['total']:,} ({pr['trainable_pct']:.1f}%)",
        f"throughput {_fmt(th['tokens_per_s'], '.1f')} tokens/s, {_fmt(th['step_seconds'], '.3f')} s/step "
        f"({th['timed_steps']} timed steps)",
        f"peak memory {mem['peak_mb']:.0f} MB ({mem['kind']}; +{mem['peak_growth_mb']:.0f} MB during training); "
        f"trainable {mem.get('trainable_param_bytes', 0) / 2**20:.1f} MB, gradients "
        f"{mem.get('grad_bytes', 0) / 2**20:.1f} MB, optimizer state {mem.get('optimizer_state_bytes', 0) / 2**20:.1f} MB",
        "weights held " + ", ".join(f"{k} {v / 2**20:.1f} MB" for k, v in mem.get("weight_bytes_by_dtype", {}).items())
        + f"; training state {mem.get('training_state_bytes', 0) / 2**20:.1f} MB in all",
        f"held-out loss {val['before']['loss']:.4f} -> {val['after']['loss']:.4f}, perplexity "
        f"{val['before']['perplexity']:.4g} -> {val['after']['perplexity']:.4g}",
    ]
    if r.get("accuracy"):
        a = r["accuracy"]
        lines.append(f"accuracy {a['before']['accuracy']:.3f} -> {a['after']['accuracy']:.3f} "
                     f"({a['after']['examples']} held-out items)")
    if r.get("loss_curve"):
        c = r["loss_curve"]
        lines.append(f"training loss {c[0][1]:.4f} (step {c[0][0]}) -> {c[-1][1]:.4f} (step {c[-1][0]})")
    if r.get("distributed"):
        d = r["distributed"]
        lines.append(f"data-parallel over {d['world_size']} processes ({d['backend']}; rows per process "
                     f"{d['rank_batch_sizes']})")
    merged = f" (merged export: {r['merged_out']})" if r.get("merged_out") else ""
    lines.append(f"written to {r['out']}{merged}, {r.get('dtype', 'fp32')} weights ({r['seconds']:.1f} s)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..errors import InvalidArgument
    from ..finetune import distributed

    if distributed.launched_by_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if args.nproc not in (1, world):
            raise InvalidArgument(f"--nproc {args.nproc} differs from the {world} processes torchrun started; "
                                  "drop --nproc when launching with torchrun")
    elif args.nproc > 1:
        return distributed.launch(args.nproc, list(args.argv))
    main, device = distributed.init_from_env(args.device)
    try:
        return _train(args, device, main)
    finally:
        distributed.shutdown()


def _train(args: argparse.Namespace, device: str | None, main: bool) -> int:
    from ..finetune import finetune_checkpoint
    from ..progress import TqdmProgress

    with progress_for(args) if main else TqdmProgress(enabled=False) as bar:
        result = finetune_checkpoint(
            args.model, args.out, data=args.data, method=args.method, steps=args.steps, lr=args.lr,
            batch_size=args.batch_size, seq_len=args.seq_len, grad_accum=args.grad_accum,
            eval_every=args.eval_every, save_every=args.save_every, resume=args.resume,
            freeze_norms=args.freeze_norms, lora_rank=args.lora_rank, seed=args.seed,
            val_fraction=args.val_fraction, val_sequences=args.val_sequences, data_format=args.data_format,
            overwrite=args.overwrite, device=device, progress=bar, warmup_steps=args.warmup_steps,
            min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
            lora_alpha=args.lora_alpha, choice_examples=args.choice_examples,
            gradient_checkpointing=args.gradient_checkpointing, precision=args.precision,
            teacher=args.teacher, distill_weight=args.distill_weight, frozen_dtype=args.frozen_dtype,
            dtype=args.dtype, merged_out=args.merged_out)
    if not main:
        return 0
    result["peak_rss_mb"] = peak_rss_mb()
    if result.get("already_complete"):
        print(f"the run in {args.out} is already complete; nothing to do", file=sys.stderr)
    emit(result, args.json, human_report(result))
    return 0
