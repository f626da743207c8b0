"""GGUF checkpoints for llama.cpp (and the tools built on it): the grids that GGUF stores exactly.

GGUF quantizes each row in blocks of 32 weights. Two block types hold our grids without re-rounding a code:

- ``Q4_1`` (4-bit asymmetric): per block a float16 scale d and minimum m, codes q in 0..15, w = d q + m.
  Ours is w = s (q - z) = s q - s z, so d = fp16(s), m = fp16(-s z), same codes; per channel or per group of a
  multiple of 32 (each block lies inside one group).
- ``Q8_0`` (8-bit symmetric): per block a float16 scale d and int8 codes, w = d q'. Ours (zero 128) is
  s (q - 128), so d = fp16(s), q' = q - 128 in -128..127.

Every other grid (2/3 bits, symmetric 4-bit, asymmetric 8-bit, groups that are not a multiple of 32, permuted
g_idx) is refused before any work, and so is a layer whose input width is not a multiple of 32 (llama.cpp
reads rows of whole blocks: padding would change the tensor shape it expects). Embeddings, norms and lm_head
are stored in float16 (1-D norms in float32, as llama.cpp's converter writes them). Names, the Q/K row
permutation and the metadata follow llama.cpp's converter for the Llama architecture; the tokenizer is
written from a sentencepiece ``tokenizer.model`` (vocabulary, scores, types) or a BPE ``tokenizer.json``
(vocabulary and merges). For a BPE tokenizer llama.cpp also needs the pre-tokenizer type
(``tokenizer.ggml.pre``): its converter tells it by the hash of the tokenizer's ids for a fixed text; the same is
done here for the Llama-family types in :data:`BPE_PRE` (an unknown hash is logged and the key left out; llama.cpp
then warns and uses its default pre-tokenizer).

The file is read back with the ``gguf`` package's reader and every de-quantized weight compared with ours
(:func:`check_gguf`): they must agree within the float16 rounding of d and m.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..core.quantizers import Grid

log = logging.getLogger(__name__)

BLOCK = 32
GGUF_FILE = "model.gguf"
#: linear layer name -> GGUF tensor name (llama.cpp's LLM_TENSOR names), for block i
LINEAR_TENSORS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
ALTERNATIVES = "the gptq or compressed-tensors format (any bits, symmetric or not)"
#: the text llama.cpp's converter (convert_hf_to_gguf.py, get_vocab_base_pre) encodes to tell BPE pre-tokenizers
#: apart, verbatim
PRE_CHECK_TEXT = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'
#: sha256 of str(tokenizer.encode(PRE_CHECK_TEXT)) -> llama.cpp pre-tokenizer type (from its converter)
BPE_PRE = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM(2)
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
}


def gguf_type(grid: Grid) -> str:
    """``Q4_1`` or ``Q8_0`` for a grid GGUF stores exactly; else ValueError naming what is allowed."""
    if grid.group_size is not None and grid.group_size % BLOCK:
        raise ValueError(f"group_size {grid.group_size} cannot be stored in GGUF, whose blocks hold {BLOCK} weights; "
                         f"allowed: per channel or a multiple of {BLOCK}, or {ALTERNATIVES}")
    if grid.bits == 4 and not grid.sym:
        return "Q4_1"
    if grid.bits == 8 and grid.sym:
        return "Q8_0"
    kind = "symmetric" if grid.sym else "asymmetric"
    raise ValueError(f"a {grid.bits}-bit {kind} grid has no exact GGUF type; allowed: 4-bit asymmetric (Q4_1: "
                     f"--bits 4) or 8-bit symmetric (Q8_0: --bits 8 --sym), or {ALTERNATIVES}")


def check_gguf_shapes(shapes: dict[str, tuple[int, int]]) -> None:
    """Every linear layer's input width is a multiple of 32 (whole blocks per row); refused otherwise."""
    for name, (out, n) in shapes.items():
        if n % BLOCK:
            raise ValueError(f"{name} is {out} x {n}: GGUF stores rows in blocks of {BLOCK} weights and {n} is not a "
                             f"multiple of {BLOCK} (padding would change the shape llama.cpp expects: refused); "
                             f"use {ALTERNATIVES}")


