"""`finetune_checkpoint`: load a model spec → apply the method → train → write a checkpoint
in the compression output's format (welore.json gains a `training` record) plus
metrics.json, and return the result dict (what `welore finetune --json` prints).

Output safety: `out` only ever receives complete directories, swapped in by rename. With
`save_every`, `out` holds the latest resumable checkpoint (a loadable WeLore checkpoint
whose `training.status` is "partial", plus trainer_state.pt); the final one replaces it.
A cancelled or failed run leaves `out` as it was after the last complete save.

Frozen weights may be held in bf16 during training (`frozen_dtype`, precision.py); the
checkpoint is written in the output `dtype` (auto: the source's dtype), trained factors too.
Under torch.distributed (distributed.py) every rank trains, rank 0 alone reports and writes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

from ..dtypes import short_name
from ..hashing import file_sha256
from ..checkpoint import META, save_checkpoint, save_merged
from ..errors import CorruptCheckpoint, InvalidArgument, OutputExists
from ..loading import LoadedModel, load_model, output_dtype, pick_device, read_json
from ..outputs import check_output
from ..progress import ProgressEvent, ProgressFn, StopFn, check_stop, no_progress
from .config import FinetuneConfig
from .data import BatchStream, build_dataset
from .distributed import DataParallel
from .methods import (apply_method, base_causal_lm, count_parameters, finalize, merged_copy, n_lrc,
                      unique_parameters)
from .metrics import MemoryMeter, choice_accuracy, tensor_bytes
from .precision import DTYPES, hold_frozen
from .trainer import Trainer

LOAD_DTYPE = torch.float32  # weights are loaded as fp32 masters (written in the output dtype)
STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.json"
_COPIED_META = {"format_version", "welore_version", "created_at", "factored", "training", "kind",
                "training_history", "files", "dtype"}


def _publish(out: Path, model, tokenizer, meta: dict, extra: dict[str, object], dtype: torch.dtype) -> None:
    """Write checkpoint + extra files into a staging directory, then swap it into `out`."""
    staging = out.with_name(f".{out.name}.ft-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_checkpoint(model, tokenizer, staging, meta, dtype=dtype)
        for name, obj in extra.items():
            if name.endswith(".json"):
                (staging / name).write_text(json.dumps(obj, indent=2, default=str) + "\n")
            else:
                torch.save(obj, staging / name)
            with open(staging / name, "rb") as fh:
                os.fsync(fh.fileno())
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _resume_point(out: Path, cfg: FinetuneConfig, model: str) -> dict | None:
    """What `out` offers to resume from: None (start afresh), {"done": result} or
    {"state": trainer state}. Anything inconsistent raises with a way out."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    if not (out / META).is_file():
        raise OutputExists(f"{out} exists but is not a WeLore checkpoint, so there is nothing to resume; "
                           "choose another --out, or drop --resume and pass --overwrite to replace it")
    meta = read_json(out / META)
    training = meta.get("training")
    if not isinstance(training, dict):
        raise OutputExists(f"{out} holds a checkpoint that no fine-tuning run wrote; choose another --out")
    saved = FinetuneConfig.from_dict(training.get("config", {})).run_key()
    diff = sorted(k for k in set(saved) | set(cfg.run_key()) if saved.get(k) != cfg.run_key().get(k))
    if diff:
        raise InvalidArgument(f"--resume needs the settings of the run in {out}; these differ: "
                              + ", ".join(f"{k} (saved {saved.get(k)!r}, received {cfg.run_key().get(k)!r})"
                                          for k in diff))
    base = training.get("base_model", {}).get("spec")
    if base != str(model):
        raise InvalidArgument(f"--resume: the run in {out} fine-tunes {base!r}; received model {str(model)!r}")
    if training.get("status") == "complete":
        try:
            return {"done": read_json(out / METRICS_FILE)}
        except CorruptCheckpoint:
            return {"done": {"out": str(out), "training": training}}
    try:
        state = torch.load(out / STATE_FILE, map_location="cpu", weights_only=True)
    except (FileNotFoundError, RuntimeError, EOFError, OSError) as exc:
        raise CorruptCheckpoint(f"{out}/{STATE_FILE} cannot be read ({exc}); the partial run cannot resume. "
                                "Start again with --overwrite") from exc
    return {"state": state}


def _cast_on(dev: torch.device, frozen: torch.dtype) -> torch.device:
    """Where to load a model whose frozen weights are then cast: the CPU when they are held in
    a smaller dtype on a GPU, so the GPU never holds the fp32 copy."""
    return torch.device("cpu") if frozen != LOAD_DTYPE else dev


