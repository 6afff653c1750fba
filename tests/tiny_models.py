"""Tiny random checkpoints for tests, built from configs (no network), one per family the adapters support: GPT-2
(Conv1D), GPT-J, GPT-NeoX, LLaMA, Mistral, Qwen2, Qwen3, Gemma, Gemma-2 and Gemma-3 (post-MLP norms).

Each model folder is what `save_pretrained` writes (config, safetensors weights, tokenizer), optionally sharded and in
fp16/bf16, so tests exercise the same files users have. The tokenizer is a byte-level BPE trained on a few sentences,
so any text tokenizes.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

CORPUS = [
    "The Eiffel Tower is located in Paris, the capital of France.",
    "Danielle Darrieux's mother tongue is French. Her native language is French.",
    "Michael Jordan plays the sport of basketball. He played for the Chicago Bulls.",
    "The Space Needle is in Seattle. Toko Yasuda plays the guitar and the piano.",
    "Apple A5 was created by Apple. Windows was created by Microsoft. English, German, Italian, Spanish.",
] * 4


@lru_cache(maxsize=2)
def tiny_tokenizer(reserved: int = 0):  # -> transformers.PreTrainedTokenizerFast
    """The byte-level BPE of the tiny models (400 tokens). `reserved` > 0 gives another model's tokenizer for the
    same text: that many reserved special tokens come first, pushing the ids of ordinary text up."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    specials = ["<|endoftext|>", *(f"<|reserved_{i}|>" for i in range(reserved))]
    bpe.train_from_iterator(CORPUS, vocab_size=400 + reserved, min_frequency=1, special_tokens=specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    return tok


FAMILIES = ("gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
POST_MLP_NORM_FAMILIES = ("gemma2", "gemma3_text")


def tiny_config(family: str, n_layer: int = 4, hidden: int = 32, vocab_size: int | None = None):
    """A tiny config of one supported model type (`FAMILIES`); GPT-2 stores Conv1D weights [in, out]. One
    embedding row per token of the tiny tokenizer unless `vocab_size` says otherwise."""
    import transformers as tf

    vocab = vocab_size or len(tiny_tokenizer())
    ids = dict(bos_token_id=0, eos_token_id=0)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_positions=128, n_embd=hidden, n_layer=n_layer, n_head=2, **ids)
    if family == "gptj":
        return tf.GPTJConfig(vocab_size=vocab, n_positions=128, n_embd=hidden, n_layer=n_layer, n_head=2,
                             rotary_dim=8, **ids)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3,
                                num_hidden_layers=n_layer, num_attention_heads=2, max_position_embeddings=128, **ids)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=n_layer,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, pad_token_id=0,
                  tie_word_embeddings=True, **ids)
    gemma = dict(head_dim=hidden // 2, sliding_window=4, query_pre_attn_scalar=hidden // 2)
    configs = {
        "llama": lambda: tf.LlamaConfig(**common),
        "mistral": lambda: tf.MistralConfig(**common),
        "qwen2": lambda: tf.Qwen2Config(**common),
        "qwen3": lambda: tf.Qwen3Config(head_dim=hidden // 2, **common),
        "gemma": lambda: tf.GemmaConfig(head_dim=hidden // 2, **common),
        # Sliding-window layers with a window shorter than the prompts, so the hybrid cache is exercised.
        "gemma2": lambda: tf.Gemma2Config(**gemma, **common),
        "gemma3_text": lambda: tf.Gemma3TextConfig(**gemma, **common),
    }
    if family not in configs:
        raise ValueError(family)
    return configs[family]()


def build_tiny_model(family: str, seed: int = 0, n_layer: int = 4, hidden: int = 32, vocab_size: int | None = None):
    """A tiny random model in eval mode; weights scaled up a little so spectra are not all alike. Post-MLP norms get
    large random gains, as in the real Gemma-2/3 (where they scale the MLP output up by ~250x)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, n_layer, hidden, vocab_size))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.2)
            elif "post_feedforward_layernorm" in name:
                p.copy_(torch.rand_like(p) * 20.0)  # Gemma norms scale by (1 + weight)
    return model.eval()


def save_tiny_model(family: str, path: Path, dtype: torch.dtype = torch.float32, shard_size: str | None = None,
                    seed: int = 0, n_layer: int = 4, hidden: int = 32, vocab_size: int | None = None,
                    tokenizer: bool = True) -> Path:
    """Save a tiny random model folder (optionally sharded with `shard_size`, e.g. "20KB"); `tokenizer=False` leaves
    the tokenizer files out, as `model.save_pretrained` alone does."""
    model = build_tiny_model(family, seed, n_layer, hidden, vocab_size).to(dtype)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, **kwargs)
    if tokenizer:
        tiny_tokenizer().save_pretrained(path)
    return path
