"""OPTQ / GPTQ (Frantar et al., 2023): column-by-column quantization with Hessian-based error feedback.

For a weight W (out x in) and H = sum x x^T of the layer's inputs, column j is rounded to its grid and
the rounding error is spread over the columns not yet quantized:

    q_j = quant(w_j),   e = (w_j - q_j) / U[j, j],   w_k -= e * U[j, k]  (k > j)

where U is the upper Cholesky factor of (H + lambda I)^{-1}, lambda = percdamp * mean(diag H). Updates
are applied lazily in blocks of ``blocksize`` columns (the GPTQ paper's Algorithm 1). Inputs that are
never active (H[j, j] = 0, "dead") get H[j, j] = 1 and a zero weight column, as in GPTQ. ``actorder``
processes columns by decreasing H[j, j]; ``static_groups`` fixes every group's grid from the initial W
before any update (otherwise a group's grid is taken when its first column is reached, from the weights
chosen by ``group_grid``).

Inside a block the column steps run in :func:`columns_torch` (the pure-torch loop, the reference) or in one
compiled call per block segment (:mod:`magr.core.optq_block`, the same float32 operations, equal to the bit;
``OPTQ.backend``). A block is cut into segments at the first columns of groups whose grid is fitted during
the loop, so that each grid is fitted by the same torch code in both, between two calls.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from .cbuild import BACKENDS, choose
from .quantizers import Grid, QuantParams, quantize
from .settings import check_choice, setting

log = logging.getLogger(__name__)

GROUP_GRIDS = ("block_start", "current")


def damped_inverse_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + percdamp * mean(diag H) * I)^{-1}, raising damping if needed.

    At most two n x n matrices besides H exist at once (the damped sum and its factor, the factor and the
    inverse, the inverse and U): the damping is added to a copy's diagonal, each one freed when used.
    """
    damp = percdamp * torch.diagonal(H).mean()
    for attempt in range(6):
        damped = H.clone()
        damped.diagonal().add_(damp)  # the values of H + damp * I
        L, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if info == 0:
                return U
        damp = damp * 10 if damp > 0 else torch.diagonal(H).mean() * 1e-4 + 1e-8
        log.warning("OPTQ: H not positive definite; retrying with damping %.3g", float(damp))
    raise RuntimeError("OPTQ: H is not positive definite even with strong damping")


