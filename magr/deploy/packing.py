"""Dense LSB-first packing of b-bit integer codes into int32 words (the GPTQ and compressed-tensors layout).

Along the packed dimension, the n codes c_0 .. c_{n-1} (each in [0, 2^b - 1]) form one bit stream, code i
taking stream bits [i*b, (i+1)*b) with its least significant bit first; stream bit p is bit p mod 32 of
word p // 32. So n codes take ceil(n*b/32) words and the tail of the last word is zero:

    word k = sum over stream bits p in [32k, 32k + 32) of bit(p) << (p - 32k)     (two's complement int32)

At 2, 4 and 8 bits a word holds 16, 8 or 4 whole codes (code j of word k at shift (j*b) mod 32); at 3 bits 32
codes fill exactly 3 words and codes 10 and 21 straddle two words. This is GPTQ's layout (qweight packs the
input dimension of an (in x out) matrix, qzeros the output dimension) and compressed-tensors'
``pack_to_int32`` (of the codes shifted by 2^(b-1) to unsigned, which are the codes here).
"""
from __future__ import annotations

import math

import torch


def packed_length(n: int, bits: int) -> int:
    """Words that n codes of ``bits`` bits take: ceil(n * bits / 32)."""
    return math.ceil(n * bits / 32)


def _bit_planes(bits: int, device) -> torch.Tensor:
    return torch.arange(bits, device=device, dtype=torch.int64)


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer ``codes`` in [0, 2^bits - 1] along the last dimension into int32 words (module docstring).

    (..., n) -> (..., ceil(n * bits / 32)) int32. Raises ValueError for a code outside the range.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} cannot be packed; allowed: 1..8")
    codes = codes.to(torch.int64)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 2**bits - 1):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] to pack at {bits} bits, found "
                         f"[{int(codes.min())}, {int(codes.max())}]")
    return _pack(codes, bits)


CHUNK_BITS = 1 << 25  # stream bits packed at once (int64 temporaries of 256 MB): rows are packed in slices


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if codes.dim() > 1 and codes.numel() * bits > CHUNK_BITS:
        rows = max(1, CHUNK_BITS // (codes[0].numel() * bits))
        return torch.cat([_pack(codes[i : i + rows], bits) for i in range(0, codes.shape[0], rows)])
    return _pack_whole(codes, bits) if 32 % bits == 0 else _pack_stream(codes, bits)


def _pack_whole(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """1, 2, 4 or 8 bits: a word holds 32 / bits whole codes, code j of a word shifted by j * bits (the same words
    as :func:`_pack_stream`, without its bit planes)."""
    *lead, n = codes.shape
    per, words = 32 // bits, packed_length(n, bits)
    padded = torch.nn.functional.pad(codes, (0, words * per - n)).reshape(*lead, words, per)
    packed = (padded << (torch.arange(per, device=codes.device, dtype=torch.int64) * bits)).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _pack_stream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Any width: the codes as one bit stream, 32 stream bits per word (module docstring)."""
    *lead, n = codes.shape
    words = packed_length(n, bits)
    stream = (codes.unsqueeze(-1) >> _bit_planes(bits, codes.device)) & 1  # (..., n, bits): LSB first
    stream = stream.reshape(*lead, n * bits)
    stream = torch.nn.functional.pad(stream, (0, words * 32 - n * bits))
    weights = torch.ones(32, dtype=torch.int64, device=codes.device) << torch.arange(32, device=codes.device)
    packed = (stream.reshape(*lead, words, 32) * weights).sum(-1)  # unsigned 32-bit values in int64
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The ``n`` codes that :func:`pack_int32` packed along the last dimension (int32 in, int64 out)."""
    *lead, words = packed.shape
    if words != packed_length(n, bits):
        raise ValueError(f"{words} words cannot hold exactly {n} codes of {bits} bits "
                         f"(expected {packed_length(n, bits)})")
    unsigned = packed.to(torch.int64) & 0xFFFFFFFF
    stream = (unsigned.unsqueeze(-1) >> torch.arange(32, device=packed.device)) & 1
    stream = stream.reshape(*lead, words * 32)[..., : n * bits].reshape(*lead, n, bits)
    return (stream << _bit_planes(bits, packed.device)).sum(-1)
