"""The Python API: the guide's example (docs/guide/python-api.md) runs as written (on the real
SmolLM2-135M, paths put in), the README's short one names what exists,
and its pieces keep their promises: compress returns the same model object, save_pretrained's
folder equals welore's load, merge_and_unload equals the factorised logits."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


GUIDE = ROOT / "docs" / "guide" / "python-api.md"


def readme_example() -> str:
    match = re.search(r"<!-- readme-example -->\n```python\n(.*?)```", GUIDE.read_text(), re.S)
    assert match, f"{GUIDE} has no <!-- readme-example --> python block"
    return match.group(1)


def test_readme_python_example_compiles_and_names_exist():
    import ast

    import welore_core

    block = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md has no python example"
    tree = ast.parse(block.group(1))
    names = [a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "welore_core"
             for a in node.names]
    assert names and all(name in welore_core.__all__ for name in names)


def test_import_is_cheap_and_names_resolve():
    import subprocess
    import sys

    code = "import sys, welore_core; print('torch' in sys.modules); from welore_core import load, finetune, save"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["False"], out.stderr


def test_in_memory_finetune_save_load_merge(tmp_path):
    from test_finetune import FAST, _tokenizer, _toy_docs
    from test_portable import factorise, logits
    from tiny_llama import make_tiny_llama
    from welore_core import finetune, load, save
    from welore_core.checkpoint import factored_modules
    from welore_core.portable import as_factorised

    docs = _toy_docs(30)
    tok = _tokenizer(docs)
    model = factorise(make_tiny_llama(seed=3, vocab=320))
    as_factorised(model, factored_modules(model))
    before = logits(model)
    tuned = finetune(model, docs, tokenizer=tok, steps=2, **FAST)  # a list of texts, no file
    assert tuned is model and not torch.equal(logits(tuned), before)
    assert tuned.welore_meta["kind"] == "finetuned"
    path = save(tuned, tmp_path / "ft", tokenizer=tok, dtype="bf16")
    loaded = load(path)
    assert type(loaded).__name__ == "WeloreLlamaForCausalLM" and loaded.welore_meta["dtype"] == "bf16"
    torch.testing.assert_close(logits(loaded), logits(tuned), atol=0.05, rtol=0.05)
    factorised = logits(loaded)
    dense = loaded.merge_and_unload()
    assert type(dense).__name__ == "LlamaForCausalLM" and "welore_factored" not in dense.config.to_dict()
    torch.testing.assert_close(logits(dense), factorised, atol=1e-5, rtol=1e-4)


@pytest.mark.real_model
def test_readme_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("welore_core.compression.config")  # CompressConfig (the recipe) lives there
    from welore_core.loading import gguf_to_safetensors, registry_path

    src = gguf_to_safetensors(registry_path("smollm2-135m"))
    code = readme_example()
    assert '"path/to/model"' in code
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code.replace('"path/to/model"', repr(str(src))), "README example", "exec"), scope)

    model, anywhere, same, dense = scope["model"], scope["anywhere"], scope["same"], scope["dense"]
    assert type(model).__name__ == "WeloreLlamaForCausalLM" and (tmp_path / "c03" / "modeling_welore.py").is_file()
    assert type(dense).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    reference = scope["load"]("c03")
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(anywhere(ids).logits, expected)
    assert os.path.isfile(tmp_path / "c03-dense" / "model.safetensors")
