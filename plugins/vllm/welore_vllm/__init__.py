"""vLLM plug-in for WeLore checkpoints: vLLM calls `register()` in each of its processes (entry
point `vllm.general_plugins`), which makes the welore config types known to transformers and the
welore architectures known to vLLM. Then `vllm.LLM(model=CKPT)` and `vllm serve CKPT` load a
factorised checkpoint with its low-rank factors kept (no trust_remote_code needed)."""

from __future__ import annotations

ARCHITECTURES = ("WeloreLlamaForCausalLM", "WeloreMistralForCausalLM", "WeloreQwen2ForCausalLM")


def register() -> None:
    """Idempotent: vLLM may call it several times in one process."""
    from vllm import ModelRegistry

    from .configs import register_configs

    register_configs()
    known = set(ModelRegistry.get_supported_archs())
    for arch in ARCHITECTURES:
        if arch not in known:
            ModelRegistry.register_model(arch, f"welore_vllm.models:{arch}")