def permute_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's Q/K row order: HF's rotary halves per head interleaved (convert_hf_to_gguf's permute)."""
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def block_params(lc) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes (out, in) and the scale and zero of each block of 32 inputs, (out, in / 32)."""
    cols = lc.g_idx[::BLOCK]
    return lc.codes, lc.scale[:, cols].float(), lc.zero[:, cols].float()


def quant_bytes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qtype: str) -> np.ndarray:
    """The GGUF blocks of one weight, uint8 (out, in / 32 * block bytes): Q4_1 [d, m, 16 bytes of nibbles
    (code j low, code j + 16 high)] or Q8_0 [d, 32 int8 codes]; module docstring for d, m."""
    out, n = codes.shape
    q = codes.reshape(out, n // BLOCK, BLOCK).numpy()
    d = scale.numpy().astype(np.float16).view(np.uint8).reshape(out, n // BLOCK, 2)
    if qtype == "Q4_1":
        m = (-scale * zero).numpy().astype(np.float16).view(np.uint8).reshape(out, n // BLOCK, 2)
        qs = (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)
        blocks = np.concatenate([d, m, qs], axis=-1)
    else:
        qs = (q - 128).astype(np.int8).view(np.uint8)
        blocks = np.concatenate([d, qs], axis=-1)
    return np.ascontiguousarray(blocks.reshape(out, -1))


def expected_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qtype: str) -> torch.Tensor:
    """What GGUF de-quantizes our blocks to: fp16(s) q + fp16(-s z), or fp16(s) (q - 128), per block."""
    out, n = codes.shape
    q = codes.reshape(out, n // BLOCK, BLOCK).float()
    d = scale.half().float().unsqueeze(-1)
    if qtype == "Q4_1":
        return (d * q + (-scale * zero).half().float().unsqueeze(-1)).reshape(out, n)
    return (d * (q - 128)).reshape(out, n)


def bpe_pre_tokenizer(folder: Path) -> str | None:
    """llama.cpp's pre-tokenizer type of the BPE tokenizer in ``folder``, told as its converter does (None: a hash
    not in :data:`BPE_PRE`, logged)."""
    from hashlib import sha256

    from transformers import AutoTokenizer

    digest = sha256(str(AutoTokenizer.from_pretrained(str(folder)).encode(PRE_CHECK_TEXT)).encode()).hexdigest()
    if digest not in BPE_PRE:
        log.warning("BPE tokenizer in %s not known to this exporter (hash %s): no tokenizer.ggml.pre written; "
                    "llama.cpp will warn and use its default pre-tokenizer", folder, digest)
    return BPE_PRE.get(digest)


def _add_tokenizer(writer, folders: list[Path]) -> str:
    """Vocabulary (and scores, types or merges) from the first folder with a tokenizer.model or tokenizer.json."""
    import gguf

    for folder in folders:
        if (folder / "tokenizer.model").is_file():
            vocab = gguf.vocab.SentencePieceVocab(folder)
        elif (folder / "tokenizer.json").is_file():
            vocab = gguf.vocab.BpeVocab(folder)
        else:
            continue
        tokens, scores, types = zip(*vocab.all_tokens())
        writer.add_tokenizer_model(vocab.tokenizer_model)
        if vocab.tokenizer_model == "gpt2" and (pre := bpe_pre_tokenizer(folder)) is not None:
            writer.add_tokenizer_pre(pre)
        writer.add_token_list(list(tokens))
        writer.add_token_scores(list(scores))
        writer.add_token_types([int(t) for t in types])
        gguf.vocab.SpecialVocab(folder, load_merges=vocab.tokenizer_model == "gpt2").add_to_gguf(writer)
        return vocab.name
    log.warning("no tokenizer.model or tokenizer.json in %s: the GGUF has no tokenizer (llama.cpp needs one)",
                ", ".join(map(str, folders)))
    return "none"


def _add_config(writer, config, qtype: str) -> None:
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    if rope is not None:
        writer.add_rope_freq_base(float(rope))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1 if qtype == "Q4_1" else gguf.LlamaFileType.MOSTLY_Q8_0)


def _float_name(key: str) -> str | None:
    """GGUF name of a non-quantized tensor of a Llama state dict (None: not stored, e.g. rotary buffers)."""
    if key == "model.embed_tokens.weight":
        return "token_embd.weight"
    if key == "model.norm.weight":
        return "output_norm.weight"
    if key == "lm_head.weight":
        return "output.weight"
    parts = key.split(".")
    if parts[:2] == ["model", "layers"] and parts[-1] == "weight":
        names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
        if parts[3] in names:
            return f"blk.{parts[2]}.{names[parts[3]]}.weight"
    return None


def check_gguf_model(model, layers) -> None:
    """Fail unless this writer can store ``model``: the llama architecture, and no bias on the ``layers`` (names)."""
    if model.config.model_type != "llama":
        raise ValueError(f"GGUF export writes the llama architecture; this model is {model.config.model_type!r}; "
                         f"use {ALTERNATIVES}")
    biased = [name for name in layers if model.get_submodule(name).bias is not None]
    if biased:
        raise ValueError(f"{biased[0]} has a bias, which this GGUF writer does not store; use {ALTERNATIVES}")


def write_gguf(model: nn.Module, codes: dict, grid: Grid, path: Path, tokenizer_folders: list[Path]) -> dict:
    """Write ``model`` with its linear layers on their grids (``codes``: :func:`magr.deploy.export.model_codes`)
    as a GGUF file; returns what was written (type, tensors, tokenizer)."""
    import gguf

    config = model.config
    check_gguf_model(model, codes)
    qtype = gguf_type(grid)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(str(getattr(config, "_name_or_path", "") or "magr"))
    _add_config(writer, config, qtype)
    tok = _add_tokenizer(writer, tokenizer_folders)
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    for key, value in state.items():
        name = _float_name(key)
        if name is None:
            continue
        array = value.detach().cpu().float().numpy()
        writer.add_tensor(name, array if array.ndim == 1 else array.astype(np.float16))
    for layer, lc in codes.items():
        block, sub = layer.split(".")[2], ".".join(layer.split(".")[3:])
        q, s, z = block_params(lc)
        if sub in ("self_attn.q_proj", "self_attn.k_proj"):
            n = heads if sub == "self_attn.q_proj" else kv_heads
            q, s, z = (permute_rows(t, n) for t in (q, s, z))
        data = quant_bytes(q, s, z, qtype)
        writer.add_tensor(f"blk.{block}.{LINEAR_TENSORS[sub]}.weight", data, raw_shape=data.shape,
                          raw_dtype=getattr(gguf.GGMLQuantizationType, qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"gguf_type": qtype, "tokenizer": tok, "file": path.name}


def check_gguf(path: Path, model: nn.Module, codes: dict, grid: Grid) -> dict:
    """Read ``path`` back with the ``gguf`` reader and compare every de-quantized linear weight with what our
    blocks de-quantize to (bit for bit) and with our saved weight (within the float16 rounding of d and m);
    ValueError naming the first tensor that differs. Returns the largest differences."""
    import gguf

    qtype = gguf_type(grid)
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    worst, worst_rel = 0.0, 0.0
    for layer, lc in codes.items():
        block, sub = layer.split(".")[2], ".".join(layer.split(".")[3:])
        name = f"blk.{block}.{LINEAR_TENSORS[sub]}.weight"
        q, s, z = block_params(lc)
        w = model.get_submodule(layer).weight.detach().cpu().float()
        if sub in ("self_attn.q_proj", "self_attn.k_proj"):
            n = heads if sub == "self_attn.q_proj" else kv_heads
            q, s, z, w = (permute_rows(t, n) for t in (q, s, z, w))
        got = torch.from_numpy(gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type).copy())
        got = got.reshape(w.shape)
        if not torch.equal(got, expected_weight(q, s, z, qtype)):
            raise ValueError(f"{name}: the GGUF reader de-quantizes other values than our blocks")
        # |fp16(s) q + fp16(m) - s (q - z)| <= |q| |fp16(s) - s| + |fp16(m) - m| (+ float32 rounding)
        blocks = q.reshape(q.shape[0], -1, BLOCK).float()
        zq = (blocks - 128) if qtype == "Q8_0" else blocks
        m = -s * z
        bound = (zq.abs() * (s.half().float() - s).abs().unsqueeze(-1)
                 + ((m.half().float() - m).abs().unsqueeze(-1) if qtype == "Q4_1" else 0)).reshape(w.shape)
        diff = (got - w).abs()
        slack = 4 * torch.finfo(torch.float32).eps * (w.abs() + s.repeat_interleave(BLOCK, 1) * 16)
        if bool((diff > bound + slack).any()):
            r, c = (int(i) for i in (diff > bound + slack).nonzero()[0])
            raise ValueError(f"{name}: weight [{r}, {c}] reads back as {float(got[r, c]):.7g}, ours is "
                             f"{float(w[r, c]):.7g}: beyond the float16 rounding of d and m")
        worst = max(worst, float(diff.max()))
        worst_rel = max(worst_rel, float((diff / s.repeat_interleave(BLOCK, 1)).max()))
    return {"max_abs_diff": worst, "max_diff_in_scales": worst_rel, "tensors_checked": len(codes)}