def _load_teacher(spec: str, lm, tokenizer, dev: torch.device, progress: ProgressFn, frozen: torch.dtype):
    """The frozen model to distil from (held in the frozen weights' dtype); its vocabulary must be the student's."""
    progress(ProgressEvent("load", 0, 1, message=f"teacher {spec}"))
    loaded = load_model(spec, device=str(_cast_on(dev, frozen)), dtype=LOAD_DTYPE)
    teacher = loaded.model.eval().requires_grad_(False)
    hold_frozen(teacher, frozen)
    teacher.to(dev)
    t_vocab, s_vocab = teacher.lm_head.weight.shape[0], lm.lm_head.weight.shape[0]
    same_tokens = loaded.tokenizer is None or tokenizer.get_vocab() == loaded.tokenizer.get_vocab()
    if t_vocab != s_vocab or not same_tokens:
        what = (f"predicts {t_vocab} tokens, the model being fine-tuned {s_vocab}" if t_vocab != s_vocab
                else "has a tokenizer with another vocabulary than the model being fine-tuned")
        raise InvalidArgument(f"the teacher {spec!r} {what}; distillation needs the same tokenizer. Pass the "
                              "model this checkpoint was compressed from as --teacher")
    progress(ProgressEvent("load", 1, 1, message=f"teacher {spec}"))
    return teacher


def finetune_checkpoint(model, out: str | Path, **kwargs) -> dict:
    """Fine-tune `model` (any spec load_model accepts, or a LoadedModel) on `data` and write the
    result to `out`; returns the result dict (also written to out/metrics.json). See finetune_run."""
    return finetune_run(model, out, **kwargs)[0]


