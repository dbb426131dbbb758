"""Shared fixtures: tiny seeded Llama models for exact maths, the real packaged model and data,
and an isolated spectrum cache per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _data_dir() -> Path:
    for cand in (ROOT.parent / "shared" / "data", ROOT / "shared" / "data"):
        if cand.is_dir():
            return cand
    return ROOT.parent / "shared" / "data"


DATA_DIR = Path(os.environ.get("WELORE_DATA_DIR", _data_dir()))
os.environ.setdefault("WELORE_DATA_DIR", str(DATA_DIR))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.fail(f"shared data not found at {DATA_DIR}; set WELORE_DATA_DIR")
    return DATA_DIR


@pytest.fixture(scope="session")
def boolq_path(data_dir) -> Path:
    return data_dir / "boolq" / "boolq_dev.jsonl"


def make_tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, intermediate: int = 160,
                    heads: int = 4, kv_heads: int = 2, vocab: int = 256, tie: bool = True,
                    low_rank_signal: bool = True):
    """A seeded random LlamaForCausalLM with GQA. With `low_rank_signal`, each target matrix is a
    random low-rank matrix plus noise of its own scale, so spectra differ between matrices."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=256, tie_word_embeddings=tie)
    model = LlamaForCausalLM(config).eval()
    if low_rank_signal:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, mod in model.named_modules():
                if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
                    m, n = mod.weight.shape
                    k = int(torch.randint(2, min(m, n) // 2, (1,), generator=g))
                    signal = torch.randn(m, k, generator=g) @ torch.randn(k, n, generator=g) / k ** 0.5
                    noise = torch.randn(m, n, generator=g) * float(torch.rand(1, generator=g) * 0.3 + 0.02)
                    mod.weight.copy_((signal + noise) * 0.05)
    return model


@pytest.fixture
def tiny_llama():
    return make_tiny_llama


class ByteTokenizer:
    """A minimal tokenizer (bytes → ids) for tiny-model tests that need one."""

    pad_token = "<pad>"
    eos_token = "<eos>"
    pad_token_id = 0
    eos_token_id = 1

    def __call__(self, text, add_special_tokens=False, **kw):
        return {"input_ids": [2 + (b % 254) for b in text.encode("utf-8")]}

    def save_pretrained(self, path):
        return None


@pytest.fixture
def byte_tokenizer():
    return ByteTokenizer()


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Tiny-model spectra go to a fresh cache; the real model's conversions stay shared
    (WELORE_TEST_CACHE_DIR overrides) so a CI run converts the GGUF once."""
    cache = os.environ.get("WELORE_TEST_CACHE_DIR") or str(Path.home() / ".cache" / "welore")
    os.environ["WELORE_CACHE_DIR"] = cache
    from welore_core.settings import get_core_settings
    get_core_settings.cache_clear()
    yield


@pytest.fixture
def fresh_cache(tmp_path):
    from welore_core.spectrum import SpectrumCache
    return SpectrumCache(tmp_path / "cache")
