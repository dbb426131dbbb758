"""Parameters of each job type, derived from the option table of the config the worker runs
(CompressConfig, FinetuneConfig, EvaluateConfig; welore_core/options.py), like the `welore` flags:
one field per option, with the table's type, range, choices and (in the schema) default. Unknown
fields and values of the wrong type are refused, every numeric field has a range that a 422 names,
and each model builds the job's config, so whatever the worker would refuse is a 422 here."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model, model_validator

from welore_core import evaluate_config
from welore_core.compression.config import OPTIONS, RECOVER_TEXT, CompressConfig
from welore_core.errors import InvalidArgument
from welore_core.finetune import config as finetune_config
from welore_core.options import Option


NAME_PART_BYTES = 255  # a file system's limit on one path component (a folder name under WELORE_MODELS_DIR)


def _model_name(value: str) -> str:
    """A model name is a registry name, a job id or a folder path: no part of it may exceed what a
    folder name can hold, so such a name is malformed (422) rather than unknown."""
    for part in value.split("/"):
        if len(part.encode("utf-8", "surrogatepass")) > NAME_PART_BYTES:
            raise ValueError(f"each '/'-separated part of a model name is at most {NAME_PART_BYTES} bytes (a folder "
                             f"name); received a part of {len(part.encode('utf-8', 'surrogatepass'))} bytes")
    return value


def model_name_field(max_length: int, description: str):
    """The type of a field naming a model (the job's `model`, a fine-tuning `teacher`)."""
    return Annotated[str, Field(min_length=1, max_length=max_length, description=description),
                     AfterValidator(_model_name)]


class _Params(BaseModel):
    """Strict: a value of the wrong JSON type is refused (`"err": "0.3"`, `"merged": 1`), never
    converted; unknown fields are refused; NaN and ±Infinity are no numbers."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def option_field(o: Option, typ=None):
    """A pydantic field for one option-table entry: type, range and choices from the table. Left out (or
    null) it is None, which the config reads as its own default; the schema shows that default (the
    console's form does too)."""
    typ = typ or {float: float, int: int, bool: bool, str: str}[o.type]
    if o.choices:
        # Annotated with the name: Literals of the same choices in another order compare equal, and the schema of
        # one would list the other's order
        typ = Annotated[Literal[o.choices], o.name]  # type: ignore[valid-type]
    bounds = {}
    if o.lo is not None:
        bounds["gt" if o.lo_open else "ge"] = o.lo
    if o.hi is not None:
        bounds["lt" if o.hi_open else "le"] = o.hi
    if typ is str:
        bounds.update(min_length=1, max_length=200)
    shown = o.default not in (None, "")
    default = f" (default {str(o.default).lower() if o.type is bool else o.default})" if shown else ""
    return (Optional[typ], Field(None, description=o.help + default, **bounds,
                                 json_schema_extra={"default": o.default} if shown else None))


def _config_check(build, options: dict) -> None:
    """Build the job's config as the worker will: its own refusal (a cross-check) is a 422."""
    try:
        build(options)
    except InvalidArgument as exc:
        raise ValueError(exc.message) from None


_MERGED = (bool, Field(False, description="also export merged dense weights (artifacts under merged/)"))


class _CompressBase(_Params):
    @model_validator(mode="after")
    def _recipe(self):
        options = {k: getattr(self, k) for k in OPTIONS}
        if (options["err"] is None) == (options["params_kept"] is None):
            raise ValueError("give exactly one of 'err' (0 < err < 1) and 'params_kept' (0 < params_kept ≤ 1)")
        _config_check(CompressConfig.from_options, options)  # the recipe's own cross-checks
        return self


CompressParams = create_model(
    "CompressParams", __base__=_CompressBase, __doc__="`welore compress`: the recipe options of CompressConfig "
    "(give exactly one of `err` and `params_kept`), plus what to do with the result.",
    **{o.name: option_field(o) for o in OPTIONS.values()},
    merged=_MERGED,
    recover=(int, Field(0, ge=0, le=100_000, description="then fine-tune the low-rank factors for this many steps, "
                        f"distilled from the source model ({RECOVER_TEXT}; 0: no recovery)")),
    recover_data=(Optional[str], Field(None, min_length=1, max_length=200,
                                       description="text for recover: an uploaded file id or a built-in name "
                                                   "(default: the shipped general text)")))


def _validated_by(build, table: dict) -> type:
    """A params base whose model builds the config from the table's fields (None: its default)."""
    class Base(_Params):
        @model_validator(mode="after")
        def _config(self):
            _config_check(build, {k: getattr(self, k) for k in table})
            return self
    return Base


_TEACHER = model_name_field(500, "distil from this model (named like `model`), e.g. the one the checkpoint was "
                                 "compressed from")
FinetuneParams = create_model(
    "FinetuneParams", __base__=_validated_by(finetune_config.FinetuneConfig.from_options, finetune_config.OPTIONS),
    __doc__="`welore finetune`: WeLore-COFT (train only the low-rank factors) or a baseline; the options of "
    "FinetuneConfig.",
    data=(str, Field(..., min_length=1, max_length=200,
                     description="an uploaded file id (file_...) or a built-in dataset name")),
    **{o.name: option_field(o, _TEACHER if o.name == "teacher" else None) for o in finetune_config.OPTIONS.values()},
    merged=_MERGED)


EvaluateParams = create_model(
    "EvaluateParams", __base__=_validated_by(evaluate_config.EvaluateConfig.from_options, evaluate_config.OPTIONS),
    __doc__="`welore eval`: perplexity on fixed windows; the options of EvaluateConfig.",
    data=(str, Field(evaluate_config.DEFAULT_DATA, min_length=1, max_length=200,
                     description="an uploaded file id (file_...) or a built-in dataset name")),
    **{o.name: option_field(o) for o in evaluate_config.OPTIONS.values()})


PARAMS = {"compress": CompressParams, "finetune": FinetuneParams, "evaluate": EvaluateParams}
# Parameters naming a dataset (an uploaded file or a built-in name), resolved at submit time.
DATA_PARAMS = ("data", "calibration", "recover_data")
# Parameters naming a model (like `model`), resolved at submit time into the job's model_ref.
MODEL_PARAMS = ("teacher",)
