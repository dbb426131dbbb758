"""The welore config types (`welore_llama`, `welore_mistral`, `welore_qwen2`): the plain family's
config plus `welore_factored` {module name: rank}. Registered with transformers' AutoConfig, so
vLLM parses a factorised checkpoint's config.json with local code (its `auto_map`, the remote
code that plain transformers uses, is not needed)."""

from __future__ import annotations

import dataclasses

from transformers import AutoConfig, LlamaConfig, MistralConfig, Qwen2Config

def _factorised(base: type, model_type: str) -> type:
    name = f"Welore{base.__name__}"
    if dataclasses.is_dataclass(base):  # transformers versions whose configs are strict dataclasses
        from huggingface_hub.dataclasses import strict

        return strict(type(name, (base,), {"__module__": __name__, "model_type": model_type,
                                           "__annotations__": {"welore_factored": "dict | None"},
                                           "welore_factored": None}))

    def init(self, welore_factored=None, **kwargs):
        self.welore_factored = welore_factored
        base.__init__(self, **kwargs)

    return type(name, (base,), {"__module__": __name__, "model_type": model_type, "__init__": init})


WeloreLlamaConfig = _factorised(LlamaConfig, "welore_llama")  # module attributes: vLLM pickles them
WeloreMistralConfig = _factorised(MistralConfig, "welore_mistral")
WeloreQwen2Config = _factorised(Qwen2Config, "welore_qwen2")
CONFIGS = {cls.model_type: cls for cls in (WeloreLlamaConfig, WeloreMistralConfig, WeloreQwen2Config)}


def register_configs() -> None:
    for model_type, cls in CONFIGS.items():
        AutoConfig.register(model_type, cls, exist_ok=True)
