"""Coordinate-descent refinement of a quantized weight (OPTQ-dagger in the paper; COMQ, arXiv 2403.07134).

As in the released code: with H = sum over calibration tokens of x x^T (OPTQ's Hessian),

    H' = H + damp * mean(diag H) * I,     N[i, j] = H'[i, j] / (H'[j, j] + eps)   (column-wise),
    P = W @ N  (W: the weight before MagR),  then N's diagonal is zeroed,

and each pass sets, for input columns j = 0..in-1 in order,

    Q[:, j] = quant(P[:, j] - sum_{k != j} Q[:, k] N[k, j])

with the newest values of the other columns. Two grid conventions (``CD.grid``):

- "keep": every column on the grid of the quantizer that produced Q. Each step is then the exact minimiser
  over column j on the grid of :func:`cd_objective`, so no pass increases it.
- "refit" (the released code, optq.py's CD loop): for groups that are not static, at the first column j of
  every group of g columns, in every pass, the group's grid is fitted again on the current values
  Q[:, j:j+g] (the previous pass's, or the quantizer's, for that group) with the grid formula
  (:meth:`Grid.row_params`, beta applied again); groups are then the consecutive columns j // g. A refit
  can raise the objective. Per channel and static groups keep their grid.

:func:`cd_refine` is the pure-torch loop (the reference); :func:`cd_refine_compiled` runs the same passes in
one compiled kernel call (:mod:`magr.core.cd_sweep`). Both return the refined Q and the grids it lies on.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from .cbuild import BACKENDS
from .quantizers import Grid, QuantParams, quantize
from .settings import check_choice, setting

log = logging.getLogger(__name__)

GRIDS = ("keep", "refit")


def cd_covariance(H: torch.Tensor, damp: float, eps: float) -> torch.Tensor:
    """N[i, j] = H'[i, j] / (H'[j, j] + eps) with H' = H + damp * mean(diag H) * I (float64; one n x n copy)."""
    Hd = H.to(torch.float64, copy=True)
    Hd.diagonal().add_(damp * torch.diagonal(Hd).mean())  # the values of H + damp * mean(diag H) * I
    return Hd.div_((torch.diagonal(Hd) + eps).unsqueeze(0))


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


def sweep_grids(params: QuantParams, refit: Grid | None, n: int) -> tuple[QuantParams, int]:
    """The grids a sweep starts from (float32 copies it may change) and the refit group size g (0: keep).

    With ``refit`` (a grouped grid) and groups that are not static, the groups become the consecutive
    columns (g_idx = column // g), as in the released code, even where the quantizer's act-order had
    permuted them: every group's grid is re-fitted before its first column is quantized.
    """
    scale, zero = params.scale.float().clone().contiguous(), params.zero.float().clone().contiguous()
    if refit is None or refit.group_size is None or params.static:
        return QuantParams(scale, zero, params.maxq, params.g_idx, params.static), 0
    g = refit.group_size
    if n % g or scale.shape[1] != n // g:
        raise ValueError(f"cd_grid='refit' needs {n // g} groups of {g} columns; the grid has {scale.shape[1]}")
    g_idx = torch.arange(n, device=params.g_idx.device) // g
    return QuantParams(scale, zero, params.maxq, g_idx), g


