"""Tiny seeded Llama models and a byte tokenizer for exact-maths tests (import: `from tiny_llama import ...`)."""

import torch


def make_tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, intermediate: int = 160,
                    heads: int = 4, kv_heads: int = 2, vocab: int = 256, tie: bool = True,
                    low_rank_signal: bool = True):
    """A seeded random LlamaForCausalLM with GQA. With `low_rank_signal`, each target matrix is a
    random low-rank matrix plus noise of its own scale, so spectra differ between matrices."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=256, tie_word_embeddings=tie)
    model = LlamaForCausalLM(config).eval()
    if low_rank_signal:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, mod in model.named_modules():
                if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
                    m, n = mod.weight.shape
                    k = int(torch.randint(2, min(m, n) // 2, (1,), generator=g))
                    signal = torch.randn(m, k, generator=g) @ torch.randn(k, n, generator=g) / k ** 0.5
                    noise = torch.randn(m, n, generator=g) * float(torch.rand(1, generator=g) * 0.3 + 0.02)
                    mod.weight.copy_((signal + noise) * 0.05)
    return model


class ByteTokenizer:
    """A minimal tokenizer (bytes → ids) for tiny-model tests that need one."""

    pad_token = "<pad>"
    eos_token = "<eos>"
    pad_token_id = 0
    eos_token_id = 1

    def __call__(self, text, add_special_tokens=False, **kw):
        return {"input_ids": [2 + (b % 254) for b in text.encode("utf-8")]}

    def save_pretrained(self, path):
        return None


def train_tokenizer(docs, vocab_size: int = 300):
    """A small byte-level BPE tokenizer (a real, saveable one) trained on `docs`; ids < vocab_size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(docs + ["Question: Answer: yes no A B C D E"], trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>")
