"""welore_core: WeLore low-rank compression, evaluation and fine-tuning as a plain library.

It imports torch, transformers, safetensors and numpy only: never a web, database or queue
library. Long operations report progress through a callback they are given (see progress.py)
and stop when a `should_stop` callback says so.

The Python API (python_api.py), imported lazily so `import welore_core` stays cheap:

    from welore_core import CompressConfig, compress, finetune, load, save
"""

from .version import __version__

_API = {"CompressConfig": "compression.config", "FinetuneConfig": "finetune.config",
        "compress": "python_api", "save": "python_api", "load": "python_api", "finetune": "python_api"}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
