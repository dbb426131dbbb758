"""Recipes for tests (import: `from recipes import data_free, calibrated`): the data-free paper
method, and calibrated recipes whose defaults are spelled out so a test does not silently change
when a library default does."""

from welore_core.compression.config import CalibrationConfig, CompressConfig, ExperimentalConfig


def data_free(**kw) -> CompressConfig:
    """Data-free WeLore (`--calibration none`); `kw` are CompressConfig fields (err, min_ratio, method, ...)."""
    return CompressConfig(calibration=None, **kw)


def calibrated(*, method: str = "welore", sequential: bool = False, compensate: bool = False, damp: float = 0.01,
               sink_weight: float = 1.0, data: str = "general", **kw) -> CompressConfig:
    """A whitened recipe; by default the WeLore ranks of the weights and one dense calibration pass
    (the settings the older calibration tests were written for)."""
    return CompressConfig(method=method, calibration=CalibrationConfig(
        data=data, sequential=sequential, compensate=compensate, damp=damp),
        experimental=ExperimentalConfig(sink_weight=sink_weight), **kw)
