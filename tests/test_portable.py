"""Portable checkpoints on tiny seeded models: plain transformers in an interpreter where welore
cannot be imported loads a factorised checkpoint with trust_remote_code=True (same logits,
generate, save_pretrained → loads again) and refuses it without; output dtypes; integrity
(damaged bytes → CorruptCheckpoint, exit 2); the merged export of a fine-tuned checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from test_finetune import FAST, _tokenizer, _toy_docs
from tiny_llama import make_tiny_llama
from welore_core.checkpoint import load_checkpoint, save_checkpoint
from welore_core.errors import CorruptCheckpoint, OutputExists
from welore_core.lowrank import LowRankLinear, swap_module
from welore_core.modelfiles import weights_dtype

IDS = [[5, 17, 99, 3, 42, 250, 7, 8, 120, 64]]


def factorise(model: nn.Module, every: int = 2) -> nn.Module:
    """Every other target linear as rank-min/4 SVD factors: a compressed model, made without the
    compression code so these tests pin the format only."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")]
    for name, mod in linears[::every]:
        U, S, Vh = torch.linalg.svd(mod.weight.detach(), full_matrices=False)
        k = min(mod.weight.shape) // 4
        root = S[:k].sqrt()
        swap_module(model, name, LowRankLinear.from_factors(root[:, None] * Vh[:k], U[:, :k] * root))
    return model


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = factorise(make_tiny_llama(seed=31))
    out = save_checkpoint(model, None, tmp_path_factory.mktemp("portable") / "ckpt", {"kind": "compressed"})
    return out, logits(model)


def corrupt_copy(src: Path, dst: Path) -> Path:
    """`src` with 4 KB of its weight file's middle inverted."""
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    data = bytearray(weights.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4096] = bytes(b ^ 0xFF for b in data[mid:mid + 4096])
    weights.write_bytes(bytes(data))
    return dst


ISOLATED = r"""
import importlib.util, json, sys
assert importlib.util.find_spec("welore_core") is None, "welore_core must not be importable here"
import torch
from transformers import AutoModelForCausalLM
src, resaved, damaged = sys.argv[1:4]
ids = torch.tensor(json.loads(sys.argv[4]))
out = {}
for name, path, kw in (("plain", src, {}), ("damaged", damaged, {"trust_remote_code": True})):
    try:
        AutoModelForCausalLM.from_pretrained(path, **kw)
        out[name] = "loaded"
    except Exception as exc:
        out[name] = f"{type(exc).__name__}: {exc}"
model = AutoModelForCausalLM.from_pretrained(src, trust_remote_code=True, dtype=torch.float32).eval()
with torch.no_grad():
    out["logits"] = model(ids).logits.tolist()
    out["generated"] = model.generate(ids, max_new_tokens=4, do_sample=False).tolist()
model.save_pretrained(resaved)
again = AutoModelForCausalLM.from_pretrained(resaved, trust_remote_code=True, dtype=torch.float32).eval()
with torch.no_grad():
    out["resaved_logits"] = again(ids).logits.tolist()
out["class"] = type(model).__name__
out["shared"] = sum(getattr(m, "_shared", None) is not None for m in model.modules())
print("RESULT", json.dumps(out))
"""


