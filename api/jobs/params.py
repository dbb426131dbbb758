"""Parameters of each job type, mirroring the `welore` command-line flags. Unknown fields and
values of the wrong type are refused, and every numeric field has a range that a 422 names."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model, model_validator

from welore_core.compression.config import OPTIONS, RECOVER_TEXT, CompressConfig, Option
from welore_core.errors import InvalidArgument


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


def _compress_field(o: Option):
    """A pydantic field for one recipe option: type, range and choices from compression.config."""
    typ = {float: float, int: int, bool: bool, str: str}[o.type]
    if o.choices:
        typ = Literal[o.choices]  # type: ignore[valid-type]
    bounds = {}
    if o.lo is not None:
        bounds["gt" if o.lo_open else "ge"] = o.lo
    if o.hi is not None:
        bounds["lt" if o.hi_open else "le"] = o.hi
    if typ is str:
        bounds.update(min_length=1, max_length=200)
    default = f" (default {o.default})" if o.default is not None else ""
    return (Optional[typ], Field(None, description=o.help + default, **bounds))


class _CompressBase(_Params):
    @model_validator(mode="after")
    def _recipe(self):
        options = {k: getattr(self, k) for k in OPTIONS}
        if (options["err"] is None) == (options["params_kept"] is None):
            raise ValueError("give exactly one of 'err' (0 < err < 1) and 'params_kept' (0 < params_kept ≤ 1)")
        try:
            CompressConfig.from_options(options)  # the recipe's own cross-checks
        except InvalidArgument as exc:
            raise ValueError(exc.message) from None
        return self


CompressParams = create_model(
    "CompressParams", __base__=_CompressBase, __doc__="`welore compress`: the recipe options of CompressConfig "
    "(give exactly one of `err` and `params_kept`), plus what to do with the result.",
    **{o.name: _compress_field(o) for o in OPTIONS.values()},
    merged=(bool, Field(False, description="also export merged dense weights (artifacts under merged/)")),
    recover=(int, Field(0, ge=0, le=100_000, description="then fine-tune the low-rank factors for this many steps, "
                        f"distilled from the source model ({RECOVER_TEXT}; 0: no recovery)")),
    recover_data=(Optional[str], Field(None, min_length=1, max_length=200,
                                       description="text for recover: an uploaded file id or a built-in name "
                                                   "(default: the shipped general text)")))


class FinetuneParams(_Params):
    """`welore finetune`: WeLore-COFT (train only the low-rank factors) or a baseline."""

    data: str = Field(..., min_length=1, max_length=200,
                      description="an uploaded file id (file_...) or a built-in dataset name")
    data_format: Literal["auto", "text", "prompt_completion", "boolq", "commonsenseqa"] = "auto"
    method: Literal["welore", "full", "lora"] = "welore"
    steps: int = Field(100, ge=1, le=1_000_000)
    lr: float = Field(2e-4, gt=0, lt=1)
    batch_size: int = Field(4, ge=1, le=4096)
    seq_len: int = Field(256, ge=8, le=32_768)
    grad_accum: int = Field(1, ge=1, le=1024)
    eval_every: int = Field(0, ge=0, le=1_000_000)
    save_every: int = Field(0, ge=0, le=1_000_000)
    freeze_norms: bool = False
    lora_rank: int = Field(8, ge=1, le=4096)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    # Engine defaults apply to whatever is left out.
    warmup_steps: Optional[int] = Field(None, ge=-1, le=1_000_000)
    min_lr_ratio: Optional[float] = Field(None, ge=0, le=1)
    weight_decay: Optional[float] = Field(None, ge=0, le=10)
    max_grad_norm: Optional[float] = Field(None, ge=0, le=1e6)
    lora_alpha: Optional[float] = Field(None, gt=0, le=1e6)
    val_fraction: Optional[float] = Field(None, ge=0, lt=1)
    val_sequences: Optional[int] = Field(None, ge=1, le=100_000)
    choice_examples: Optional[int] = Field(None, ge=0, le=100_000)
    gradient_checkpointing: Optional[bool] = None
    precision: Optional[Literal["auto", "fp32", "bf16"]] = None
    frozen_dtype: Optional[Literal["auto", "bf16", "fp32"]] = Field(
        None, description="dtype of the frozen weights while training (auto: bf16 on a GPU, fp32 on a CPU); "
                          "trainable factors keep fp32 master weights")
    teacher: Optional[model_name_field(500, "distil from this model (named like `model`), e.g. the one the "
                                            "checkpoint was compressed from")] = None
    distill_weight: Optional[float] = Field(None, gt=0, le=1,
                                            description="with a teacher: share of the KL term in the loss")
    dtype: Optional[Literal["auto", "bf16", "fp16", "fp32"]] = Field(
        None, description="dtype of the written weights (default auto: the source's)")
    merged: bool = Field(False, description="also export merged dense weights (artifacts under merged/)")


class EvaluateParams(_Params):
    """`welore eval`: perplexity on fixed windows."""

    data: str = Field("boolq", min_length=1, max_length=200,
                      description="an uploaded file id (file_...) or a built-in dataset name")
    seq_len: int = Field(512, ge=2, le=32_768)
    windows: int = Field(24, ge=1, le=100_000)


PARAMS = {"compress": CompressParams, "finetune": FinetuneParams, "evaluate": EvaluateParams}
# Parameters naming a dataset (an uploaded file or a built-in name), resolved at submit time.
DATA_PARAMS = ("data", "calibration", "recover_data")
# Parameters naming a model (like `model`), resolved at submit time into the job's model_ref.
MODEL_PARAMS = ("teacher",)
