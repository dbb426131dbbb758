"""Data-parallel fine-tuning over torch.distributed: `torchrun --nproc-per-node N -m welore_core.cli
finetune …`, or `welore finetune --nproc N …`, which starts torchrun itself.

Every rank holds the whole model and builds the same global micro-batches (a pure function of
the step, data.BatchStream); rank r computes its contiguous share of each micro-batch's rows
(torch.tensor_split), so N processes compute the global batch of one process. Each rank's loss
is normalised by the step's *global* scored-token count, so after the step's last micro-batch
the trainable gradients and the loss are summed over the ranks (all-reduce in flat fp32
buckets, once per optimizer step, as DDP does under `no_sync` accumulation); every rank then
clips and steps identically, and the trainable parameters are broadcast from rank 0 when a run
starts or resumes. DDP's module wrapper is not used: the loss runs the decoder and the chunked
LM-head cross-entropy separately (loss.py), a forward DDP's reducer never sees.

Only rank 0 reports progress and writes checkpoints and metrics.json; the others wait at a
barrier. Backends: gloo on the CPU, nccl on GPUs (one GPU per rank: cuda:LOCAL_RANK).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import InvalidArgument

BUCKET_ELEMENTS = 1 << 24  # gradients summed 64 MiB (fp32) at a time


@dataclass
class DataParallel:
    rank: int
    world: int
    backend: str

    @classmethod
    def current(cls) -> "DataParallel | None":
        """The initialised process group of more than one process, or None (a single process)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        return cls(dist.get_rank(), dist.get_world_size(), dist.get_backend())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: dict) -> dict:
        """This rank's rows of a collated micro-batch (counts stay those of the whole batch)."""
        rows = torch.tensor_split(torch.arange(batch["input_ids"].shape[0]), self.world)[self.rank]
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        return {k: (v[lo:hi] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def sum_gradients(self, params: list[torch.nn.Parameter], loss_sum: float) -> float:
        """Sum every trainable gradient and the loss over the ranks; returns the summed loss."""
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        start = 0
        while start < len(params):
            group, n = [], 0
            while start < len(params) and (not group or n + params[start].numel() <= BUCKET_ELEMENTS):
                group.append(params[start])
                n += params[start].numel()
                start += 1
            flat = torch.cat([p.grad.reshape(-1).float() for p in group])
            dist.all_reduce(flat)
            offset = 0
            for p in group:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
                offset += p.numel()
        device = params[0].device if params else torch.device("cpu")
        loss = torch.tensor([loss_sum], dtype=torch.float64, device=device)
        dist.all_reduce(loss)
        return float(loss)

    def broadcast(self, params: list[torch.nn.Parameter]) -> None:
        """Make every rank's trainable parameters rank 0's."""
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def barrier(self) -> None:
        dist.barrier()

    def summary(self, batch_size: int) -> dict:
        per_rank = [len(r) for r in torch.tensor_split(torch.arange(batch_size), self.world)]
        return {"world_size": self.world, "backend": self.backend, "rank_batch_sizes": per_rank}


# ---------------------------------------------------------------- launching (the command line)

def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_from_env(device: str | None) -> tuple[bool, str | None]:
    """Under torchrun: join the process group (nccl with CUDA, else gloo) and pick this rank's
    device. Returns (whether this process is rank 0, the device to use)."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) < 2:
        return True, device
    wants_cuda = device is not None and device.startswith("cuda") or (device in (None, "auto")
                                                                       and torch.cuda.is_available())
    if wants_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise InvalidArgument(f"torchrun started {os.environ['WORLD_SIZE']} processes on this node, but it "
                                  f"has {torch.cuda.device_count()} GPU(s); data-parallel needs one GPU per "
                                  "process. Lower --nproc(-per-node), or pass --device cpu (gloo)")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if wants_cuda else "gloo")
    return dist.get_rank() == 0, device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch(nproc: int, argv: list[str]) -> int:
    """Run `welore <argv>` (less its --nproc, which torchrun's own parser would take for
    --nproc-per-node) in `nproc` processes under torchrun on this node; returns its exit code."""
    rest, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--nproc="):
            skip = False
        elif arg == "--nproc":
            skip = True
        else:
            rest.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "welore_core.cli", *rest]
    return subprocess.run(cmd).returncode