def run_without_welore(code: str, *args, cwd: Path) -> dict:
    """Run `code` in an isolated interpreter (-I -S) whose path keeps the standard library and
    site-packages but neither the repository nor the editable install's finder."""
    keep = [p for p in sys.path if p and os.path.isdir(p) and not os.path.isdir(os.path.join(p, "welore_core"))]
    boot = f"import sys; sys.path[:] = {keep!r}; exec(compile({code!r}, 'isolated', 'exec'))"
    env = {"PATH": os.environ.get("PATH", ""), "HF_HOME": str(cwd / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", boot, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.rsplit("RESULT ", 1)[1])


def test_plain_transformers_without_welore_loads_it_only_with_trust_remote_code(ckpt, tmp_path):
    path, expected = ckpt
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "welore_llama" and set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    assert (path / "modeling_welore.py").is_file() and (path / "integrity.py").is_file()
    damaged = corrupt_copy(path, tmp_path / "damaged")
    out = run_without_welore(ISOLATED, path, tmp_path / "resaved", damaged, json.dumps(IDS), cwd=tmp_path)
    assert "trust_remote_code=True" in out["plain"], out["plain"]  # an error naming the fix, not random weights
    assert "damaged" in out["damaged"] and "model.safetensors" in out["damaged"]
    assert out["class"] == "WeloreLlamaForCausalLM"
    assert out["shared"] == 2 * (3 + 2)  # both layers' q/k/v and gate/up read their input in one GEMM
    torch.testing.assert_close(torch.tensor(out["logits"]), expected)
    torch.testing.assert_close(torch.tensor(out["resaved_logits"]), expected)
    assert len(out["generated"][0]) == len(IDS[0]) + 4
    # the folder plain transformers re-saved is a complete WeLore checkpoint again
    reloaded = load_checkpoint(tmp_path / "resaved")
    torch.testing.assert_close(logits(reloaded.model), expected)
    assert set(reloaded.meta["files"]) == {"model.safetensors"}


def _first_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.A if isinstance(m, LowRankLinear) else m.weight for m in model.modules()
            if getattr(m, "_shared", None) is not None]


def test_fused_first_matrices_equal_the_separate_ones(ckpt, tmp_path):
    """q/k/v and gate/up (factored and dense members mixed) share one GEMM once loaded: same
    logits as each member's own (fp32 to rounding, bf16 within its tolerance), the parameters
    are views into the one matrix (no second copy), and state_dict / save keep names and bytes."""
    from welore_core.portable.modeling_welore import SharedInputLinear

    path, expected = ckpt
    model = load_checkpoint(path).model
    attn = model.model.layers[0].self_attn
    kinds = {type(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj)}
    assert kinds == {LowRankLinear, SharedInputLinear} and model.fuse_factors() == 4
    group = attn.q_proj._shared
    assert all(p.untyped_storage().data_ptr() == group.weight.untyped_storage().data_ptr() for p in group.params)
    assert sum(p.numel() for p in group.params) == group.weight.numel()
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(model(torch.tensor(IDS)).logits, expected, rtol=1e-5, atol=1e-5)
    resaved = save_checkpoint(model, None, tmp_path / "resaved", {})
    assert (resaved / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()

    fused = load_checkpoint(path, dtype=torch.bfloat16).model
    assert _first_weights(fused)[0].dtype == torch.bfloat16
    fused_out = logits(fused).float()
    fused.unfuse_factors()
    assert not _first_weights(fused) and type(fused.model.layers[0].self_attn.k_proj) is nn.Linear
    separate = logits(fused).float()
    torch.testing.assert_close(fused_out, separate, rtol=0.02, atol=0.02)
    torch.testing.assert_close(fused_out, expected, rtol=0.05, atol=0.05)
    with torch.no_grad():  # one token in bf16 takes ATen's kernel (oneDNN off for that call only)
        one = fused(torch.tensor([IDS[0][:1]])).logits.float()
    assert torch._C._get_mkldnn_enabled()
    torch.testing.assert_close(one[0, 0], separate[0, 0], rtol=0.02, atol=0.02)
    fused.to(torch.float32).fuse_factors()
    fused.to(torch.bfloat16)  # .to() moves the parameters out: they share one matrix again
    assert _first_weights(fused)[0].dtype == torch.bfloat16
    torch.testing.assert_close(logits(fused).float(), fused_out, rtol=0, atol=0)


def test_gradients_reach_the_fused_parameters(ckpt):
    """With gradients wanted each member takes its own GEMM; an in-place step moves the fused
    matrix with it, and merge_and_unload undoes the sharing."""
    path, _ = ckpt
    model, ref = load_checkpoint(path).model, load_checkpoint(path).model
    ref.unfuse_factors()
    for m in (model, ref):
        m.requires_grad_(True)
        m(torch.tensor(IDS)).logits.square().mean().backward()
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, msg=name)
    name = next(n for n, m in model.named_modules() if isinstance(m, LowRankLinear) and m._shared is not None)
    step = 0.1 * model.get_submodule(name).A.grad
    with torch.no_grad():
        model.get_submodule(name).A.sub_(step)
        ref.get_submodule(name).A.sub_(step)
    torch.testing.assert_close(logits(model), logits(ref), rtol=1e-5, atol=1e-5)
    merged = model.merge_and_unload()
    assert not _first_weights(merged) and type(merged.model.layers[0].self_attn.k_proj) is nn.Linear
    torch.testing.assert_close(logits(merged), logits(ref), rtol=1e-4, atol=1e-4)


def test_bf16_output_round_trip(tmp_path):
    model = factorise(make_tiny_llama(seed=32))
    fp32 = save_checkpoint(model, None, tmp_path / "fp32", {})
    bf16 = save_checkpoint(model, None, tmp_path / "bf16", {}, dtype=torch.bfloat16)
    meta = json.loads((bf16 / "welore.json").read_text())
    assert meta["dtype"] == "bf16" and json.loads((fp32 / "welore.json").read_text())["dtype"] == "fp32"
    assert weights_dtype(bf16) == torch.bfloat16
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    assert (bf16 / "model.safetensors").stat().st_size < 0.52 * (fp32 / "model.safetensors").stat().st_size
    as_bf16 = load_checkpoint(bf16, dtype=torch.bfloat16).model.state_dict()
    as_fp32 = load_checkpoint(bf16).model.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(as_bf16[key], value.to(torch.bfloat16)), key
        assert as_fp32[key].dtype == torch.float32 and torch.equal(as_fp32[key], value.to(torch.bfloat16).float())
    assert model.model.layers[0].self_attn.q_proj.A.dtype == torch.float32  # the caller's model is unchanged


def test_damaged_weights_are_refused_naming_the_file(ckpt, tmp_path):
    path, _ = ckpt
    bad = corrupt_copy(path, tmp_path / "bad")
    with pytest.raises(CorruptCheckpoint, match=r"model\.safetensors.*SHA-256"):
        load_checkpoint(bad)
    (bad / "extra.safetensors").write_bytes(b"x")
    shutil.copy(path / "model.safetensors", bad / "model.safetensors")
    with pytest.raises(CorruptCheckpoint, match="extra.safetensors is not in"):
        load_checkpoint(bad)


def test_stamped_hash_notices_a_rewrite(tmp_path):
    from welore_core.hashing import file_sha256, stamped_sha256

    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    os.utime(f, (1_000_000, 1_000_000))  # an old file: its stamp is trusted afterwards
    first = stamped_sha256(f, tmp_path / "cache")
    assert first == file_sha256(f) and stamped_sha256(f, tmp_path / "cache") == first
    f.write_bytes(b"b" * 1000)  # same size, new mtime
    assert stamped_sha256(f, tmp_path / "cache") == file_sha256(f) != first


def test_stamped_hash_expires_and_takes_a_recorded_result(tmp_path):
    """A change that keeps the stat is found once the check is older than max_age_s; a digest
    recorded while the file was read elsewhere is what later checks return."""
    from welore_core.hashing import file_sha256, record_sha256, stamped_sha256

    f, cache = tmp_path / "w.bin", tmp_path / "cache"
    f.write_bytes(b"a" * 1000)
    os.utime(f, (1_000_000, 1_000_000))
    first = stamped_sha256(f, cache, max_age_s=3600)
    st = f.stat()
    with open(f, "r+b") as fh:  # in place: same inode, size; times put back
        fh.write(b"b")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert stamped_sha256(f, cache, max_age_s=3600) == first  # trusted: the stat did not change
    assert stamped_sha256(f, cache, max_age_s=0) == file_sha256(f) != first  # expired: hashed again
    record_sha256(f, cache, "0" * 64, f.stat(), time.time() - 10)
    assert stamped_sha256(f, cache, max_age_s=3600) == "0" * 64
    os.utime(f, None)  # a fresh mtime: the record no longer matches the stat
    assert stamped_sha256(f, cache, max_age_s=3600) == file_sha256(f)


def welore(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "welore_core.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"welore {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A factorised checkpoint with a tokenizer, fine-tuned (COFT) for two steps, with its merged export."""
    from welore_core.finetune import finetune_checkpoint

    root = tmp_path_factory.mktemp("ft")
    docs = _toy_docs(30)
    (root / "toy.txt").write_text("\n\n".join(docs))
    model = factorise(make_tiny_llama(seed=33, vocab=320))
    comp = save_checkpoint(model, _tokenizer(docs), root / "comp", {"kind": "compressed"})
    result = finetune_checkpoint(str(comp), root / "ft", data=str(root / "toy.txt"), steps=2, merged_out=root / "ftm",
                                 dtype="bf16", **FAST)
    return root, result


def test_finetune_merged_out_and_export_equal_the_factorised_model(finetuned):
    from transformers import AutoModelForCausalLM

    root, result = finetuned
    assert result["dtype"] == "bf16" and json.loads((root / "ft" / "welore.json").read_text())["dtype"] == "bf16"
    factorised = logits(load_checkpoint(root / "ft").model)
    welore("export", root / "ft", "--merged-out", root / "merged", "--dtype", "fp32")
    config = json.loads((root / "merged" / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config and "welore_factored" not in config
    assert not (root / "merged" / "modeling_welore.py").exists()
    exported = AutoModelForCausalLM.from_pretrained(root / "merged", dtype=torch.float32).eval()
    assert not any(isinstance(m, LowRankLinear) for m in exported.modules())
    torch.testing.assert_close(logits(exported), factorised, atol=1e-4, rtol=1e-4)
    direct = AutoModelForCausalLM.from_pretrained(root / "ftm", dtype=torch.bfloat16).eval()
    assert direct.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(logits(direct.float()), factorised, atol=0.05, rtol=0.05)


def test_cli_checks_outputs_first_and_reports_damage_in_one_line(finetuned, tmp_path):
    root, _ = finetuned
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "f").write_text("x")
    proc = welore("export", root / "ft", "--out", tmp_path / "new", "--merged-out", tmp_path / "taken", check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and not (tmp_path / "new").exists()
    with pytest.raises(OutputExists):
        from welore_core.outputs import check_outputs
        check_outputs({"--out": tmp_path / "a", "--merged-out": tmp_path / "a"})

    ok = welore("eval", root / "ft", "--data", root / "toy.txt", "--seq-len", "16", "--windows", "2")
    assert "\r" not in ok.stderr and "eval:" in ok.stderr  # a line per step, no redraws, when not a terminal
    bad = corrupt_copy(root / "ft", tmp_path / "bad")
    proc = welore("eval", bad, "--data", root / "toy.txt", "--quiet", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert "model.safetensors" in lines[0] and "SHA-256" in lines[0]


def test_version_and_help_without_torch():
    code = ("import sys; from welore_core.cli import build_parser; p = build_parser(); "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr
    version = welore("--version")
    assert version.stdout.startswith("welore ")