def cd_refine(Q: torch.Tensor, W: torch.Tensor, H: torch.Tensor, params: QuantParams, passes: int,
              damp: float, eps: float, refit: Grid | None = None, block_size: int = 128,
              stop_early: bool = True) -> tuple[torch.Tensor, QuantParams]:
    """``passes`` coordinate-descent passes over the columns of Q (module docstring): the pure-torch loop.

    ``refit`` None keeps the grids ``params``; a :class:`Grid` re-fits each group's grid with its formula
    at the group's first column in every pass. Returns (Q float32, the grids Q lies on). Blocks of columns:
    the targets of a block come from one matmul with the current Q; inside the block each new column
    corrects the later targets by a rank-1 update (the column loop in matmul form). Stops after a pass that
    changed nothing (the further passes would repeat it exactly) unless ``stop_early`` is False (the loop as
    it was before, for timing).
    """
    N = cd_covariance(H, damp, eps).to(torch.float32)
    W = W.float()
    Q = Q.float().clone()
    P = W @ N
    N.fill_diagonal_(0)
    n = W.shape[1]
    params, g = sweep_grids(params, refit, n)
    scale, zero, group_of = params.scale, params.zero, params.g_idx.tolist()
    for _ in range(passes):
        start = Q.clone()
        for b0 in range(0, n, block_size):
            b1 = min(b0 + block_size, n)
            T = P[:, b0:b1] - Q @ N[:, b0:b1]
            for j in range(b0, b1):
                if g and j % g == 0:
                    s, z = refit.row_params(Q[:, j:j + g])
                    scale[:, j // g], zero[:, j // g] = s[:, 0], z[:, 0]
                gi = group_of[j]
                new = quantize(T[:, j - b0], scale[:, gi], zero[:, gi], params.maxq)
                delta = new - Q[:, j]
                Q[:, j] = new
                T[:, j - b0 + 1:] -= delta.unsqueeze(1) * N[j, j + 1:b1].unsqueeze(0)
        if stop_early and torch.equal(Q, start):
            break  # a pass that changed nothing: every further pass would repeat it
    return Q, params


def cd_refine_compiled(Q: torch.Tensor, W: torch.Tensor, H: torch.Tensor, params: QuantParams, passes: int,
                       damp: float, eps: float, refit: Grid | None = None, kernel: str = "auto"
                       ) -> tuple[torch.Tensor, QuantParams]:
    """:func:`cd_refine` in one compiled kernel call (:mod:`magr.core.cd_sweep`); raises ``cd_sweep.Unavailable``.

    Start targets T = P - Q @ N = (W - Q) @ N + W * diag(H' / (diag H' + eps)), kept in float64 and
    updated only where a code changes; rows that converge stop early (the further passes would repeat).
    ``kernel`` (:func:`magr.core.cd_sweep.compiled_sweep`): "auto" by device, or "c" / "triton" (the Triton sweep
    on CPU tensors runs in Triton's interpreter, TRITON_INTERPRET=1).
    """
    from .cd_sweep import compiled_sweep

    sweep = compiled_sweep(Q.device, kernel)
    N = cd_covariance(H, damp, eps).to(torch.float32)
    W = W.float()
    Q = Q.float().contiguous().clone()
    diag = torch.diagonal(N).double()
    N.fill_diagonal_(0)
    T = ((W - Q) @ N).double() + W.double() * diag
    params, g = sweep_grids(params, refit, W.shape[1])
    beta, sym = (refit.beta, refit.sym) if refit is not None else (1.0, False)
    ran = sweep(Q, T, N, params.scale, params.zero, params.g_idx.contiguous(), g, beta, params.maxq, sym, passes)
    log.debug("coordinate descent %s: %d passes asked, rows swept %.1f on average (max %d)", tuple(Q.shape),
              passes, ran.double().mean().item(), int(ran.max()))
    return Q, params


def refine_function(backend: str, device: torch.device):
    """:func:`cd_refine_compiled` or :func:`cd_refine` for ``backend`` ("auto": compiled when it can run here,
    else the pure-torch loop with a logged warning; "compiled": an error naming the reason instead)."""
    from .cbuild import choose
    from .cd_sweep import compiled_sweep

    return choose("cd_backend", backend, device, compiled_sweep, cd_refine_compiled, cd_refine,
                  "coordinate descent", log)


@dataclass(frozen=True)
class CD:
    """Refinement step: coordinate descent after the quantizer (:func:`cd_refine`), the released code's
    constants. ``passes`` None follows the released code: 30 passes at 2 bits, 1 otherwise."""

    PREFIX = "cd_"
    passes: int | None = setting(None, "coordinate-descent passes (default: 30 at 2 bits, else 1; 0: none)",
                                 type=int)
    damp: float = setting(0.75, "damping of H, fraction of mean(diag H)")
    eps: float = setting(0.1, "added to each column's curvature (and the weight of eps/2 ||Q||^2)")
    grid: str = setting("refit", "grid during the passes: refit (the released code's: each non-static group re-fitted "
                        "from its current values at its first column, every pass) or keep (the quantizer's)",
                        choices=GRIDS)
    backend: str = setting("auto", "sweep implementation: auto (compiled when available, else torch), compiled, "
                           "or torch (the pure-torch reference loop)", choices=BACKENDS)

    def __post_init__(self):
        check_choice("cd_grid", self.grid, GRIDS)
        check_choice("cd_backend", self.backend, BACKENDS)
        if self.passes is not None and self.passes < 0:
            raise ValueError(f"cd_passes={self.passes} must be >= 0")
        if self.damp < 0 or self.eps < 0:
            raise ValueError(f"cd_damp={self.damp} and cd_eps={self.eps} must be >= 0")

    def resolved(self, grid: Grid) -> "CD":
        """A copy with ``passes`` filled in for ``grid``."""
        if self.passes is not None:
            return self
        return replace(self, passes=30 if grid.bits == 2 else 1)

    def __call__(self, Q: torch.Tensor, W: torch.Tensor, H: torch.Tensor, params: QuantParams,
                 grid: Grid) -> tuple[torch.Tensor, QuantParams]:
        """Refine Q (the quantizer's output for W, the weight before MagR) with H = sum x x^T; (Q, grids)."""
        passes = self.resolved(grid).passes
        if not passes:
            return Q, params
        refine = refine_function(self.backend, Q.device)
        return refine(Q, W, H, params, passes, self.damp, self.eps, grid if self.grid == "refit" else None)
