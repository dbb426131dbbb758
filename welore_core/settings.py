"""Settings of the ML core, read once from the environment (prefix WELORE_).

Every setting has a default that works on a laptop with nothing configured. The service's
settings (api/settings.py) extend this class and hand themselves to the core with `configure()`,
so one object configures everything and the core never reads the environment on its own.
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


_configured: list[CoreSettings] = []


def configure(settings: CoreSettings) -> None:
    """Make `settings` (e.g. the service's Settings, a CoreSettings subclass) the core's settings."""
    _configured[:] = [settings]
    _from_environment.cache_clear()


@lru_cache(maxsize=1)
def _from_environment() -> CoreSettings:
    return CoreSettings()


def get_core_settings() -> CoreSettings:
    """The configured settings, or (the command line) the environment's, read once."""
    return _configured[0] if _configured else _from_environment()


def reset() -> None:
    """Forget the configured settings and re-read the environment on next use (tests)."""
    _configured.clear()
    _from_environment.cache_clear()