def finetune_run(model, out: str | Path, *, data: str, resume: bool = False, overwrite: bool = False,
                 device: str | None = None, progress: ProgressFn = no_progress, should_stop: StopFn | None = None,
                 merged_out: str | Path | None = None, **options) -> tuple[dict, torch.nn.Module]:
    """Fine-tune `model` (any spec load_model accepts, or a LoadedModel already in memory) on
    `data` and write the result to `out` (weights in `options["dtype"]`, default auto: the
    source's), and with `merged_out` also a dense merged export there. Returns (result, the
    trained model as saved).

    `options` are the FinetuneConfig options (method, steps, lr, batch_size, seq_len, ...: its
    `OPTIONS` table, which holds their defaults and ranges; None = the default). Returns the result
    dict, also written to out/metrics.json.
    """
    t_start = time.perf_counter()
    cfg = FinetuneConfig.from_options(options)
    out = Path(out).expanduser()
    given = model if isinstance(model, LoadedModel) else None
    model = given.source.spec if given is not None else str(model)
    parallel = DataParallel.current()
    if parallel is not None and cfg.batch_size < parallel.world:
        raise InvalidArgument(f"batch_size {cfg.batch_size} is smaller than the {parallel.world} processes; each "
                              f"process computes its share of every micro-batch, so pass --batch-size ≥ "
                              f"{parallel.world} or start fewer processes")
    main = parallel is None or parallel.is_main
    if not main:
        progress = no_progress
    point = _resume_point(out, cfg, model) if resume else None
    if point and "done" in point:
        return {**point["done"], "already_complete": True}, None
    if point is None and out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise OutputExists(f"{out} already exists and is not empty; choose another --out, pass --overwrite "
                           "to replace it, or --resume to continue the run saved there")
    if merged_out is not None:
        if Path(merged_out).expanduser().resolve() == out.resolve():
            raise OutputExists(f"--out and --merged-out name the same directory {out}; give each its own")
        check_output(merged_out, overwrite, "--merged-out")
    check_stop(should_stop)

    # -- model, data, method
    progress(ProgressEvent("load", 0, 1, message=str(model)))
    dev = pick_device(device)
    if parallel is not None and dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())  # the launcher set this rank's GPU
    frozen = DTYPES[cfg.resolved_frozen_dtype(dev.type)]
    t0 = time.perf_counter()
    if given is not None:
        loaded = given
        loaded.model.to(device=_cast_on(dev, frozen), dtype=LOAD_DTYPE)
    else:
        loaded = load_model(model, device=str(_cast_on(dev, frozen)), dtype=LOAD_DTYPE)  # fp32 masters
    load_seconds = time.perf_counter() - t0
    tok = loaded.tokenizer
    if tok is None:
        raise InvalidArgument(f"model {model!r} has no tokenizer files; fine-tuning needs one. Re-create the "
                              "checkpoint from a model directory that includes its tokenizer")
    progress(ProgressEvent("load", 1, 1, message=str(model)))
    save_dtype = output_dtype(cfg.dtype, loaded.source)
    dataset = build_dataset(tok, data, seq_len=cfg.seq_len, val_fraction=cfg.val_fraction,
                            val_sequences=cfg.val_sequences, choice_examples=cfg.choice_examples,
                            data_format=cfg.data_format)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    torch.manual_seed(cfg.seed)
    train_model = apply_method(loaded.model, cfg)
    hold_frozen(train_model, frozen)
    train_model.to(dev)
    lm = base_causal_lm(train_model)
    params = count_parameters(train_model)
    stream = BatchStream(dataset.train, cfg.batch_size, cfg.seed, pad_id)
    teacher = _load_teacher(cfg.teacher, lm, tok, dev, progress, frozen) if cfg.teacher else None
    trainer = Trainer(train_model, lm, cfg, stream, dev, val=dataset.val, pad_id=pad_id, teacher=teacher,
                      parallel=parallel)
    data_info = {**dataset.summary(), "sha256": file_sha256(dataset.path)}

    def accuracy():
        return choice_accuracy(lm, tok, dataset.choices, seq_len=cfg.seq_len, pad_id=pad_id, device=dev,
                               batch_size=max(cfg.batch_size, 8), bf16=trainer.bf16, should_stop=should_stop)

    if point is not None:
        trainer.load_state_dict(point["state"]["trainer"])
        before = point["state"]["before"]
    else:
        progress(ProgressEvent("eval", 0, 1, message="before training"))
        before = {"val": trainer.evaluate(should_stop), "accuracy": accuracy()}
        progress(ProgressEvent("eval", 1, 1, message="before training",
                               metrics={"val_ppl": before["val"]["perplexity"]}))

    src_meta = loaded.meta or {}
    history = list(src_meta.get("training_history", [])) + ([src_meta["training"]] if "training" in src_meta else [])
    base_meta = {k: v for k, v in src_meta.items() if k not in _COPIED_META}
    base_meta.setdefault("source", {"model": str(model), "kind": loaded.source.kind})

    def record(status: str, extra: dict | None = None) -> dict:
        return {"kind": "finetuned", **base_meta, "training_history": history, "training": {
            "status": status, "step": trainer.state.step, "steps": cfg.steps, "method": cfg.method,
            "base_model": {"spec": str(model), "kind": loaded.source.kind,
                           "n_lrc": n_lrc(loaded.model) if cfg.method != "lora" else 0},
            "config": cfg.to_dict(), "data": data_info, "params": params,
            "val_before": before["val"], "accuracy_before": before["accuracy"], **(extra or {})}}

    def save_partial(tr: Trainer) -> None:
        if not main:
            return
        progress(ProgressEvent("save", 0, 1, message=f"step {tr.state.step}"))
        _publish(out, merged_copy(tr.model), tok, record("partial"),
                 {STATE_FILE: {"trainer": tr.state_dict(), "before": before}}, save_dtype)
        progress(ProgressEvent("save", 1, 1, message=f"step {tr.state.step}"))

    # -- train
    meter = MemoryMeter(dev)
    meter.start()
    state = trainer.run(progress, should_stop, on_save=save_partial)
    memory = meter.stop()
    check_stop(should_stop)
    progress(ProgressEvent("eval", 0, 1, message="after training"))
    after = {"val": trainer.evaluate(should_stop), "accuracy": accuracy()}
    progress(ProgressEvent("eval", 1, 1, message="after training", metrics={"val_ppl": after["val"]["perplexity"]}))

    memory.update(state.state_bytes)
    memory["model_param_bytes"] = tensor_bytes([p for _, p in unique_parameters(train_model)])
    memory["device"] = dev.type
    memory["frozen_dtype"] = cfg.resolved_frozen_dtype(dev.type)
    throughput = {"tokens_per_s": state.timed_tokens / state.timed_seconds if state.timed_seconds else None,
                  "step_seconds": state.timed_seconds / state.timed_steps if state.timed_steps else None,
                  "tokens_per_cpu_s": state.timed_tokens / state.timed_cpu_seconds if state.timed_cpu_seconds else None,
                  "timed_steps": state.timed_steps, "timing_warmup_steps": cfg.timing_warmup_steps,
                  "tokens": state.tokens, "train_seconds": state.train_seconds}
    result = {
        "model": str(model), "out": str(out), "method": cfg.method, "steps": state.step,
        "config": cfg.to_dict(), "data": data_info, "params": params, "memory": memory,
        "throughput": throughput, "tokens_per_s": throughput["tokens_per_s"],
        "loss_curve": state.loss_curve,
        "val": {"before": before["val"], "after": after["val"], "curve": state.val_curve},
        "val_perplexity_before": before["val"]["perplexity"], "val_perplexity_after": after["val"]["perplexity"],
        "accuracy": {"before": before["accuracy"], "after": after["accuracy"]} if before["accuracy"] else None,
        "resumed_at": state.resumed_at, "device": str(dev), "bf16_autocast": trainer.bf16,
        "frozen_dtype": memory["frozen_dtype"], "load_seconds": load_seconds,
        "distributed": parallel.summary(cfg.batch_size) if parallel is not None else None,
        "dtype": short_name(save_dtype), "merged_out": str(merged_out) if merged_out is not None else None,
    }
    final = finalize(train_model)
    result["seconds"] = time.perf_counter() - t_start
    meta = record("complete", {"val_after": after["val"], "accuracy_after": after["accuracy"],
                               "throughput": throughput, "memory": memory,
                               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    if main:
        progress(ProgressEvent("save", 0, 1, message=str(out)))
        _publish(out, final, tok, meta, {METRICS_FILE: result}, save_dtype)
        final.welore_meta = read_json(out / META)  # what was written: the model's record from now on
        if merged_out is not None:
            save_merged(final, tok, merged_out, overwrite=overwrite, dtype=save_dtype)
        progress(ProgressEvent("save", 1, 1, message=str(out)))
    if parallel is not None:
        parallel.barrier()  # every rank returns once the checkpoint is there
    return result, final
