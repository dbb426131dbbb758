"""The training loop: AdamW over the trainable parameters only, linear warm-up then cosine
decay, gradient accumulation (loss normalised over the whole step's scored tokens, so
accumulation equals a bigger batch), gradient clipping, bf16 autocast, optional gradient
checkpointing, a stop check every step, and a state (parameters, optimizer, counters, RNG)
that resumes bit-for-bit: batches are a pure function of the step (data.BatchStream).
With a DataParallel group (distributed.py) each rank computes its rows of every micro-batch and
the gradients are summed over the ranks before clipping.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import Cancelled, CorruptCheckpoint
from ..progress import ProgressEvent, ProgressFn, StopFn, no_progress
from .config import FinetuneConfig
from .data import BatchStream, Sequence
from .distributed import DataParallel
from .loss import Teacher, causal_lm_loss
from .methods import unique_parameters
from .metrics import autocast_ctx, training_state_bytes, validation_loss


def lr_at(step: int, cfg: FinetuneConfig) -> float:
    """Learning rate of optimizer step `step` (0-based)."""
    warm = cfg.resolved_warmup()
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@dataclass
class TrainState:
    step: int = 0
    loss_curve: list = field(default_factory=list)  # [step, mean loss per scored token, lr]
    val_curve: list = field(default_factory=list)  # [step, loss, perplexity, training seconds so far]
    tokens: int = 0  # input tokens processed (padding excluded)
    train_seconds: float = 0.0  # all steps, all sessions
    timed_steps: int = 0  # steps counted in throughput (timing warm-up excluded per session)
    timed_tokens: int = 0
    timed_seconds: float = 0.0
    timed_cpu_seconds: float = 0.0  # process CPU time of the timed steps (robust on a shared machine)
    state_bytes: dict = field(default_factory=dict)
    resumed_at: list = field(default_factory=list)


class Trainer:
    def __init__(self, model: nn.Module, lm: nn.Module, cfg: FinetuneConfig, stream: BatchStream,
                 device: torch.device, *, val: list[Sequence], pad_id: int, teacher: nn.Module | None = None,
                 parallel: DataParallel | None = None):
        self.model, self.lm, self.cfg, self.stream, self.device = model, lm, cfg, stream, device
        self.parallel = parallel
        self.teacher = teacher  # a frozen causal LM to distil from (cfg.teacher), or None
        self.val, self.pad_id = val, pad_id
        named = [(n, p) for n, p in unique_parameters(model) if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.bf16 = cfg.resolved_bf16(device.type)
        self.compute_dtype = torch.bfloat16 if self.bf16 else torch.float32
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                     weight_decay=cfg.weight_decay)
        self.state = TrainState()
        self._session_steps = 0
        if cfg.gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # ---------------------------------------------------------------- one step
    def train_step(self) -> tuple[float, int]:
        """One optimizer step; returns (mean loss per scored token, input tokens)."""
        cfg, s = self.cfg, self.state.step
        lr = lr_at(s, cfg)
        for g in self.opt.param_groups:
            g["lr"] = lr
        batches = [self.stream.micro_batch(s * cfg.grad_accum + i) for i in range(cfg.grad_accum)]
        n_targets = max(1, sum(b["targets"] for b in batches))
        self.model.train()
        total = 0.0
        for b in batches:
            if self.parallel is not None:
                b = self.parallel.shard(b)  # n_targets stays the whole step's
            mask = b["attention_mask"].to(self.device) if b["attention_mask"] is not None else None
            ids = b["input_ids"].to(self.device)
            with autocast_ctx(self.device, self.bf16):
                loss_sum, _ = causal_lm_loss(self.lm, ids, b["labels"].to(self.device), mask, self.compute_dtype,
                                             self._teacher(ids, mask))
            (loss_sum / n_targets).backward()  # frozen parameters: no .grad is ever allocated
            total += float(loss_sum.detach())
        if self.parallel is not None:
            total = self.parallel.sum_gradients(self.params, total)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.opt.step()
        if not self.state.state_bytes:
            self.state.state_bytes = training_state_bytes(self.model, self.params, self.opt)
        self.opt.zero_grad(set_to_none=True)
        return total / n_targets, sum(b["tokens"] for b in batches)

    @torch.no_grad()
    def _teacher(self, ids: torch.Tensor, mask: torch.Tensor | None) -> Teacher | None:
        if self.teacher is None:
            return None
        out = self.teacher.model(input_ids=ids, attention_mask=mask, use_cache=False)
        return Teacher(out.last_hidden_state, self.teacher.lm_head.weight, self.cfg.distill_weight)

    def evaluate(self, should_stop: StopFn | None = None) -> dict:
        return validation_loss(self.lm, self.val, batch_size=self.cfg.batch_size, pad_id=self.pad_id,
                               device=self.device, bf16=self.bf16, should_stop=should_stop)

    # ---------------------------------------------------------------- the loop
    def run(self, progress: ProgressFn = no_progress, should_stop: StopFn | None = None,
            on_save: Optional[Callable[["Trainer"], None]] = None) -> TrainState:
        cfg, st = self.cfg, self.state
        if self.parallel is not None:
            self.parallel.broadcast(self.params)  # every rank starts (or resumes) from rank 0's weights
        while st.step < cfg.steps:
            if should_stop is not None and should_stop():
                raise Cancelled(f"fine-tuning stopped at the caller's request before step {st.step + 1} of "
                                f"{cfg.steps}; only complete checkpoints (if any) were written")
            self._sync()
            t0, c0 = time.perf_counter(), time.process_time()
            loss, tokens = self.train_step()
            self._sync()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            st.step += 1
            self._session_steps += 1
            st.tokens += tokens
            st.train_seconds += dt
            if self._session_steps > cfg.timing_warmup_steps:
                st.timed_steps += 1
                st.timed_tokens += tokens
                st.timed_seconds += dt
                st.timed_cpu_seconds += dc
            lr = self.opt.param_groups[0]["lr"]
            st.loss_curve.append([st.step, loss, lr])
            if not math.isfinite(loss):
                from ..errors import NonFiniteWeights
                raise NonFiniteWeights(f"the training loss became {loss} at step {st.step}; nothing more was "
                                       f"written. Lower --lr (received {cfg.lr}) or keep gradient clipping on")
            tps = st.timed_tokens / st.timed_seconds if st.timed_seconds else tokens / dt
            progress(ProgressEvent("train", st.step, cfg.steps, metrics={"loss": loss, "lr": lr, "tokens_per_s": tps}))
            if cfg.eval_every and st.step % cfg.eval_every == 0 and st.step < cfg.steps:
                progress(ProgressEvent("eval", 0, 1, message=f"step {st.step}"))
                v = self.evaluate(should_stop)
                st.val_curve.append([st.step, v["loss"], v["perplexity"], st.train_seconds])
                progress(ProgressEvent("eval", 1, 1, message=f"step {st.step}",
                                       metrics={"val_loss": v["loss"], "val_ppl": v["perplexity"]}))
            if on_save is not None and cfg.save_every and st.step % cfg.save_every == 0 and st.step < cfg.steps:
                on_save(self)
        return st

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"trainable": {n: p.detach().to("cpu").clone() for n, p in zip(self.names, self.params)},
                "optimizer": self.opt.state_dict(), "state": asdict(self.state), "rng": rng}

    def load_state_dict(self, d: dict) -> None:
        saved = d["trainable"]
        if sorted(saved) != sorted(self.names):
            missing = sorted(set(self.names) - set(saved))[:3]
            extra = sorted(set(saved) - set(self.names))[:3]
            raise CorruptCheckpoint(f"the saved training state does not match this model's trainable parameters "
                                    f"(missing {missing}, unexpected {extra}); start again without --resume")
        with torch.no_grad():
            for n, p in zip(self.names, self.params):
                if saved[n].shape != p.shape:
                    raise CorruptCheckpoint(f"saved parameter {n} has shape {tuple(saved[n].shape)}, the model "
                                            f"has {tuple(p.shape)}; start again without --resume")
                p.copy_(saved[n])
        self.opt.load_state_dict(d["optimizer"])
        self.state = TrainState(**d["state"])
        self.state.resumed_at.append(self.state.step)
        torch.set_rng_state(d["rng"]["cpu"])
        if "cuda" in d["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(d["rng"]["cuda"])
