"""Fine-tuning memory at scale, on the tiny seeded model: frozen weights held in bf16 (trainable
factors, gradients and AdamW state fp32; exact bytes reported; the loss still falls; the
checkpoint written in fp32), and data-parallel COFT in 2 gloo processes vs 1 process with the
same global batch (loss curves within 1e-5, weights within 1e-5, resume across world sizes,
only rank 0 writes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_finetune import FAST, _load, tiny  # noqa: F401  (tiny: the module's fixture)
from welore_core.errors import Cancelled, InvalidArgument
from welore_core.finetune import FinetuneConfig, finetune_checkpoint
from welore_core.finetune.data import BatchStream, build_dataset
from welore_core.finetune.methods import apply_method, count_parameters
from welore_core.finetune.metrics import autocast_ctx
from welore_core.finetune.precision import hold_frozen
from welore_core.finetune.trainer import Trainer
from welore_core.lowrank import LowRankLinear

LOSS_TOL = 1e-5  # per-step training loss, 2 processes vs 1 (fp32 sums in another order; seen: 1e-7)
WEIGHT_TOL = 1e-5


def _frozen_key(k: str) -> bool:
    return not (k.endswith((".A", ".B")) or "norm" in k)


# ---------------------------------------------------------------- bf16 frozen weights

def test_frozen_dtype_resolution_and_refusal():
    assert FinetuneConfig().resolved_frozen_dtype("cuda") == "bf16"
    assert FinetuneConfig().resolved_frozen_dtype("cpu") == "fp32"
    assert FinetuneConfig(precision="fp32").resolved_frozen_dtype("cuda") == "fp32"
    assert FinetuneConfig(frozen_dtype="bf16").resolved_bf16("cpu")  # bf16 weights compute under autocast
    assert not FinetuneConfig().resolved_bf16("cpu")
    with pytest.raises(InvalidArgument, match="--precision bf16"):
        FinetuneConfig(frozen_dtype="bf16", precision="fp32").validate()
    with pytest.raises(InvalidArgument, match="frozen_dtype"):
        FinetuneConfig(frozen_dtype="fp16").validate()


def test_bf16_frozen_forward_matches_fp32_and_a_step_keeps_fp32_masters(tiny):
    """Mixed dtypes in one forward (bf16 N-LRCs/embeddings/head, fp32 factors and norms) give
    the fp32-weight logits under the same autocast; gradients and AdamW state stay fp32."""
    cfg = FinetuneConfig(frozen_dtype="bf16", steps=2, lr=1e-3, **FAST).validate()
    ref = apply_method(_load(tiny["comp"]).model, cfg)
    model = apply_method(_load(tiny["comp"]).model, cfg)
    assert hold_frozen(model, torch.bfloat16) > 0
    ids = torch.randint(2, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), autocast_ctx(torch.device("cpu"), True):
        want, got = ref(input_ids=ids).logits.float(), model(input_ids=ids).logits.float()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=2e-2 * float(want.abs().max()))

    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(m.A.dtype == m.B.dtype == torch.float32 for m in model.modules() if isinstance(m, LowRankLinear))
    ds = build_dataset(tiny["tok"], tiny["data"], seq_len=64, val_fraction=0.1, val_sequences=4, choice_examples=0)
    tr = Trainer(model, model, cfg, BatchStream(ds.train, 4, 0, 0), torch.device("cpu"), val=ds.val, pad_id=0)
    assert tr.bf16
    loss, _ = tr.train_step()
    assert loss == loss and all(p.grad is None for p in tr.params)  # finite; gradients freed after the step
    opt_tensors = [v for st in tr.opt.state.values() for v in st.values()]
    assert opt_tensors and all(v.dtype == torch.float32 for v in opt_tensors)
    assert all(p.dtype == torch.float32 for p in tr.params)


def test_bf16_frozen_run_learns_reports_exact_bytes_and_writes_fp32(tiny, tmp_path):
    out = tmp_path / "bf16frozen"
    r = finetune_checkpoint(tiny["comp"], out, data=tiny["data"], steps=25, lr=3e-3, frozen_dtype="bf16", **FAST)
    assert r["frozen_dtype"] == "bf16" and r["bf16_autocast"] and r["config"]["frozen_dtype"] == "bf16"
    curve = [loss for _, loss, _ in r["loss_curve"]]
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.3
    assert r["val"]["after"]["loss"] < r["val"]["before"]["loss"] - 0.3

    m, pr = r["memory"], r["params"]
    n_trainable_tensors = sum(p.requires_grad for p in apply_method(_load(tiny["comp"]).model,
                                                                    FinetuneConfig()).parameters())
    assert count_parameters(apply_method(_load(tiny["comp"]).model, FinetuneConfig()))["frozen"] == pr["frozen"]
    assert m["weight_bytes_by_dtype"] == {"bfloat16": 2 * pr["frozen"], "float32": 4 * pr["trainable"]}
    assert m["frozen_param_bytes"] == 2 * pr["frozen"] and m["trainable_param_bytes"] == 4 * pr["trainable"]
    assert m["trainable_params"] == pr["trainable"] and m["grad_bytes"] == 4 * pr["trainable"]
    assert m["optimizer_state_bytes"] == 8 * pr["trainable"] + 4 * n_trainable_tensors  # exp_avg, exp_avg_sq, step
    assert m["training_state_bytes"] == 2 * pr["frozen"] + 16 * pr["trainable"] + 4 * n_trainable_tensors
    saved = json.loads((out / "metrics.json").read_text())["memory"]
    assert saved["weight_bytes_by_dtype"] == m["weight_bytes_by_dtype"]

    # the checkpoint: fp32 like its source; frozen weights the source's, as held (rounded to bf16)
    before = load_file(str(Path(tiny["comp"]) / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in after.values())
    for k, t in before.items():
        if _frozen_key(k):
            assert torch.equal(after[k], t.bfloat16().float()), k
        else:
            assert not torch.equal(after[k], t), k
    _load(out)


def test_fp32_frozen_is_the_cpu_default(tiny, tmp_path):
    r = finetune_checkpoint(tiny["comp"], tmp_path / "o", data=tiny["data"], steps=1, **FAST)
    assert r["frozen_dtype"] == "fp32" and not r["bf16_autocast"]
    assert set(r["memory"]["weight_bytes_by_dtype"]) == {"float32"}


# ---------------------------------------------------------------- data-parallel COFT (gloo, 2 processes)

def _cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    return subprocess.run([sys.executable, "-m", "welore_core.cli", "finetune", *args], capture_output=True,
                          text=True, timeout=600, env=env)


def test_two_gloo_processes_equal_one_process_and_resume(tiny, tmp_path):
    """batch 3 over 2 ranks (rows 2 + 1) with 2 accumulated micro-batches: the 2-process loss
    curve and weights equal one process's; the run resumes (from a 1-process partial save)
    in 2 processes; only rank 0 writes."""
    kw = dict(data=tiny["data"], steps=4, lr=5e-3, grad_accum=2, save_every=2,
              **{**FAST, "batch_size": 3})
    single = finetune_checkpoint(tiny["comp"], tmp_path / "one", **kw)

    steps = []
    out = tmp_path / "two"
    with pytest.raises(Cancelled):
        finetune_checkpoint(tiny["comp"], out, should_stop=lambda: len(steps) >= 3,
                            progress=lambda ev: steps.append(ev.done) if ev.stage == "train" else None, **kw)
    assert json.loads((out / "welore.json").read_text())["training"]["step"] == 2

    args = [tiny["comp"], "--data", tiny["data"], "--out", str(out), "--steps", "4", "--lr", "5e-3",
            "--grad-accum", "2", "--save-every", "2", "--batch-size", "3", "--seq-len", "64",
            "--val-sequences", "4", "--choice-examples", "8", "--device", "cpu", "--nproc", "2", "--resume", "--json"]
    proc = _cli(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1  # rank 0 alone reports
    two = json.loads(lines[0])
    assert two["distributed"] == {"world_size": 2, "backend": "gloo", "rank_batch_sizes": [2, 1]}
    assert two["resumed_at"] == [2] and len(two["loss_curve"]) == 4
    assert two["loss_curve"][:2] == single["loss_curve"][:2]  # from the saved state
    for (s1, l1, lr1), (s2, l2, lr2) in zip(single["loss_curve"], two["loss_curve"]):
        assert s1 == s2 and lr1 == lr2 and abs(l1 - l2) <= LOSS_TOL, (s1, l1, l2)
    assert abs(two["val"]["after"]["loss"] - single["val"]["after"]["loss"]) <= LOSS_TOL

    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=WEIGHT_TOL)
    _load(out)
    assert json.loads((out / "metrics.json").read_text())["distributed"]["world_size"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging debris of any rank



def test_a_batch_smaller_than_the_processes_is_refused(tiny, tmp_path, monkeypatch):
    from welore_core.finetune import pipeline
    from welore_core.finetune.distributed import DataParallel

    monkeypatch.setattr(pipeline.DataParallel, "current", classmethod(lambda cls: DataParallel(0, 2, "gloo")))
    with pytest.raises(InvalidArgument, match="batch_size 1 is smaller than the 2 processes"):
        finetune_checkpoint(tiny["comp"], tmp_path / "bad", data=tiny["data"], steps=1, **{**FAST, "batch_size": 1})
    assert not (tmp_path / "bad").exists()


def test_rank_shards_cover_the_batch_once():
    from welore_core.finetune.data import Sequence, collate
    from welore_core.finetune.distributed import DataParallel

    b = collate([Sequence([5] * n, [5] * n) for n in (3, 5, 4, 6, 2)], 0)
    parts = [DataParallel(r, 3, "gloo").shard(b) for r in range(3)]
    assert [p["input_ids"].shape[0] for p in parts] == [2, 2, 1]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), b["input_ids"])
    assert torch.equal(torch.cat([p["attention_mask"] for p in parts]), b["attention_mask"])
    assert all(p["targets"] == b["targets"] for p in parts)  # each rank normalises by the whole step's count


def test_rest_params_take_the_frozen_dtype():
    from pydantic import ValidationError

    from api.jobs.params import FinetuneParams

    assert FinetuneParams(data="boolq", frozen_dtype="bf16").frozen_dtype == "bf16"
    with pytest.raises(ValidationError, match="frozen_dtype"):
        FinetuneParams(data="boolq", frozen_dtype="fp16")
