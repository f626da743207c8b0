"""OPTQ / GPTQ (Frantar et al., 2023): column-by-column quantization with Hessian-based error feedback.

For a weight W (out x in) and H = sum x x^T of the layer's inputs, column j is rounded to its grid and
the rounding error is spread over the columns not yet quantized:

    q_j = quant(w_j),   e = (w_j - q_j) / U[j, j],   w_k -= e * U[j, k]  (k > j)

where U is the upper Cholesky factor of (H + lambda I)^{-1}, lambda = percdamp * mean(diag H). Updates
are applied lazily in blocks of ``blocksize`` columns (the GPTQ paper's Algorithm 1). Inputs that are
never active (H[j, j] = 0, "dead") get H[j, j] = 1 and a zero weight column, as in GPTQ. ``actorder``
processes columns by decreasing H[j, j]; ``static_groups`` fixes every group's grid from the initial W
before any update (otherwise a group's grid is taken when its first column is reached).
"""
from __future__ import annotations

import logging

import torch

from .quantizers import QuantParams, Quantizer, quantize

log = logging.getLogger(__name__)


def damped_inverse_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + percdamp * mean(diag H) * I)^{-1}, raising damping if needed."""
    n = H.shape[0]
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    damp = percdamp * torch.diagonal(H).mean()
    for attempt in range(6):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U
        damp = damp * 10 if damp > 0 else torch.diagonal(H).mean() * 1e-4 + 1e-8
        log.warning("OPTQ: H not positive definite; retrying with damping %.3g", float(damp))
    raise RuntimeError("OPTQ: H is not positive definite even with strong damping")


def optq(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int = 4,
    group_size: int | None = None,
    sym: bool = False,
    beta: float = 1.0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    actorder: bool = False,
    static_groups: bool = False,
    return_params: bool = False,
):
    """Quantize W (out x in) with OPTQ given H = X^T X (in x in); returns the dequantized weight.

    With ``return_params`` also returns the :class:`QuantParams` (per-group scale/zero and g_idx,
    the column -> group map, which act-order permutes).
    """
    quantizer = Quantizer(bits, group_size, sym, beta)
    out, n = W.shape
    quantizer.check(n)
    if H.shape != (n, n):
        raise ValueError(f"H must be {n} x {n} for W of shape {tuple(W.shape)}, got {tuple(H.shape)}")
    if percdamp < 0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp}")
    dtype = W.dtype
    W = W.float().clone()
    H = H.float().clone()

    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    g = group_size or n
    n_groups = n // g
    if group_size is None:
        p = quantizer.params(W)
        scale_g, zero_g = p.scale.clone(), p.zero.clone()  # (out, 1)
    elif static_groups:
        p = quantizer.params(W)
        scale_g, zero_g = p.scale.clone(), p.zero.clone()  # (out, n_groups)
    else:
        scale_g = torch.zeros(out, n_groups, device=W.device)
        zero_g = torch.zeros(out, n_groups, device=W.device)

    perm = torch.arange(n, device=W.device)
    if actorder:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    # group of the k-th processed column
    if group_size is None:
        group_of = torch.zeros(n, dtype=torch.long, device=W.device)
    elif static_groups:
        group_of = perm // g
    else:
        group_of = torch.arange(n, device=W.device) // g

    U = damped_inverse_cholesky(H, percdamp)
    Q = torch.zeros_like(W)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            k = i1 + i
            if group_size is not None and not static_groups and k % g == 0:
                # grid of a new group from its current (partly updated) weights, as GPTQ does. The
                # block's columns are up to date in W1; columns past the block still lack this
                # block's pending updates (Err1 so far), added here, so the grid (and the result)
                # does not depend on blocksize. (GPTQ's code reads the block-start W here, which
                # differs only when a group starts inside a block: group_size not a multiple of
                # blocksize, e.g. g64 with the default blocksize 128.)
                cur = W1[:, i:i + g]
                if k + g > i2:
                    cur = torch.cat([cur, W[:, i2:k + g] - Err1[:, :i] @ U[i1:k, i2:k + g]], dim=1)
                s, z = quantizer.row_params(cur)
                scale_g[:, k // g], zero_g[:, k // g] = s[:, 0], z[:, 0]
            gi = group_of[k]
            w = W1[:, i]
            q = quantize(w, scale_g[:, gi], zero_g[:, gi], quantizer.maxq)
            Q[:, k] = q
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    if actorder:
        Q = Q[:, torch.argsort(perm)]
    Q = Q.to(dtype)
    if not return_params:
        return Q
    g_idx = torch.empty(n, dtype=torch.long, device=W.device)
    g_idx[perm] = group_of
    return Q, QuantParams(scale_g, zero_g, quantizer.maxq, g_idx)
