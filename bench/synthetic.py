"""Synthetic Llama-family checkpoints of real shapes, written as bf16 safetensors shards.

Every target matrix is a random low-rank matrix plus noise (rank and noise level drawn per
matrix, so spectra differ as in trained models), scaled like a trained layer (activations stay
O(1) through the depth), with its rows scaled by a random positive diagonal per layer (so each
layer's spectra differ too, and a 32-layer model costs one layer's matrix products); embeddings, norms and an untied LM head are random too. The tokenizer is
SmolLM2's, from the registry model's cached conversion (vocab 49,152), so the checkpoint can be
evaluated and calibrated. Written layer by layer through the layer pipeline's shard writer:
generating an 8B-shaped model holds one layer in memory.

    python -m bench.synthetic OUT --shape llama3-8b [--layers N]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

SHAPES = {
    # hidden, intermediate, heads, kv_heads
    "llama3-8b": dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256),
    "small": dict(hidden=1024, intermediate=4096, heads=16, kv_heads=4),
    "bench": dict(hidden=512, intermediate=1536, heads=8, kv_heads=2),
    "tiny": dict(hidden=64, intermediate=160, heads=4, kv_heads=2),
}


def smollm2_tokenizer():
    from welore_core.loading import gguf_to_safetensors, load_tokenizer, registry_path

    return load_tokenizer(str(gguf_to_safetensors(registry_path("smollm2-135m"))))


def _matrix(m: int, n: int, g: torch.Generator) -> torch.Tensor:
    r = min(m, n)
    k = int(torch.randint(max(2, r // 32), max(3, r // 6), (1,), generator=g))
    noise = float(torch.rand(1, generator=g)) * 0.4 + 0.05
    W = torch.randn(m, k, generator=g) @ torch.randn(k, n, generator=g) / math.sqrt(k)
    W.add_(torch.randn(m, n, generator=g), alpha=noise)
    return W.mul_(1.0 / math.sqrt(n * (1 + noise ** 2)))


def layer_shapes(hidden: int, intermediate: int, heads: int, kv_heads: int) -> dict[str, tuple[int, int]]:
    head_dim = hidden // heads
    return {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv_heads * head_dim, hidden),
            "self_attn.v_proj": (kv_heads * head_dim, hidden), "self_attn.o_proj": (hidden, hidden),
            "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
            "mlp.down_proj": (hidden, intermediate)}


def layer_tensors(L: int, base: dict[str, torch.Tensor], hidden: int, g: torch.Generator,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Layer L: each base matrix with rows scaled by a random positive diagonal of its own (its
    spectrum differs from every other layer's; no new matrix product, so an 8B shape is quick)."""
    p = f"model.layers.{L}."
    out = {}
    for name, W in base.items():
        d = torch.exp(0.3 * torch.randn(W.shape[0], 1, generator=g))
        out[f"{p}{name}.weight"] = (W * d).to(dtype)
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[f"{p}{norm}.weight"] = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    return out


def write_synthetic(out: Path | str, *, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
                    dtype: torch.dtype = torch.bfloat16, seed: int = 0, shard_bytes: int = 2 << 30,
                    tokenizer=None, vocab: int | None = None) -> Path:
    """Write the checkpoint (config.json, tokenizer, sharded weights + index) to `out`."""
    from transformers import LlamaConfig

    from welore_core.layerwise.writer import ShardWriter

    tokenizer = tokenizer if tokenizer is not None else smollm2_tokenizer()
    vocab = max(vocab or 0, len(tokenizer))  # a larger vocab (Llama-3's 128,256) pads SmolLM2's 49,152
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
                         dtype=str(dtype).removeprefix("torch."))
    if tokenizer is not None:
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    el = torch.empty((), dtype=dtype).element_size()
    head_dim = hidden // heads
    per_layer = (2 * hidden * hidden + 2 * kv_heads * head_dim * hidden + 3 * hidden * intermediate + 2 * hidden) * el
    units = [(f"layer.{L}", per_layer) for L in range(layers)] + [("other", (2 * vocab * hidden + hidden) * el)]
    writer = ShardWriter(Path(out), f"synthetic|{layers}|{hidden}|{intermediate}|{heads}|{kv_heads}|{vocab}|{dtype}|{seed}")
    writer.plan(units, shard_bytes)
    g = torch.Generator().manual_seed(seed)
    base = {name: _matrix(m, n, g) for name, (m, n) in layer_shapes(hidden, intermediate, heads, kv_heads).items()}
    for L in range(layers):
        g.manual_seed(seed * 1000 + L)
        if not writer.done(f"layer.{L}"):
            writer.add(f"layer.{L}", layer_tensors(L, base, hidden, g, dtype))
    g.manual_seed(seed * 1000 + 999)
    writer.add("other", {"model.embed_tokens.weight": (torch.randn(vocab, hidden, generator=g) * 0.5).to(dtype),
                         "model.norm.weight": torch.ones(hidden, dtype=dtype),
                         "lm_head.weight": (torch.randn(vocab, hidden, generator=g) / math.sqrt(hidden)).to(dtype)})

    def fill(d: Path) -> None:
        config.save_pretrained(str(d))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(d))

    return writer.finish(fill, overwrite=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: 32 for llama3-8b, 4 otherwise)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    layers = args.layers or (32 if args.shape == "llama3-8b" else 4)
    print(write_synthetic(args.out, layers=layers, seed=args.seed, **SHAPES[args.shape]))


if __name__ == "__main__":
    main()
