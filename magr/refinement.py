"""Coordinate-descent refinement of a quantized weight (OPTQ-dagger in the paper; COMQ, arXiv 2403.07134).

As in the released code: with H = sum over calibration tokens of x x^T (OPTQ's Hessian),

    H' = H + damp * mean(diag H) * I,     N[i, j] = H'[i, j] / (H'[j, j] + eps)   (column-wise),
    P = W @ N  (W: the weight before MagR),  then N's diagonal is zeroed,

and each pass sets, for input columns j = 0..in-1 in order,

    Q[:, j] = quant(P[:, j] - sum_{k != j} Q[:, k] N[k, j])

with the newest values of the other columns and the grid of the quantizer that produced Q. Each step is
the exact minimiser over column j on the grid of :func:`cd_objective`, so no pass increases it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .quantizers import Grid, QuantParams, quantize
from .settings import setting


def cd_covariance(H: torch.Tensor, damp: float, eps: float) -> torch.Tensor:
    """N[i, j] = H'[i, j] / (H'[j, j] + eps) with H' = H + damp * mean(diag H) * I (float64)."""
    H = H.double()
    Hd = H + damp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return Hd / (torch.diagonal(Hd) + eps).unsqueeze(0)


def cd_objective(Q: torch.Tensor, W: torch.Tensor, H: torch.Tensor, damp: float, eps: float) -> float:
    """The function :func:`cd_refine` decreases: 1/2 tr((Q - W) H' (Q - W)^T) + eps/2 ||Q||_F^2.

    Column j of this quadratic has curvature H'[j, j] + eps for every row, and its minimiser over
    column j with the others fixed is P[:, j] - sum_{k != j} Q[:, k] N[k, j]; rounding that to the
    nearest grid point is the exact minimiser on the grid, so no coordinate step can increase it.
    """
    H = H.double()
    Hd = H + damp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    D = (Q - W).double()
    return float(0.5 * (D @ Hd * D).sum() + 0.5 * eps * (Q.double() ** 2).sum())


def cd_refine(Q: torch.Tensor, W: torch.Tensor, H: torch.Tensor, params: QuantParams, passes: int,
              damp: float, eps: float, block_size: int = 128) -> torch.Tensor:
    """``passes`` coordinate-descent passes over the columns of Q (module docstring) on the grid ``params``.

    Blocks of columns: the targets of a block come from one matmul with the current Q; inside the block
    each new column corrects the later targets by a rank-1 update (the column loop in matmul form).
    """
    N = cd_covariance(H, damp, eps).to(torch.float32)
    W = W.float()
    Q = Q.float().clone()
    P = W @ N
    N.fill_diagonal_(0)
    scale, zero = params.columns()
    n = W.shape[1]
    for _ in range(passes):
        for b0 in range(0, n, block_size):
            b1 = min(b0 + block_size, n)
            T = P[:, b0:b1] - Q @ N[:, b0:b1]
            for j in range(b0, b1):
                new = quantize(T[:, j - b0], scale[:, j], zero[:, j], params.maxq)
                delta = new - Q[:, j]
                Q[:, j] = new
                T[:, j - b0 + 1:] -= delta.unsqueeze(1) * N[j, j + 1:b1].unsqueeze(0)
    return Q


@dataclass(frozen=True)
class CD:
    """Refinement step: coordinate descent after the quantizer (:func:`cd_refine`), the released code's
    constants. ``passes`` None follows the released code: 30 passes at 2 bits, 1 otherwise."""

    PREFIX = "cd_"
    passes: int | None = setting(None, "coordinate-descent passes (default: 30 at 2 bits, else 1; 0: none)",
                                 type=int)
    damp: float = setting(0.75, "damping of H, fraction of mean(diag H)")
    eps: float = setting(0.1, "added to each column's curvature (and the weight of eps/2 ||Q||^2)")

    def __post_init__(self):
        if self.passes is not None and self.passes < 0:
            raise ValueError(f"cd_passes={self.passes} must be >= 0")
        if self.damp < 0 or self.eps < 0:
            raise ValueError(f"cd_damp={self.damp} and cd_eps={self.eps} must be >= 0")

    def resolved(self, grid: Grid) -> "CD":
        """A copy with ``passes`` filled in for ``grid``."""
        if self.passes is not None:
            return self
        return CD(30 if grid.bits == 2 else 1, self.damp, self.eps)

    def __call__(self, Q: torch.Tensor, W: torch.Tensor, H: torch.Tensor, params: QuantParams,
                 grid: Grid) -> torch.Tensor:
        """Refine Q (the quantizer's output for W, the weight before MagR) with H = sum x x^T."""
        passes = self.resolved(grid).passes
        return cd_refine(Q, W, H, params, passes, self.damp, self.eps) if passes else Q
