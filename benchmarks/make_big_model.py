"""Write a random-initialised Llama model of a published size to disk, one shard per decoder block, never holding
more than one block: the test model of README "Models larger than memory" (a model larger than this machine).

    python benchmarks/make_big_model.py --shapes llama2-7b --dtype float32 --out /work/bigmodel

The folder gets config.json (the published shapes), one safetensors shard per block and one for the embeddings,
final norm and lm_head, model.safetensors.index.json (written last), and stories260K's sentencepiece tokenizer
(ids < 512, inside the 32000-token vocabulary; the shared data hold no LLaMA tokenizer). Weights are N(0, 0.02)
as transformers initialises Llama, norms 1; each tensor from its own seeded generator.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import zlib
from pathlib import Path

import torch
from tqdm.auto import tqdm

from magr.pipeline.memory import LLAMA2
from magr.pipeline.models import DTYPES
from magr.pipeline.shards import shard_name, write_index, write_safetensors
from magr.pipeline.sources import stories260k_path

SHAPES = {f"llama2-{k.lower()}": s for k, s in LLAMA2.items()}


def config_of(shapes, dtype: str, layers: int | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=shapes.hidden, intermediate_size=shapes.intermediate,
                       num_hidden_layers=layers or shapes.layers, num_attention_heads=shapes.heads,
                       num_key_value_heads=shapes.kv_heads, vocab_size=shapes.vocab, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, dtype=dtype)


def random_tensor(name: str, shape, dtype: torch.dtype) -> torch.Tensor:
    """Norm weights 1, every other weight N(0, 0.02), seeded by the tensor's name."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return (0.02 * torch.randn(shape, generator=g)).to(dtype)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="llama2-7b", choices=sorted(SHAPES))
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--layers", type=int, default=None, help="fewer decoder blocks than the published model")
    p.add_argument("--out", required=True, help="a new folder")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    config = config_of(SHAPES[args.shapes], args.dtype, args.layers)
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    n = config.num_hidden_layers + 1
    groups = [[k for k in shapes if k.startswith(f"model.layers.{i}.")] for i in range(n - 1)]
    groups.append([k for k in shapes if not k.startswith("model.layers.")])
    weight_map, total = {}, 0
    for i, names in enumerate(tqdm(groups, desc="shards", unit="shard")):
        tensors = {k: random_tensor(k, shapes[k], DTYPES[args.dtype]) for k in names}
        write_safetensors(out / shard_name(i, n), tensors)
        weight_map.update(dict.fromkeys(names, shard_name(i, n)))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    config.save_pretrained(out)
    shutil.copyfile(stories260k_path() / "tokenizer.model", out / "tokenizer.model")
    write_index(out, weight_map, total)
    logging.getLogger("make_big_model").info("wrote %s: %d shards, %.2f GB (%s, %s)", out, n, total / 1e9,
                                             args.shapes, args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
