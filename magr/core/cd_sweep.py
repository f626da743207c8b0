"""Compiled coordinate-descent sweep: the passes of :func:`magr.core.refinement.cd_refine` in one kernel call per layer.

The same sequence of exact column minimisations as the pure-torch loop (the reference), organised for speed:
rows are independent problems, so each row keeps its targets

    t = P[r, :] - Q[r, :] @ N        (N with zero diagonal; double precision)

and updates them only when a code actually changes, t -= (new - old) * N[j, :]; a pass then costs
O(out x in) plus O(changes x in), and a row whose pass changed nothing has converged and stops. The start
targets come from one matmul, T = (W - Q) @ N + W * diag(N_full) (= P - Q @ N). Float operations happen in
another order than in the reference, so a code can differ where the target lies on a rounding tie
(tests/test_cd_sweep.py counts and checks them).

Backends: on the CPU a C kernel (magr/core/csrc/cd_sweep.c) built on first use with the system C compiler
(``cc``; ``CC`` overrides) into a cache folder (``MAGR_CACHE_DIR``, default ~/.cache/magr), loaded with ctypes
(:mod:`magr.core.cbuild`) and run on torch's thread count (row chunks in threads; the call releases the GIL). On
CUDA the Triton kernel of :mod:`magr.core.cd_triton`. When neither is available, :func:`compiled_sweep` says why and
:class:`magr.core.refinement.CD` falls back to the pure-torch loop with a logged warning.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache

import torch

from .cbuild import CSRC, Unavailable, check_tensor, load, over_row_chunks

SOURCE = CSRC / "cd_sweep.c"
TILE = 8  # rows per tile: one row N[j, :] serves the tile's rows that changed at column j
__all__ = ["Unavailable", "compiled_sweep", "sweep_cpu"]


@lru_cache(maxsize=1)
def _library():
    """The loaded C kernel (ctypes); raises :class:`Unavailable` with the reason."""
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    return load(SOURCE, "magr_cd_sweep",
                [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, i64, ptr, i64, ctypes.c_float, i64, i64, i64, ptr])


def sweep_cpu(Q, T, N, scale, zero, g_idx, refit_group: int, beta: float, maxq: int, sym: bool, passes: int,
              threads: int | None = None) -> torch.Tensor:
    """In place on Q (out x in, float32), T (targets, float64) and, when refitting, scale/zero (out x groups).

    N (in x in, float32) has a zero diagonal; g_idx (in, int64) maps columns to groups; ``refit_group`` g > 0
    re-fits the grid of each group of g columns at its first column in every pass (0: keep the grids).
    Returns the passes each row swept (int64, out): fewer than ``passes`` where the row converged.
    """
    fn = _library()
    out, n = Q.shape
    check_tensor("Q", Q, torch.float32, (out, n))
    check_tensor("T", T, torch.float64, (out, n))
    check_tensor("N", N, torch.float32, (n, n))
    check_tensor("scale", scale, torch.float32, (out, scale.shape[1]))
    check_tensor("zero", zero, torch.float32, tuple(scale.shape))
    check_tensor("g_idx", g_idx, torch.int64, (n,))
    ran = torch.zeros(out, dtype=torch.int64)
    groups = scale.shape[1]
    threads = threads or torch.get_num_threads()
    chunk = max(TILE, -(-out // (4 * threads)) // TILE * TILE)  # a few chunks per thread balance converging rows

    def run(r0: int, r1: int) -> int:
        return fn(r1 - r0, n, TILE, Q[r0].data_ptr(), T[r0].data_ptr(), N.data_ptr(), scale[r0].data_ptr(),
                  zero[r0].data_ptr(), groups, g_idx.data_ptr(), refit_group, beta, maxq, int(sym), passes,
                  ran[r0].data_ptr())

    over_row_chunks(run, out, chunk, threads)
    return ran


KERNELS = ("auto", "c", "triton")


def compiled_sweep(device: torch.device, kernel: str = "auto"):
    """The compiled sweep function for ``device`` (see :func:`sweep_cpu`); raises :class:`Unavailable`.

    ``kernel`` "auto" picks by device (the C kernel on the CPU, Triton on CUDA); "triton" asks for the Triton
    sweep, which also runs on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1; the tests use it);
    "c" asks for the C kernel (CPU tensors only).
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown sweep kernel {kernel!r}; allowed: {', '.join(KERNELS)}")
    if kernel == "c" and device.type != "cpu":
        raise Unavailable(f"the C sweep needs CPU tensors, got device {device}")
    if device.type == "cpu" and kernel != "triton":
        _library()
        return sweep_cpu
    if device.type == "cuda" or kernel == "triton":
        from .cd_triton import sweep_triton, triton_unavailable

        reason = triton_unavailable()
        if reason:
            raise Unavailable(reason)
        return sweep_triton
    raise Unavailable(f"no compiled coordinate-descent sweep for device {device}")
