"""Shared fixtures: tiny seeded Llama models for exact maths, the real packaged model and data,
and an isolated spectrum cache per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tiny_llama import ByteTokenizer, make_tiny_llama

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


@pytest.fixture
def tiny_llama():
    return make_tiny_llama


@pytest.fixture
def byte_tokenizer():
    return ByteTokenizer()


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Tiny-model spectra go to a fresh cache; the real model's conversions stay shared
    (WELORE_TEST_CACHE_DIR overrides) so a CI run converts the GGUF once."""
    cache = os.environ.get("WELORE_TEST_CACHE_DIR") or str(Path.home() / ".cache" / "welore")
    os.environ["WELORE_CACHE_DIR"] = cache
    from welore_core.settings import reset
    reset()
    yield


@pytest.fixture
def fresh_cache(tmp_path):
    from welore_core.spectrum import SpectrumCache
    return SpectrumCache(tmp_path / "cache")
