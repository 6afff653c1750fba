"""Write a random-weight LLaMA-shaped checkpoint folder (sharded safetensors, bf16 by default) for scale tests.

The weights are random, the files are real: config.json, shards of about --shard-gb each and the index, as
`save_pretrained` writes them. Tensors are generated and written one at a time, so a 7B-shaped folder (13.5 GB in bf16)
is made with well under 1 GB of memory.

Example: python benchmarks/make_random_checkpoint.py /tmp/llama7b --shape llama-7b
         python benchmarks/make_random_checkpoint.py /tmp/tinyllama --shape tinyllama-1.1b   (1.10B parameters, 2.2 GB)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from prunecli.core.safetensors_stream import DTYPE_NAMES, TensorSource, write_safetensors

SHAPES = {  # hidden, intermediate, layers, heads, key/value heads, vocab
    "llama-7b": (4096, 11008, 32, 32, 32, 32000),
    "llama-1b": (2048, 5632, 22, 32, 32, 32000),  # TinyLlama's sizes without its grouped-query attention: 1.26B
    "tinyllama-1.1b": (2048, 5632, 22, 32, 4, 32000),  # TinyLlama-1.1B: 4 key/value heads, 1.10B parameters
    "tiny": (256, 688, 2, 4, 4, 1000),
}


def tensor_shapes(hidden: int, inter: int, layers: int, heads: int, kv_heads: int,
                  vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    kv = hidden // heads * kv_heads
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
        shapes += [(p + f"self_attn.{m}_proj.weight", (kv if m in "kv" else hidden, hidden)) for m in "qkvo"]
        shapes += [(p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, inter))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-7b")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--shard-gb", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    hidden, inter, layers, heads, kv_heads, vocab = SHAPES[args.shape]
    args.out.mkdir(parents=True, exist_ok=False)
    gen = torch.Generator().manual_seed(args.seed)

    def make(shape: tuple[int, ...]) -> torch.Tensor:
        if len(shape) == 1:
            return torch.ones(shape, dtype=dtype)
        return (torch.randn(shape, generator=gen) * shape[-1] ** -0.5).to(dtype)

    shapes = tensor_shapes(hidden, inter, layers, heads, kv_heads, vocab)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = itemsize * int(torch.tensor(shape).prod())
        if shards[-1] and size + nbytes > args.shard_gb * 2**30:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        sources = [TensorSource(n, DTYPE_NAMES[dtype], s, (lambda s=s: make(s))) for n, s in shard]
        write_safetensors(args.out / fname, sources, {"format": "pt"})
        weight_map.update({n: fname for n, _ in shard})
        print(f"wrote {fname} ({len(shard)} tensors)", flush=True)
    total = sum(itemsize * int(torch.tensor(s).prod()) for _, s in shapes)
    (args.out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": str(dtype).split(".")[-1]}
    (args.out / "config.json").write_text(json.dumps(config, indent=2))
    print(f"{sum(int(torch.tensor(s).prod()) for _, s in shapes) / 1e9:.3g}B parameters, {total / 2**30:.3g} GiB")


if __name__ == "__main__":
    main()
