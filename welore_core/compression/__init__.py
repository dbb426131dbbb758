"""WeLore compression: the recipe (config), rank allocation, calibration-aware factorisation, the
in-place model compression, the quality check, and the end-to-end checkpoint pipeline.

Modules: config (CompressConfig, torch-free), allocation (WeLore's τ, uniform, loss), whiten and
input_stats (activation statistics → transforms), calibration (the layer-by-layer pass),
factorize (triplets → factors), model (`compress_model`), quality, pipeline (`compress_checkpoint`).
Import the torch-free config directly: `from welore_core.compression.config import CompressConfig`.
"""

from .config import CalibrationConfig, CompressConfig, ExperimentalConfig

__all__ = ["CompressConfig", "CalibrationConfig", "ExperimentalConfig", "compress_model", "compress_checkpoint"]


def __getattr__(name: str):  # torch-heavy entry points load on first use
    if name == "compress_model":
        from .model import compress_model
        return compress_model
    if name == "compress_checkpoint":
        from .pipeline import compress_checkpoint
        return compress_checkpoint
    raise AttributeError(name)
