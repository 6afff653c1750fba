"""Tiny random checkpoints for tests, built from configs (no network): GPT-2 (Conv1D), LLaMA, Qwen2.

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


def tiny_config(family: str, n_layer: int = 4, hidden: int = 32, vocab_size: int | None = None):
    """A tiny config of one supported family: gpt2 (Conv1D weights stored [in, out]), llama or qwen2, with one
    embedding row per token of the tiny tokenizer unless `vocab_size` says otherwise."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    vocab = vocab_size or len(tiny_tokenizer())
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab, n_positions=128, n_embd=hidden, n_layer=n_layer, n_head=2,
                          bos_token_id=0, eos_token_id=0)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=n_layer,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, bos_token_id=0,
                  eos_token_id=0, pad_token_id=0, tie_word_embeddings=True)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(family)


def build_tiny_model(family: str, seed: int = 0, n_layer: int = 4, hidden: int = 32, vocab_size: int | None = None):
    """A tiny random model in eval mode; weights scaled up a little so spectra are not all alike."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, n_layer, hidden, vocab_size))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.2)
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
