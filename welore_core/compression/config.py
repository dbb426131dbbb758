"""The compression recipe: `CompressConfig` and its nested `CalibrationConfig` / `ExperimentalConfig`.

Torch-free (the service's request path imports it). Every option's default, range and
cross-check lives here once; the `welore compress` flags, the REST `params` of compress jobs and
the worker's call are derived from `OPTIONS` (one flat name per field), and `welore.json` stores
`to_dict()` of the resolved recipe, which `from_dict()` (`welore compress --recipe FILE`) reads back.

`resolve()` turns the "auto" choices of the method and the calibration into concrete ones from the
target, so the stored recipe reproduces its checkpoint exactly (`dtype` "auto" stays: it means the
source's own dtype). The defaults are the measured best
(BENCHMARKS.md § compression; docs/research/ for the studies behind them).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional, Union

from ..errors import InvalidArgument
from ..options import Option, check_known, check_options, opt, option_table, range_text  # noqa: F401 (Option, range_text: API)

METHODS = ("auto", "loss", "welore", "uniform")
DTYPES = ("auto", "bf16", "fp16", "fp32")
NO_CALIBRATION = "none"
DEFAULT_CALIBRATION = "general"  # the text shipped in welore_core/data (see corpus.BUILTIN)
HEAVY_FROM_ERR = 0.2  # sequential/compensate "auto": on from this ERR (or its parameter equivalent) up;
# below it they cost 5× the seconds for nothing measurable (docs/research/allocation-objective.md)
# "auto" calibration below HEAVY_CALIBRATION_FROM_ERR / from it up (params kept 0.6 down). Heavy compression drops
# directions the calibration text hardly uses, which other domains' text may use: there a higher whitening damping
# (δ = damp·mean diag of the Gram matrix) pays, and twice the calibration windows; below, the floor costs and the
# windows cost seconds for little (docs/research/damping.md, docs/research/calibration-samples.md)
HEAVY_CALIBRATION_FROM_ERR = 0.4
DAMP, HEAVY_DAMP = 0.01, 0.3
SAMPLES, HEAVY_SAMPLES = 64, 128
SEQ_LEN = 512  # tokens per calibration window
RECIPE_VERSION = 2  # 2: rank_multiple (a version-1 recipe predates it: read back with rank_multiple 1, no rounding)
READABLE_VERSIONS = (1, 2)
RANK_MULTIPLE = 8  # chosen by the allocator's estimate (16 and up: > 2 % at ERR 0.5); measured on held-out text at ERR 0.5 it costs +0.5 to +5.3 % (BENCHMARKS § compression-recipes)
# What `--recover STEPS` runs after compressing: distilled WeLore-COFT from the dense source on RECOVER_DATA when the
# user gives no text: the whole shipped file, whose tail (past the windows calibration reads) is 256 documents the
# model generated, so 150 steps pass over the text 1.2 times (not 2.4) (docs/research/recovery-text.md). lr 1e-4: better
# than 2e-4 and 5e-4 on every held-out corpus of bench.recipes, and than 5e-4 on the recovery text's own held-out
# documents; 5e-5 ties it there (chosen by that text, not by the held-out corpora); 4 x 512-token windows measured
# no better (docs/research/recovery-lr.md)
RECOVER_DATA = DEFAULT_CALIBRATION
RECOVER_OPTIONS = {"method": "welore", "batch_size": 8, "seq_len": 256, "lr": 1e-4, "precision": "auto",
                   "distill_weight": 1.0}
RECOVER_TEXT = (f"WeLore-COFT, batch {RECOVER_OPTIONS['batch_size']} × {RECOVER_OPTIONS['seq_len']} tokens, "
                f"lr {RECOVER_OPTIONS['lr']:g}")  # what CLI, REST and the guide say it runs
MAX_ERR, MIN_PARAMS_KEPT = 0.9, 0.1  # beyond these a compressed model is refused as unusable


def _opt(flag: str, help: str, **kw):
    """Field metadata (options.opt): the flat option name (CLI flag `--<flag with dashes>`, REST param) first."""
    return opt(help, flag=flag, **kw)


@dataclass(frozen=True)
class CalibrationConfig:
    """Calibration-aware factorisation: activations of real text decide what each truncation keeps."""

    data: str = field(default=DEFAULT_CALIBRATION, metadata=_opt(
        "calibration", "calibration text: a .txt/.jsonl file, a built-in name (general: the text shipped "
        "with welore), or none for data-free WeLore"))
    samples: Optional[int] = field(default=None, metadata=_opt(
        "calib_samples", f"calibration windows (the first N of the text); auto: {HEAVY_SAMPLES} from ERR "
        f"{HEAVY_CALIBRATION_FROM_ERR:g} (params kept {1 - HEAVY_CALIBRATION_FROM_ERR:g}) on, else {SAMPLES}",
        lo=1, hi=100_000))
    seq_len: int = field(default=SEQ_LEN, metadata=_opt("calib_seq_len", "tokens per calibration window",
                                                    lo=2, hi=32_768))
    factorization: str = field(default="whitened", metadata=_opt(
        "factorization", "whitened: each LRC from the SVD of W·S with S·Sᵀ = XᵀX, the least output error on "
        "the calibration activations (SVD-LLM); the data-free plain SVD of W is --calibration none",
        choices=("whitened",)))
    sequential: Optional[bool] = field(default=None, metadata=_opt(
        "sequential", "gather layer L's statistics with layers 0..L-1 already compressed (one more layer run "
        f"per layer); auto: on from ERR {HEAVY_FROM_ERR}", tristate=True))
    compensate: Optional[bool] = field(default=None, metadata=_opt(
        "compensate", "refit each layer's o_proj/down_proj to the dense block's outputs (needs sequential; one "
        f"more layer run per layer); auto: on from ERR {HEAVY_FROM_ERR} when sequential", tristate=True))
    damp: Optional[float] = field(default=None, metadata=_opt(
        "damp", "whitening damping, a fraction of the Gram's mean diagonal added to it (a floor under the directions "
        f"the calibration text hardly uses); auto: {HEAVY_DAMP:g} from ERR {HEAVY_CALIBRATION_FROM_ERR:g} (params kept "
        f"{1 - HEAVY_CALIBRATION_FROM_ERR:g}) on, else {DAMP:g}",
        lo=0.0, hi=1.0))


@dataclass(frozen=True)
class ExperimentalConfig:
    """Research knobs kept because a measurement showed them paying somewhere (sink_weight 64: ERR 0.1 with
    min_ratio 0 at 1.01× the dense perplexity instead of 1.08×; docs/research/calibration-rounds.md)."""

    sink_weight: float = field(default=1.0, metadata=_opt(
        "sink_weight", "count each calibration window's first token (the attention sink) W times in the "
        "statistics; helps only with --min-ratio 0 at light compression", lo=0.0, hi=1e6, lo_open=True))


@dataclass(frozen=True)
class CompressConfig:
    """One compression recipe. Give exactly one target: `err` or `params_kept`."""

    err: Optional[float] = field(default=None, metadata=_opt(
        "err", "effective rank reduction to reach (fraction of the target matrices' ranks removed)",
        lo=0.0, hi=1.0, lo_open=True, hi_open=True, target=True))
    params_kept: Optional[float] = field(default=None, metadata=_opt(
        "params_kept", "fraction of the target matrices' parameters to keep", lo=0.0, hi=1.0, lo_open=True,
        target=True))
    method: str = field(default="auto", metadata=_opt(
        "method", "rank allocation: loss (minimise the estimated loss increase under the budget: each "
        "matrix's whitened truncation error weighted by the loss's sensitivity to its outputs; needs "
        "calibration), welore (the paper: one threshold on the normalised weight spectra), uniform (the same "
        "fraction everywhere); auto: loss with calibration, welore without", choices=METHODS))
    min_ratio: float = field(default=0.5, metadata=_opt(
        "min_ratio", "a matrix is a Low-Rank Component only when it drops more than this fraction of its ranks",
        lo=0.0, hi=1.0, hi_open=True))
    rank_multiple: int = field(default=RANK_MULTIPLE, metadata=_opt(
        "rank_multiple", "every factored matrix keeps a multiple of N ranks (at least N), so the factored layers share "
        f"few GEMM shapes; 1: no rounding. Default {RANK_MULTIPLE}: larger multiples cost SmolLM2 over 2 % perplexity "
        "at ERR 0.5", lo=1, hi=4096))
    dtype: str = field(default="auto", metadata=_opt(
        "dtype", "dtype of the written weights (auto: the source's; a GGUF source gives bf16)", choices=DTYPES))
    calibration: Optional[CalibrationConfig] = field(default_factory=CalibrationConfig)
    experimental: ExperimentalConfig = field(default_factory=ExperimentalConfig)

    def __post_init__(self):
        validate(self)

    # -- derived ---------------------------------------------------------------------------
    @property
    def calibrated(self) -> bool:
        return self.calibration is not None

    @property
    def target(self) -> tuple[str, float]:
        return ("err", self.err) if self.err is not None else ("params_kept", self.params_kept)

    def heavy(self, from_err: float = HEAVY_FROM_ERR) -> bool:
        """At or beyond ERR `from_err` (a parameter target: at or below its rough equivalent, 1 − from_err)."""
        kind, value = self.target
        return value >= from_err if kind == "err" else value <= 1.0 - from_err

    def resolve(self) -> "CompressConfig":
        """The same recipe with every "auto" made concrete (what welore.json stores)."""
        method = self.method if self.method != "auto" else ("loss" if self.calibrated else "welore")
        cal = self.calibration
        if cal is not None:
            sequential = (self.heavy() or bool(cal.compensate)) if cal.sequential is None else cal.sequential
            compensate = sequential and self.heavy() if cal.compensate is None else cal.compensate
            heavier = self.heavy(HEAVY_CALIBRATION_FROM_ERR)
            samples = (HEAVY_SAMPLES if heavier else SAMPLES) if cal.samples is None else cal.samples
            damp = (HEAVY_DAMP if heavier else DAMP) if cal.damp is None else cal.damp
            cal = replace(cal, samples=samples, sequential=sequential, compensate=compensate, damp=damp)
        return replace(self, method=method, calibration=cal)

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"version": RECIPE_VERSION, **_to_dict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "CompressConfig":
        """A recipe from `to_dict()` output (or a checkpoint's welore.json `recipe`); unknown keys are refused."""
        if not isinstance(data, dict):
            raise InvalidArgument(f"a recipe must be a JSON object; received {type(data).__name__}")
        data = dict(data)
        version = data.pop("version", RECIPE_VERSION)
        if version not in READABLE_VERSIONS:
            raise InvalidArgument(f"recipe version {version!r} is not supported (this welore reads versions "
                                  f"{', '.join(map(str, READABLE_VERSIONS))}); re-create the recipe")
        if version == 1:
            data.setdefault("rank_multiple", 1)
        return _from_dict(cls, data, "recipe")

    def to_options(self) -> dict[str, Any]:
        """The flat options (by `OPTIONS` name) that `from_options` turns back into this recipe."""
        out = {}
        for o in OPTIONS.values():
            obj: Any = self
            for part in o.path[:-1]:
                obj = getattr(obj, part) if obj is not None else None
            out[o.name] = getattr(obj, o.path[-1]) if obj is not None else None
        if self.calibration is None:
            out["calibration"] = NO_CALIBRATION
        return out

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "CompressConfig":
        """A recipe from flat options (CLI flags / REST params, by `OPTIONS` name); None = the default."""
        check_known(options, OPTIONS, "compression")
        nested: dict[str, dict] = {"calibration": {}, "experimental": {}}
        top: dict[str, Any] = {}
        data = options.get("calibration")
        for name, value in options.items():
            if value is None:
                continue
            path = OPTIONS[name].path
            if len(path) == 1:
                top[path[0]] = value
            else:
                nested[path[0]][path[1]] = value
        if data is not None and str(data).lower() == NO_CALIBRATION:
            given = sorted(k for k in nested["calibration"] if k != "data")
            if given:
                raise InvalidArgument(f"{', '.join(OPTIONS_BY_PATH[('calibration', k)] for k in given)} need "
                                      "calibration; drop them or choose calibration text instead of none")
            top["calibration"] = None
        else:
            top["calibration"] = CalibrationConfig(**nested["calibration"])
        top["experimental"] = ExperimentalConfig(**nested["experimental"])
        return cls(**top)


# ---------------------------------------------------------------------------------------------
# The flat option table (CLI flags, REST params) derived from the dataclasses' field metadata


_SECTIONS = {"calibration": CalibrationConfig, "experimental": ExperimentalConfig}


OPTIONS: dict[str, Option] = option_table(CompressConfig, _SECTIONS)
OPTIONS_BY_PATH: dict[tuple[str, ...], str] = {o.path: o.name for o in OPTIONS.values()}


# ---------------------------------------------------------------------------------------------
# Validation: ranges from the option table, then the cross-checks


def validate(cfg: CompressConfig) -> None:
    check_options(cfg, OPTIONS)
    if (cfg.err is None) == (cfg.params_kept is None):
        raise InvalidArgument("give exactly one target: err (fraction of ranks removed, 0 < err < 1) or "
                              "params_kept (fraction of target-matrix parameters kept, 0 < f ≤ 1)")
    kind, value = cfg.target
    if (kind == "err" and value > MAX_ERR) or (kind == "params_kept" and value < MIN_PARAMS_KEPT):
        raise InvalidArgument(
            f"{kind}={value:g} would leave no usable model: beyond ERR {MAX_ERR:g} (or below "
            f"{MIN_PARAMS_KEPT:.0%} of the parameters kept) a language model's perplexity explodes by orders of magnitude "
            "even with calibration. Ask for at most ERR 0.5 (0.6 of the parameters) and add --recover STEPS; for a "
            "smaller model, start from a smaller dense one")
    cal = cfg.calibration
    if cal is None:
        if cfg.method == "loss":
            raise InvalidArgument("method loss allocates ranks by their estimated cost on calibration text and needs "
                                  "calibration; choose calibration text or method welore/uniform")
        if cfg.experimental.sink_weight != 1.0:
            raise InvalidArgument("sink_weight weighs calibration tokens and needs calibration text")
        return
    if cal.compensate and cal.sequential is False:
        raise InvalidArgument("compensate fits o_proj/down_proj inside the sequential pass; enable sequential "
                              "or turn compensate off")
    if str(cal.data).lower() == NO_CALIBRATION:
        raise InvalidArgument("calibration data 'none' means no calibration: pass calibration=None instead")


def _to_dict(obj) -> dict:
    out = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        out[f.name] = _to_dict(v) if f.name in _SECTIONS and v is not None else v
    return out


def _from_dict(cls, data: dict, where: str):
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InvalidArgument(f"{where}: unknown key(s) {', '.join(unknown)}; expected some of {', '.join(sorted(names))}")
    kwargs = {}
    for k, v in data.items():
        if k in _SECTIONS and v is not None:
            if not isinstance(v, dict):
                raise InvalidArgument(f"{where}.{k} must be an object or null; received {type(v).__name__}")
            v = _from_dict(_SECTIONS[k], v, f"{where}.{k}")
        kwargs[k] = v
    return cls(**kwargs)


Number = Union[int, float]