def _grids_and_order(W, H, grid: Grid, actorder: bool, static_groups: bool):
    """The processing order and the grids known before the column loop.

    Returns (W, H) permuted to the processing order (act-order: decreasing H[j, j]), the grid tensors
    scale/zero (out, n_groups) - filled now per channel or with static groups, else when each group's
    first column is reached -, ``perm`` (processed position -> input column) and ``group_of``
    (processed position -> group).
    """
    out, n = W.shape
    g = grid.group_size or n
    if grid.group_size is None or static_groups:
        p = grid.params(W)
        scale_g, zero_g = p.scale.clone(), p.zero.clone()
    else:
        scale_g = torch.zeros(out, n // g, device=W.device)
        zero_g = torch.zeros(out, n // g, device=W.device)
    perm = torch.arange(n, device=W.device)
    if actorder:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W, H = W[:, perm], H[perm[:, None], perm]  # one copy of H
    if grid.group_size is None:
        group_of = torch.zeros(n, dtype=torch.long, device=W.device)
    elif static_groups:
        group_of = perm // g
    else:
        group_of = torch.arange(n, device=W.device) // g
    return W, H, scale_g, zero_g, perm, group_of


def _group_weights(W, W1, Err1, U, i1: int, i2: int, k: int, g: int, group_grid: str) -> torch.Tensor:
    """The weights a new group's grid is fitted on, at its first column k (inside the lazy block i1..i2).

    "block_start" (GPTQ's and the released MagR code's): W[:, k:k+g] as it was when the block started,
    without the updates from the block's columns before k. "current": the up-to-date weights, the block's
    columns from W1 and the columns past the block with this block's pending updates added, so that the
    result does not depend on blocksize. The two differ only when a group starts inside a block (group
    size not a multiple of blocksize, e.g. g64 with blocksize 128).
    """
    if group_grid == "block_start":
        return W[:, k:k + g]
    i = k - i1
    cur = W1[:, i:i + g]
    if k + g > i2:
        cur = torch.cat([cur, W[:, i2:k + g] - Err1[:, :i] @ U[i1:k, i2:k + g]], dim=1)
    return cur


def columns_torch(W1, Err1, U1, Q1, scale, zero, group_of, c0: int, c1: int, maxq: int) -> None:
    """Columns c0..c1-1 of a lazy block, in place (the pure-torch loop, the reference): for each column i,

        q = quant(W1[:, i]) on its group's grid,   Q1[:, i] = q,
        e = (W1[:, i] - q) / U1[i, i],   W1[:, i:] -= e U1[i, i:],   Err1[:, i] = e.

    W1, Err1, Q1 (out x bs) are the block's working weights, errors and output columns, U1 (bs x bs) its
    part of U, scale/zero (out x groups) the grids, group_of (bs) each block column's group.
    """
    group_of = group_of.tolist()
    for i in range(c0, c1):
        gi = group_of[i]
        w = W1[:, i]
        q = quantize(w, scale[:, gi], zero[:, gi], maxq)
        Q1[:, i] = q
        err = (w - q) / U1[i, i]
        W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
        Err1[:, i] = err


def column_function(backend: str, device: torch.device):
    """The block's column loop for ``backend``: :func:`magr.core.optq_block.columns_cpu` (compiled) or
    :func:`columns_torch`. "auto": compiled on the CPU when the kernel builds (else the torch loop with a
    logged warning), the torch loop on other devices; "compiled": an error naming why it cannot run."""
    from .optq_block import columns_cpu, compiled_columns

    if backend == "auto" and torch.device(device).type != "cpu":
        return columns_torch
    return choose("optq_backend", backend, device, compiled_columns, columns_cpu, columns_torch,
                  "OPTQ column loop", log)


def _segments(i1: int, i2: int, g: int | None) -> list[tuple[int, int]]:
    """The block i1..i2 cut at the first columns of groups of g (None: no cut), relative to i1."""
    cuts = sorted({i1, i2, *(range(-(-i1 // g) * g, i2, g) if g else ())})
    return [(a - i1, b - i1) for a, b in zip(cuts, cuts[1:])]


def optq(W: torch.Tensor, H: torch.Tensor, grid: Grid, percdamp: float, blocksize: int, actorder: bool,
         static_groups: bool, group_grid: str, backend: str = "auto") -> tuple[torch.Tensor, QuantParams]:
    """Quantize W (out x in) with OPTQ given H = X^T X (in x in); returns (dequantized weight, grid).

    The :class:`QuantParams` hold the per-group scale/zero and g_idx, the column -> group map, which
    act-order permutes. ``group_grid`` chooses the weights a non-static group's grid is fitted on
    (:func:`_group_weights`); ``backend`` the column loop (:func:`column_function`).
    """
    group_size = grid.group_size
    out, n = W.shape
    grid.check(n)
    if H.shape != (n, n):
        raise ValueError(f"H must be {n} x {n} for W of shape {tuple(W.shape)}, got {tuple(H.shape)}")
    dtype = W.dtype
    W = W.float().clone()
    H = H.float()  # the caller's H, read only: copied where a dead input changes it

    dead = torch.diagonal(H) == 0
    if dead.any():
        H = H.clone()
        H[dead, dead] = 1
        W[:, dead] = 0

    columns = column_function(backend, W.device)
    fit = group_size if group_size is not None and not static_groups else None  # grids fitted in the loop
    W, H, scale_g, zero_g, perm, group_of = _grids_and_order(W, H, grid, actorder, static_groups)
    U = damped_inverse_cholesky(H, percdamp)  # + 2 n x n; + 3 where H here is a copy (act-order, dead, not float32)
    del H
    U_rows = U.contiguous()  # the same values, rows contiguous for the column loop
    Q = torch.empty_like(W)  # every column is written, as every block column of Err1
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.empty_like(W1)
        for c0, c1 in _segments(i1, i2, fit):
            k = i1 + c0
            if fit and k % fit == 0:
                s, z = grid.row_params(_group_weights(W, W1, Err1, U, i1, i2, k, fit, group_grid))
                scale_g[:, k // fit], zero_g[:, k // fit] = s[:, 0], z[:, 0]
            columns(W1, Err1, U_rows[i1:i2, i1:i2], Q[:, i1:i2], scale_g, zero_g, group_of[i1:i2], c0, c1,
                    grid.maxq)
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    if actorder:
        Q = Q[:, torch.argsort(perm)]
    Q = Q.to(dtype)
    g_idx = torch.empty(n, dtype=torch.long, device=W.device)
    g_idx[perm] = group_of
    return Q, QuantParams(scale_g, zero_g, grid.maxq, g_idx, static=static_groups and group_size is not None)


@dataclass(frozen=True)
class OPTQ:
    """Quantizer step: OPTQ with H = sum over all calibration tokens of x x^T (:func:`optq`)."""

    name: ClassVar[str] = "optq"
    percdamp: float = setting(0.01, "OPTQ damping, fraction of mean(diag H)")
    blocksize: int = setting(128, "OPTQ lazy-update block size (columns)")
    actorder: bool = setting(False, "OPTQ: columns by decreasing H[j, j]")
    static_groups: bool = setting(False, "OPTQ: fix every group's grid from the initial weight")
    group_grid: str = setting("block_start", "OPTQ: weights a group's grid is fitted on: block_start (GPTQ's and "
                              "the released code's) or current (up to date; independent of blocksize)",
                              choices=GROUP_GRIDS)
    backend: str = setting("auto", "OPTQ column loop: auto (compiled on the CPU when it builds, else torch), compiled, "
                           "or torch (the pure-torch reference loop); the results are the same to the bit",
                           choices=BACKENDS, flat="optq_backend")

    def __post_init__(self):
        check_choice("group_grid", self.group_grid, GROUP_GRIDS)
        check_choice("optq_backend", self.backend, BACKENDS)
        if self.percdamp < 0:
            raise ValueError(f"percdamp={self.percdamp} must be >= 0")
        if self.blocksize <= 0:
            raise ValueError(f"blocksize={self.blocksize} must be a positive number of columns")

    def __call__(self, W: torch.Tensor, H: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, QuantParams]:
        return optq(W, H, grid, self.percdamp, self.blocksize, self.actorder, self.static_groups, self.group_grid,
                    self.backend)
