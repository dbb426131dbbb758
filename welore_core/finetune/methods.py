"""What trains under each method, decided in one place, plus parameter counting.

  welore  WeLore-COFT: only the factors A, B of the Low-Rank Components (LowRankLinear)
          train; N-LRC dense weights, embeddings and LM head stay frozen; norm weights train
          unless `freeze_norms`.
  full    every parameter of the given model (dense or compressed) trains.
  lora    peft LoRA adapters (rank r) on the target matrices (q,k,v,o,gate,up,down) of a
          dense model; the base model is frozen. Merged into the weights before saving.
Frozen parameters have requires_grad=False, so they get no gradient buffer and no
optimizer state.
"""

from __future__ import annotations

from torch import nn

from ..errors import InvalidArgument
from ..lowrank import LowRankLinear
from ..targets import TARGET_SUFFIXES, decoder_layers
from .config import FinetuneConfig


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def unique_parameters(model: nn.Module):
    """(name, parameter) once per tensor (a tied LM head is the embedding: counted once)."""
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            yield name, p


def count_parameters(model: nn.Module) -> dict:
    total = trainable = 0
    for _, p in unique_parameters(model):
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {"total": total, "trainable": trainable, "frozen": total - trainable,
            "trainable_pct": 100.0 * trainable / total if total else 0.0}


def n_lrc(model: nn.Module) -> int:
    return sum(isinstance(m, LowRankLinear) for m in model.modules())


def apply_method(model: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    """Set requires_grad per the method; for lora, wrap in a peft model. Returns the model
    to train (the same object, or the peft wrapper)."""
    decoder_layers(model)
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.method == "welore":
        lrcs = [m for m in model.modules() if isinstance(m, LowRankLinear)]
        if not lrcs:
            raise InvalidArgument("method 'welore' trains the Low-Rank Components of a compressed model, but "
                                  "this model has none (it is dense, or compression kept every matrix dense). "
                                  "Compress it first (welore compress MODEL --err 0.5 --out DIR) or use "
                                  "--method full or --method lora")
        for m in lrcs:
            m.A.requires_grad_(True)
            m.B.requires_grad_(True)
        if not cfg.freeze_norms:
            for m in model.modules():
                if is_norm(m):
                    for p in m.parameters(recurse=False):
                        p.requires_grad_(True)
        return model
    if cfg.method == "lora":
        if n_lrc(model):
            raise InvalidArgument("method 'lora' adds adapters to the dense target matrices of an uncompressed "
                                  f"model; this model has {n_lrc(model)} low-rank (factored) layers. Use --method "
                                  "welore to train those, or give the dense model")
        from peft import LoraConfig, get_peft_model

        present = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                          if isinstance(m, nn.Linear) and n.startswith("model.layers.")
                          and n.rsplit(".", 1)[-1] in TARGET_SUFFIXES})
        lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=present, bias="none", task_type="CAUSAL_LM")
        return get_peft_model(model, lcfg)
    raise InvalidArgument(f"unknown method {cfg.method!r}")


def base_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside a (possibly peft-wrapped) model."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _is_peft(model: nn.Module) -> bool:
    """A peft wrapper (LoRA). Not `hasattr(merge_and_unload)`: factorised models have one too."""
    return callable(getattr(model, "get_base_model", None))


def finalize(model: nn.Module) -> nn.Module:
    """The model to save: LoRA adapters merged into the weights, everything else as is."""
    if _is_peft(model):
        return model.merge_and_unload()
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """A merged copy to save mid-run without touching the model being trained."""
    if _is_peft(model):
        import copy

        return copy.deepcopy(model).merge_and_unload()
    return model
