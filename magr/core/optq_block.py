"""Compiled OPTQ column loop: the per-column steps of one lazy block in one C call (magr/core/csrc/optq_block.c).

Inside a block of columns i1..i2 (:func:`magr.core.optq.optq`), for i = c0..c1-1 and every row r,

    q = quant(W1[r, i]),   e = (W1[r, i] - q) / U1[i, i],   W1[r, i:] -= e * U1[i, i:],   Err1[r, i] = e,

rows being independent: the kernel runs row chunks in threads (torch's thread count; the call releases the
GIL). It performs the torch loop's float32 operations in the same order (built by :mod:`magr.core.cbuild` without
FMA contraction or fast math), so its codes, errors and updated weights are the torch loop's to the bit;
:func:`magr.core.optq.columns_torch` stays the reference (tests/test_optq_block.py compares them).
"""
from __future__ import annotations

import ctypes
from dataclasses import replace
from functools import lru_cache

import torch

from .cbuild import CSRC, Unavailable, check_tensor, load, over_row_chunks
from .quantizers import quantize_codes

SOURCE = CSRC / "optq_block.c"
MIN_CHUNK = 64  # rows per thread at least: smaller chunks cost more in dispatch than they save


@lru_cache(maxsize=1)
def _library():
    """The loaded C kernel (ctypes); raises :class:`Unavailable` with the reason."""
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    return load(SOURCE, "magr_optq_columns", [i64, i64, i64, i64, ptr, ptr, ptr, i64, ptr, i64, ptr, ptr, i64, ptr,
                                              i64])


def _check_rows(name: str, x: torch.Tensor, shape: tuple) -> None:
    """A float32 CPU view whose rows are contiguous (a slice of columns of a contiguous matrix)."""
    if x.dtype != torch.float32 or tuple(x.shape) != shape or x.stride(1) != 1 or x.device.type != "cpu":
        raise ValueError(f"{name} must be a float32 CPU view of shape {shape} with contiguous rows; got {x.dtype} "
                         f"{tuple(x.shape)} strides {x.stride()} on {x.device}")


def columns_cpu(W1, Err1, U1, Q1, scale, zero, group_of, c0: int, c1: int, maxq: int,
                threads: int | None = None) -> None:
    """Columns c0..c1-1 of a lazy block, in place on W1, Err1 (out x bs, contiguous) and Q1 (the block's
    columns of Q, out x bs with contiguous rows); U1 (bs x bs, contiguous rows) is the block's part of U,
    scale/zero (out x groups) the grids, group_of (bs, int64) each block column's group."""
    fn = _library()
    out, bs = W1.shape
    check_tensor("W1", W1, torch.float32, (out, bs))
    check_tensor("Err1", Err1, torch.float32, (out, bs))
    check_tensor("scale", scale, torch.float32, (out, scale.shape[1]))
    check_tensor("zero", zero, torch.float32, tuple(scale.shape))
    check_tensor("group_of", group_of, torch.int64, (bs,))
    _check_rows("U1", U1, (bs, bs))
    _check_rows("Q1", Q1, (out, bs))
    if not 0 <= c0 <= c1 <= bs:
        raise ValueError(f"columns {c0}..{c1} do not lie in a block of {bs}")
    groups, ldu, ldq = scale.shape[1], U1.stride(0), Q1.stride(0)
    threads = threads or torch.get_num_threads()
    chunk = max(MIN_CHUNK, -(-out // threads))

    def run(r0: int, r1: int) -> int:
        return fn(r1 - r0, bs, c0, c1, W1[r0].data_ptr(), Err1[r0].data_ptr(), U1.data_ptr(), ldu,
                  Q1[r0].data_ptr(), ldq, scale[r0].data_ptr(), zero[r0].data_ptr(), groups, group_of.data_ptr(),
                  maxq)

    over_row_chunks(run, out, chunk, threads)


def compiled_columns(device: torch.device):
    """:func:`columns_cpu` when it can run on ``device``; raises :class:`Unavailable` with the reason."""
    if device.type != "cpu":
        raise Unavailable(f"the compiled OPTQ column loop runs on the CPU, not on {device}")
    _library()
    return columns_cpu


def compare_backends(W: torch.Tensor, H: torch.Tensor, grid, step) -> dict:
    """OPTQ (the settings of ``step``, an :class:`magr.core.optq.OPTQ`) with the torch loop and with the compiled
    loop: the entries, the integer codes that differ, and whether the grids and the weights are the same to
    the bit (the kernel performs the torch loop's float32 operations, so nothing may differ)."""
    return compare_results(*(replace(step, backend=b)(W, H, grid) for b in ("torch", "compiled")))


def compare_results(torch_result, compiled_result) -> dict:
    """Two OPTQ results (dequantized weight, :class:`QuantParams`): the entries, the integer codes that differ,
    whether the grids (scale, zero, g_idx) and the weights are the same to the bit."""
    (Qt, pt), (Qc, pc) = torch_result, compiled_result
    codes = [quantize_codes(Q.float(), *p.columns(), p.maxq) for Q, p in (torch_result, compiled_result)]
    return {"entries": Qt.numel(), "differing_codes": int((codes[0] != codes[1]).sum()),
            "same_grids": bool(torch.equal(pt.scale, pc.scale) and torch.equal(pt.zero, pc.zero)
                               and torch.equal(pt.g_idx, pc.g_idx)),
            "same_weights": bool(torch.equal(Qt, Qc))}
