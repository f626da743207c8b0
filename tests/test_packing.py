"""Dense LSB-first int32 packing (magr.deploy.packing) against a bit-by-bit reference and compressed-tensors."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from magr.deploy.packing import pack_int32, packed_length, unpack_int32


def ref_pack(codes: list[int], bits: int) -> list[int]:
    """The documented layout, one bit at a time: code i's bit j is stream bit i*bits + j."""
    words = [0] * math.ceil(len(codes) * bits / 32)
    for i, c in enumerate(codes):
        for j in range(bits):
            p = i * bits + j
            words[p // 32] |= ((c >> j) & 1) << (p % 32)
    return [w - 2**32 if w >= 2**31 else w for w in words]


codes_strategy = st.integers(1, 8).flatmap(
    lambda bits: st.tuples(st.just(bits), st.integers(0, 3), st.integers(1, 97), st.integers(0, 2**31)))


@settings(max_examples=60, deadline=None)
@given(codes_strategy)
def test_pack_matches_the_bit_stream_reference_and_unpacks_exactly(args):
    bits, rows, n, seed = args
    codes = torch.randint(0, 2**bits, (rows, n), generator=torch.Generator().manual_seed(seed))
    packed = pack_int32(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (rows, packed_length(n, bits))
    for r in range(rows):
        assert packed[r].tolist() == ref_pack(codes[r].tolist(), bits)
    assert torch.equal(unpack_int32(packed, bits, n), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_extreme_codes_and_the_words_per_32_codes(bits):
    codes = torch.full((2, 32), 2**bits - 1)
    codes[1] = 0
    packed = pack_int32(codes, bits)
    assert packed.shape == (2, bits)  # 32 codes of b bits fill exactly b words
    assert packed[0].tolist() == [-1] * bits and packed[1].tolist() == [0] * bits
    # GPTQ's 3-bit words: codes 0..9 at shifts 0..27, code 10 straddles words 0 and 1
    one = torch.zeros(1, 32, dtype=torch.long)
    one[0, 10 if bits == 3 else 1] = 2**bits - 1
    got = pack_int32(one, bits)[0].tolist()
    if bits == 3:
        assert got[:2] == [-(2**31) + 2**30, 1]  # bits 30, 31 of word 0 and bit 0 of word 1
    else:
        assert got[0] == (2**bits - 1) << bits


def test_out_of_range_codes_and_wrong_lengths_are_refused():
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 15\] to pack at 4 bits, found \[0, 16\]"):
        pack_int32(torch.tensor([[0, 16]]), 4)
    with pytest.raises(ValueError, match=r"bits=9 cannot be packed"):
        pack_int32(torch.tensor([[1]]), 9)
    with pytest.raises(ValueError, match=r"3 words cannot hold exactly 5 codes of 4 bits"):
        unpack_int32(torch.zeros(1, 3, dtype=torch.int32), 4, 5)


@settings(max_examples=25, deadline=None)
@given(codes_strategy)
def test_same_words_as_compressed_tensors(args):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    bits, rows, n, seed = args
    codes = torch.randint(0, 2**bits, (rows + 1, n), generator=torch.Generator().manual_seed(seed))
    signed = (codes - 2 ** (bits - 1)).to(torch.int8)  # compressed-tensors packs signed codes + 2^(b-1)
    assert torch.equal(pack_int32(codes, bits), helpers.pack_to_int32(signed, bits))
    assert torch.equal(pack_int32(codes.T, bits).T, helpers.pack_to_int32(signed, bits, packed_dim=0))


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 32, 172, 4096])
def test_whole_word_packing_gives_the_bit_stream_words(bits, n):
    from magr.deploy.packing import _pack_stream, _pack_whole

    codes = torch.randint(0, 2**bits, (5, n), generator=torch.Generator().manual_seed(n * bits))
    assert torch.equal(_pack_whole(codes, bits), _pack_stream(codes, bits))
