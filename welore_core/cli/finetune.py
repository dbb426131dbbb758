"""`welore finetune MODEL --data FILE|boolq|commonsenseqa --method welore|full|lora --out DIR`:
WeLore-COFT (train only the low-rank factors) or the full / LoRA baselines. `--nproc N` (or
`torchrun --nproc-per-node N -m welore_core.cli finetune …`) trains data-parallel in N processes.

The training flags are generated from finetune.config.OPTIONS (one flag per FinetuneConfig field)."""

from __future__ import annotations

import argparse
import os
import sys

from ..finetune.config import OPTIONS, FinetuneConfig
from .common import add_device_flag, add_json_flag, add_option_flag, emit, given_options, peak_rss_mb, positive_int, progress_for


def register(sub) -> None:
    from ..corpus import builtin_names

    p = sub.add_parser("finetune", help="fine-tune a model: WeLore-COFT (low-rank factors only), full or LoRA",
                       description="Fine-tune MODEL (registry name, model directory or WeLore checkpoint). "
                       "--method welore trains only the factors of the Low-Rank Components of a compressed "
                       "checkpoint; full trains everything; lora trains peft LoRA adapters on a dense model.")
    p.add_argument("model", help="registry name (smollm2-135m), model directory or WeLore checkpoint")
    p.add_argument("--data", required=True, help="a .jsonl (text, or prompt+completion) or .txt file, or a built-in "
                   f"name ({', '.join(builtin_names())}): boolq-passages is BoolQ's passages as plain text, general "
                   "the text shipped with welore (what --recover distils on)")
    p.add_argument("--out", required=True, help="directory for the fine-tuned checkpoint and metrics.json")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out (same settings)")
    train = p.add_argument_group("fine-tuning options (finetune.config.OPTIONS)")
    for o in OPTIONS.values():
        add_option_flag(train, o, **({"metavar": "MODEL"} if o.name == "teacher" else {}))
    p.add_argument("--nproc", type=positive_int, default=1,
                   help="train data-parallel in N processes on this machine (starts torchrun; gloo on CPU, "
                        "nccl with one GPU per process); each takes its share of every batch (default 1)")
    p.add_argument("--merged-out", metavar="DIR",
                   help="also write a dense (merged) export of the result, loadable by plain transformers")
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

    config = config_from_args(args)  # refused here, before torchrun starts any process
    if distributed.launched_by_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if args.nproc not in (1, world):
            raise InvalidArgument(f"--nproc {args.nproc} differs from the {world} processes torchrun started; "
                                  "drop --nproc when launching with torchrun")
    elif args.nproc > 1:
        return distributed.launch(args.nproc, list(args.argv))
    main, device = distributed.init_from_env(args.device)
    try:
        return _train(args, config, device, main)
    finally:
        distributed.shutdown()


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    return FinetuneConfig.from_options(given_options(args, OPTIONS))


def _train(args: argparse.Namespace, config: FinetuneConfig, device: str | None, main: bool) -> int:
    from ..finetune import finetune_checkpoint
    from ..progress import TqdmProgress

    with progress_for(args) if main else TqdmProgress(enabled=False) as bar:
        result = finetune_checkpoint(args.model, args.out, data=args.data, resume=args.resume,
                                     overwrite=args.overwrite, device=device, progress=bar,
                                     merged_out=args.merged_out, **config.to_dict())
    if not main:
        return 0
    result["peak_rss_mb"] = peak_rss_mb()
    if result.get("already_complete"):
        print(f"the run in {args.out} is already complete; nothing to do", file=sys.stderr)
    emit(result, args.json, human_report(result))
    return 0
