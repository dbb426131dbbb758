"""Measurements of a fine-tuning run: peak memory (GPU allocator or CPU resident-set growth),
exact bytes of trainable parameters / gradients / optimizer state, held-out loss and
perplexity, and multiple-choice accuracy by option log-likelihood.
"""

from __future__ import annotations

import math
import re
import time
from contextlib import nullcontext

import torch
from torch import nn

from .data import Example, IGNORE, Sequence, collate, eval_batches
from .loss import causal_lm_loss


def _proc_status_mb(field: str) -> float | None:
    try:
        text = open("/proc/self/status").read()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) / 1024.0 if m else None


class MemoryMeter:
    """Peak memory over a region. GPU: torch.cuda.max_memory_allocated (reset at start). CPU:
    growth of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs
    when the kernel allows, else ru_maxrss, which can only under-report growth)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base_mb = 0.0
        self.hwm_reset = False

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_mb = torch.cuda.memory_allocated(self.device) / 2**20
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.base_mb = _proc_status_mb("VmRSS") or 0.0

    def stop(self) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            return {"kind": "cuda_max_memory_allocated", "peak_mb": peak, "base_mb": self.base_mb,
                    "peak_growth_mb": peak - self.base_mb}
        peak = _proc_status_mb("VmHWM")
        if peak is None:
            import resource
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        return {"kind": "cpu_peak_rss" if self.hwm_reset else "cpu_peak_rss_lifetime", "peak_mb": peak,
                "base_mb": self.base_mb, "peak_growth_mb": max(0.0, peak - self.base_mb)}


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def training_state_bytes(model: nn.Module, params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> dict:
    """Exact bytes held for training: the model's weights by dtype (trainable and frozen),
    the gradients (as allocated after a backward pass), every tensor in the optimizer state,
    and their sum."""
    from .precision import weight_bytes

    grads = [p.grad for p in params if p.grad is not None]
    opt = [v for st in optimizer.state.values() for v in st.values()]
    out = {**weight_bytes(model), "trainable_params": sum(p.numel() for p in params),
           "grad_bytes": tensor_bytes(grads) if grads else tensor_bytes(params),
           "optimizer_state_bytes": tensor_bytes(opt)}
    out["training_state_bytes"] = (sum(out["weight_bytes_by_dtype"].values()) + out["grad_bytes"]
                                   + out["optimizer_state_bytes"])
    return out


def autocast_ctx(device: torch.device, bf16: bool):
    if not bf16:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def validation_loss(lm: nn.Module, seqs: list[Sequence], *, batch_size: int, pad_id: int,
                    device: torch.device, bf16: bool = False, should_stop=None) -> dict:
    """Mean NLL per scored token over the held-out sequences, and its perplexity."""
    from ..progress import check_stop

    was = lm.training
    lm.eval()
    t0 = time.perf_counter()
    nll, count = 0.0, 0
    try:
        for b in eval_batches(seqs, batch_size, pad_id):
            check_stop(should_stop)
            mask = b["attention_mask"].to(device) if b["attention_mask"] is not None else None
            with autocast_ctx(device, bf16):
                s, n = causal_lm_loss(lm, b["input_ids"].to(device), b["labels"].to(device), mask,
                                      torch.bfloat16 if bf16 else torch.float32)
            nll += float(s)
            count += n
    finally:
        lm.train(was)
    loss = nll / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf"), "tokens": count,
            "sequences": len(seqs), "seconds": time.perf_counter() - t0}


@torch.no_grad()
def choice_accuracy(lm: nn.Module, tokenizer, examples: list[Example], *, seq_len: int, pad_id: int,
                    device: torch.device, batch_size: int = 8, bf16: bool = False,
                    should_stop=None) -> dict | None:
    """Accuracy of picking the option with the highest total log-likelihood given the
    prompt (each option scored as prompt + option, option tokens only)."""
    from ..progress import check_stop

    if not examples:
        return None
    seqs, owner = [], []
    for i, ex in enumerate(examples):
        p = list(tokenizer(ex.prompt, add_special_tokens=False)["input_ids"])
        for opt in ex.options:
            o = list(tokenizer(opt, add_special_tokens=False)["input_ids"])[: seq_len - 1]
            pp = p[-(seq_len - len(o)):]
            seqs.append(Sequence(pp + o, [IGNORE] * len(pp) + o))
            owner.append(i)
    was = lm.training
    lm.eval()
    scores: list[float] = []
    try:
        for start in range(0, len(seqs), batch_size):
            check_stop(should_stop)
            b = collate(seqs[start:start + batch_size], pad_id)
            ids = b["input_ids"].to(device)
            mask = b["attention_mask"].to(device) if b["attention_mask"] is not None else None
            with autocast_ctx(device, bf16):
                logits = lm(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            tgt = b["labels"][:, 1:].to(device)
            ok = tgt != IGNORE
            picked = logp.gather(2, tgt.clamp(min=0)[..., None]).squeeze(-1) * ok
            scores.extend(picked.sum(1).tolist())
    finally:
        lm.train(was)
    correct, k = 0, 0
    for i, ex in enumerate(examples):
        opts = scores[k:k + len(ex.options)]
        k += len(ex.options)
        correct += int(max(range(len(opts)), key=opts.__getitem__) == ex.gold)
    return {"accuracy": correct / len(examples), "correct": correct, "examples": len(examples)}
