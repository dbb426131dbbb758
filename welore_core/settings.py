"""Settings of the ML core, read once from the environment (prefix WELORE_).

Every setting has a default that works on a laptop with nothing configured. The service's
settings (api/settings.py) extend this class, so one object configures everything.
"""

from functools import lru_cache
from pathlib import Path
from typing import Optional

from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_home() -> Path:
    return Path.home() / ".cache" / "welore"


def _default_data_dir() -> Path:
    # The project's shared data sits beside the checkout (../shared/data); fall back to cwd.
    here = Path(__file__).resolve().parent.parent
    for base in (Path.cwd(), here):
        for cand in (base / "shared" / "data", base.parent / "shared" / "data"):
            if cand.is_dir():
                return cand
    return here.parent / "shared" / "data"


class CoreSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WELORE_", extra="ignore")

    cache_dir: Path = _default_home()
    """Spectrum cache and GGUF→safetensors conversions (env WELORE_CACHE_DIR)."""

    data_dir: Path = _default_data_dir()
    """Where built-in datasets (boolq, commonsenseqa, ...) are read from (env WELORE_DATA_DIR)."""

    cache_max_gb: Optional[float] = None
    """Size cap of the spectrum cache in GB; least recently used entries are evicted beyond it
    (env WELORE_CACHE_MAX_GB; unset: no cap)."""

    stream_above_gb: float = 4.0
    """Models whose float32 weights exceed this many GB are compressed and evaluated layer by layer,
    one decoder layer in memory at a time (env WELORE_STREAM_ABOVE_GB; 0: always stream)."""

    device: str = "auto"
    """auto (a GPU when present), cpu, or cuda[:N] (env WELORE_DEVICE)."""


@lru_cache(maxsize=1)
def get_core_settings() -> CoreSettings:
    return CoreSettings()
