"""The portable checkpoint: modelling code shipped inside every factorised checkpoint.

  modeling_welore.py  LowRankLinear and the Welore* config/model classes (torch + transformers)
  integrity.py        the SHA-256 record of weight files (standard library only)

Both files are copied into a checkpoint and named by config.json's `auto_map`; nothing here
may import welore_core. This package's own helpers (torch-free at import) turn a config into
its factorised or plain form and register the classes with transformers' Auto classes, so
welore_core reads such checkpoints without remote code.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
CODE_FILES = ("modeling_welore.py", "integrity.py")
MODULE = "modeling_welore"
_NOT_PLAIN = ("welore_factored", "auto_map", "architectures", "model_type", "transformers_version")


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM know the Welore* classes (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .modeling_welore import FAMILIES

    for config_cls, model_cls in FAMILIES.values():
        try:
            AutoConfig.register(config_cls.model_type, config_cls)
            AutoModelForCausalLM.register(config_cls, model_cls)
        except ValueError:  # already registered
            pass


def is_factorised(config) -> bool:
    return str(getattr(config, "model_type", "")).startswith("welore_")


def _plain_dict(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in _NOT_PLAIN}


def plain_config(config):
    """The plain transformers config (e.g. LlamaConfig) of a factorised or plain `config`."""
    if not is_factorised(config):
        return type(config).from_dict(config.to_dict())  # a copy: callers may change it
    from .modeling_welore import FAMILIES

    base = next(m._welore_plain_class for c, m in FAMILIES.values() if c.model_type == config.model_type)
    return base.config_class.from_dict(_plain_dict(config))


def factorised_config(config, factored: dict[str, int]):
    """`config` as the factorised family config listing `factored`, with the auto_map that points
    transformers at the shipped code; the plain config itself when nothing is factored."""
    from .modeling_welore import FAMILIES

    plain = plain_config(config)
    if not factored:
        return plain
    family = FAMILIES.get(plain.model_type)
    if family is None:
        from ..errors import UnsupportedModel

        raise UnsupportedModel(f"model_type {plain.model_type!r} has no portable factorised form; expected one "
                               f"of {', '.join(FAMILIES)}")
    config_cls, model_cls = family
    out = config_cls.from_dict({**_plain_dict(plain), "welore_factored": dict(factored)})
    out.auto_map = {"AutoConfig": f"{MODULE}.{config_cls.__name__}",
                    "AutoModelForCausalLM": f"{MODULE}.{model_cls.__name__}"}
    out.architectures = [model_cls.__name__]
    return out


def as_factorised(model, factored: dict[str, int]):
    """Turn a transformers model whose `factored` linears are LowRankLinear into the portable
    class in place (its own save_pretrained then writes a portable checkpoint); returns it."""
    from .modeling_welore import FAMILIES

    config = factorised_config(model.config, factored)
    if not factored:
        return model
    model.config.__class__ = type(config)
    model.config.welore_factored = dict(factored)
    model.config.auto_map = config.auto_map
    model.config.architectures = config.architectures
    model.__class__ = FAMILIES[plain_config(config).model_type][1]
    return model
