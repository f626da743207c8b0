"""Uniform weight quantizers: the grid, round-to-nearest (RTN), and coordinate-descent refinement.

Grid of one row (or one group of ``group_size`` consecutive inputs of a row), asymmetric as in the paper
(Section 5) and the released code, which builds on GPTQ's quantizer:

    xmin = min(min w, 0),  xmax = max(max w, 0)                (the range always contains 0, as GPTQ)
    delta = beta * (xmax - xmin) / (2^b - 1),   z = round(-xmin / delta)
    q = clamp(round(w / delta) + z, 0, 2^b - 1),   w_q = delta * (q - z)

``beta`` < 1 shrinks the step (clipping the largest weights); the published values are in
:data:`DEFAULT_BETA`. Symmetric grids use xmax = max(|xmin|, xmax), xmin = -xmax and z = 2^(b-1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def default_beta(bits: int, group_size: int | None = None) -> float:
    """The released code's beta: 0.8 / 0.9 / 1 for 2 / 3 / 4 bits per channel; g128 -> 0.95, g64 -> 1."""
    if group_size is not None:
        return {128: 0.95, 64: 1.0}.get(group_size, 1.0) if bits <= 3 else 1.0
    return {2: 0.8, 3: 0.9}.get(bits, 1.0)


@dataclass
class QuantParams:
    """Grid parameters: ``scale``/``zero`` have shape (out, n_groups); ``g_idx`` maps input column -> group."""

    scale: torch.Tensor
    zero: torch.Tensor
    maxq: int
    g_idx: torch.Tensor  # (in,) long

    def columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """scale and zero expanded to one column per input, shape (out, in)."""
        return self.scale[:, self.g_idx], self.zero[:, self.g_idx]


@dataclass
class Quantizer:
    """Asymmetric (or symmetric) uniform quantizer per channel (row) or per group of inputs."""

    bits: int = 4
    group_size: int | None = None
    sym: bool = False
    beta: float = 1.0

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits} is not supported; allowed: {SUPPORTED_BITS}")
        if not 0 < self.beta <= 1:
            raise ValueError(f"beta={self.beta} must lie in (0, 1]")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"group_size={self.group_size} must be a positive integer or None")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def check(self, in_features: int) -> None:
        if self.group_size is not None and in_features % self.group_size != 0:
            raise ValueError(
                f"group_size {self.group_size} does not divide in_features {in_features}; "
                f"use a divisor of {in_features} or per-channel (None)"
            )

    def row_params(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) of shape (rows, 1) from each row's own min and max."""
        W = W.float()
        zeros = torch.zeros(W.shape[0], device=W.device)
        xmin = torch.minimum(W.amin(dim=1), zeros)
        xmax = torch.maximum(W.amax(dim=1), zeros)
        if self.sym:
            xmax = torch.maximum(-xmin, xmax)
            xmin = torch.where(xmin < 0, -xmax, xmin)
        flat = (xmin == 0) & (xmax == 0)
        xmin = torch.where(flat, -torch.ones_like(xmin), xmin)
        xmax = torch.where(flat, torch.ones_like(xmax), xmax)
        scale = self.beta * (xmax - xmin) / self.maxq
        if self.sym:
            zero = torch.full_like(scale, (self.maxq + 1) / 2)
        else:
            zero = torch.round(-xmin / scale)
        return scale.unsqueeze(1), zero.unsqueeze(1)

    def params(self, W: torch.Tensor) -> QuantParams:
        """Grid parameters of a whole (out x in) weight: one per row, or one per (row, group)."""
        out, n = W.shape
        self.check(n)
        g = self.group_size or n
        scale, zero = self.row_params(W.reshape(-1, g))
        g_idx = torch.arange(n, device=W.device) // g
        return QuantParams(scale.reshape(out, -1), zero.reshape(out, -1), self.maxq, g_idx)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Nearest grid point: delta * (clamp(round(w / delta) + z, 0, maxq) - z) (broadcasting)."""
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return scale * (q - zero)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """The integer codes q in [0, maxq] of w on the grid (for packing)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq).to(torch.int32)


def rtn(W: torch.Tensor, bits: int = 4, group_size: int | None = None, sym: bool = False,
        beta: float = 1.0, return_params: bool = False):
    """Round-to-nearest quantization of a weight (out x in) on its per-row or per-group grid."""
    quantizer = Quantizer(bits, group_size, sym, beta)
    p = quantizer.params(W)
    scale, zero = p.columns()
    Q = quantize(W.float(), scale, zero, p.maxq).to(W.dtype)
    return (Q, p) if return_params else Q


def cd_covariance(S: torch.Tensor, damp: float = 0.75, eps: float = 0.1) -> torch.Tensor:
    """N[i, j] = S'[i, j] / (S'[j, j] + eps) with S' = S + damp * mean(diag S) * I (released code)."""
    S = S.double()
    Sd = S + damp * torch.diagonal(S).mean() * torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
    return Sd / (torch.diagonal(Sd) + eps).unsqueeze(0)


def cd_objective(Q: torch.Tensor, W: torch.Tensor, S: torch.Tensor, damp: float = 0.75,
                 eps: float = 0.1) -> float:
    """The function :func:`cd_refine` decreases: 1/2 tr((Q - W) S' (Q - W)^T) + eps/2 ||Q||_F^2.

    Column j of this quadratic has curvature S'[j, j] + eps for every row, and its minimiser over
    column j with the others fixed is P[:, j] - sum_{k != j} Q[:, k] N[k, j]; rounding that to the
    nearest grid point is the exact minimiser on the grid, so no coordinate step can increase it.
    """
    S = S.double()
    Sd = S + damp * torch.diagonal(S).mean() * torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
    D = (Q - W).double()
    return float(0.5 * (D @ Sd * D).sum() + 0.5 * eps * (Q.double() ** 2).sum())


def cd_refine(Q: torch.Tensor, W: torch.Tensor, S: torch.Tensor, params: QuantParams, passes: int = 1,
              damp: float = 0.75, eps: float = 0.1, block_size: int = 128) -> torch.Tensor:
    """Coordinate-descent refinement of a quantized weight (OPTQ-dagger; COMQ, arXiv 2403.07134).

    As in the released code: N = S' / (diag S' + eps) column-wise, P = W @ N (W = the weight before
    MagR), N's diagonal zeroed; each pass sets, for j = 0..in-1 in order,
        Q[:, j] = quant(P[:, j] - sum_{k != j} Q[:, k] N[k, j])
    with the newest values of the other columns and the grid of ``params`` (OPTQ's grid).
    It never increases :func:`cd_objective`. ``S`` is the plain sum of x x^T over calibration tokens.
    """
    N = cd_covariance(S, damp, eps).to(torch.float32)
    W = W.float()
    Q = Q.float().clone()
    P = W @ N
    N.fill_diagonal_(0)
    scale, zero = params.columns()
    n = W.shape[1]
    for _ in range(passes):
        # Blocks of columns: the targets of a block come from one matmul with the current Q; inside
        # the block each new column corrects the later targets by a rank-1 update. Same arithmetic
        # as the column-by-column loop, in matmul form.
        for b0 in range(0, n, block_size):
            b1 = min(b0 + block_size, n)
            T = P[:, b0:b1] - Q @ N[:, b0:b1]
            for j in range(b0, b1):
                new = quantize(T[:, j - b0], scale[:, j], zero[:, j], params.maxq)
                delta = new - Q[:, j]
                Q[:, j] = new
                T[:, j - b0 + 1:] -= delta.unsqueeze(1) * N[j, j + 1:b1].unsqueeze(0)
    return Q
