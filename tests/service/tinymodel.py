"""A tiny Llama model directory with a real tokenizer (taken from the cached SmolLM2-135M
conversion, so token ids fit a 49152-entry vocabulary) for fast service tests."""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def smollm2_dir() -> Path:
    from welore_core.loading import gguf_to_safetensors, registry_path

    return gguf_to_safetensors(registry_path("smollm2-135m"))


def _make_tiny_llama():
    """tests/conftest.make_tiny_llama, loaded by path (this directory has a conftest of its own)."""
    import importlib.util
    import sys

    name = "welore_tests_root_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "conftest.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name].make_tiny_llama


def write_tiny_model(target: Path, seed: int = 0) -> Path:
    make_tiny_llama = _make_tiny_llama()
    src = smollm2_dir()
    model = make_tiny_llama(seed=seed, layers=2, hidden=64, intermediate=160, heads=4, kv_heads=2, vocab=49152)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(target))
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, target / name)
    return target
