"""MagR as a preprocessing step: a weight and its layer's statistics in, a weight out.

    W = argmin_W 1/2 ||X (W - W_hat)^T||_F^2 + alpha * sum_rows ||w||_inf       (paper eq. (3), Algorithm 1)

with H = X^T X of the layer's features X, normalised so that alpha has the published meaning. The result
keeps the layer's output on X while shrinking every row's (or group's) largest weight, and any quantizer
can follow it: ``MagR()(W, H)`` returns the new weight, :meth:`MagR.apply` does the same for layers that
share one input (q/k/v, gate/up) and picks H from the calibration statistics.

Two solvers minimise the same F (small functions in :data:`SOLVERS`):
- ``"ista"``: the published procedure, :func:`magr.core.solver.magr_ista` (exact lambda_max, sort-based
  l1-ball projection, plain proximal gradient), 200 iterations by default as the released code;
- ``"fista"``: :func:`magr.core.fista.magr_fista` (FISTA, TF32 matmuls, fused sort-free prox, rows of the layers
  stacked), 48 iterations by default, which reach a lower F than 200 ISTA iterations (benchmarks/NOTES.md);
- ``"spg"``: :func:`magr.core.spg.magr_spg` (per-row Barzilai-Borwein steps, rows stacked; with the last sample's
  X the factored gradient (D X^T) X where it is cheaper), 20 iterations by default, which reach a lower F than
  200 ISTA iterations on all 210 of SmolLM2-135M's layers (worst 0.986 of it; 16 iterations: 1.005 on one;
  benchmarks/NOTES.md, reports/magr_solver.md).
The fast solvers take ``precision``: "tf32" (float32 on CPUs; TF32 on GPUs) or "bf16" (bfloat16 operands of the
gradient matmul, float32 accumulation: about 2x faster on CPUs with AVX512-BF16; changes the numbers, opt-in).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .fista import FAST_ITERS, PRECISIONS, magr_fista
from .settings import check_choice, setting
from .solver import MagrInfo, magr_ista
from .spg import magr_spg

FEATURE_SOURCES = ("last_sample", "all")
"""MagR's X: the last calibration sample (the released code) or all calibration tokens (H = OPTQ's H)."""


def _ista_layers(weights: Sequence[torch.Tensor], H: torch.Tensor, alpha: float, iters: int,
                 group_size: int | None, precision: str = "tf32", X: torch.Tensor | None = None,
                 ) -> tuple[list[torch.Tensor], list[MagrInfo]]:
    """The published algorithm on each layer in turn (float32, exact lambda_max; ``precision`` and ``X`` unused)."""
    results = [magr_ista(w, H, alpha, iters, group_size, projection="sort", return_info=True) for w in weights]
    return [r[0] for r in results], [r[1] for r in results]


def _stacked(solve, weights: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[MagrInfo]]:
    """``solve(stacked, rows)`` on the rows of all layers stacked into one matrix (rows are independent
    problems), split back into the layers."""
    rows = [w.shape[0] for w in weights]
    out, infos = solve(torch.cat([w.to(weights[0].dtype) for w in weights], dim=0), rows)
    return [p.to(w.dtype) for p, w in zip(torch.split(out, rows, dim=0), weights)], infos


def _fista_layers(weights: Sequence[torch.Tensor], H: torch.Tensor, alpha: float, iters: int,
                  group_size: int | None, precision: str = "tf32", X: torch.Tensor | None = None,
                  ) -> tuple[list[torch.Tensor], list[MagrInfo]]:
    """FISTA on the stacked rows (``X`` unused: the gradient is taken with H)."""
    return _stacked(lambda W, rows: magr_fista(W, H, alpha, iters, group_size, precision=precision,
                                               return_info=True, rows=rows), weights)


def _spg_layers(weights: Sequence[torch.Tensor], H: torch.Tensor, alpha: float, iters: int,
                group_size: int | None, precision: str = "tf32", X: torch.Tensor | None = None,
                ) -> tuple[list[torch.Tensor], list[MagrInfo]]:
    """Spectral proximal gradient on the stacked rows, with the factored gradient when ``X`` makes it cheaper."""
    return _stacked(lambda W, rows: magr_spg(W, H, alpha, iters, group_size, precision=precision, features=X,
                                             return_info=True, rows=rows), weights)


SOLVERS = {"ista": _ista_layers, "fista": _fista_layers, "spg": _spg_layers}
DEFAULT_ITERS = {"ista": 200, "fista": FAST_ITERS, "spg": 20}


@dataclass(frozen=True)
class MagR:
    """Preprocessing step: MagR (paper Algorithm 1) on the weights of one linear layer or of layers sharing
    one input. ``alpha`` None: 1e-3 per channel, 1e-4 per group (the paper's values); ``iters`` None: the
    solver's default (:data:`DEFAULT_ITERS`)."""

    alpha: float | None = setting(None, "MagR l_inf penalty, relative to lambda_max(H) = 1 "
                                        "(default 1e-3 per channel, 1e-4 per group)", type=float)
    iters: int | None = setting(None, "iterations of the MagR solver (default: ista 200, fista 48, spg 20)", type=int)
    solver: str = setting("fista", "MagR solver: fista or spg (fast), or ista (the published procedure)",
                          choices=tuple(SOLVERS))
    precision: str = setting("tf32", "operands of the fast solvers' gradient matmul: tf32 (float32 on CPUs), fp32, "
                                     "or bf16 (float32 accumulation; changes the numbers)", choices=PRECISIONS)
    feature_source: str = setting("last_sample", "MagR's X: the last calibration sample (released code) or all",
                                  choices=FEATURE_SOURCES)

    def __post_init__(self):
        check_choice("solver", self.solver, tuple(SOLVERS))
        check_choice("feature_source", self.feature_source, FEATURE_SOURCES)
        check_choice("precision", self.precision, PRECISIONS)
        if self.solver == "ista" and self.precision == "bf16":
            raise ValueError("precision='bf16' with solver='ista': the published procedure runs in float32; "
                             "allowed: bf16 with solver fista or spg, or precision tf32 / fp32")
        if self.alpha is not None and self.alpha < 0:
            raise ValueError(f"alpha={self.alpha} must be >= 0")
        if self.iters is not None and self.iters < 0:
            raise ValueError(f"iters={self.iters} must be >= 0")

    def resolved(self, grid) -> "MagR":
        """A copy with alpha and iters filled in for the run's grid (alpha depends on its group size)."""
        return self.for_group(grid.group_size)

    def for_group(self, group_size: int | None) -> "MagR":
        alpha = self.alpha if self.alpha is not None else (1e-3 if group_size is None else 1e-4)
        iters = self.iters if self.iters is not None else DEFAULT_ITERS[self.solver]
        return replace(self, alpha=alpha, iters=iters)

    def features(self, stats) -> torch.Tensor:
        """X^T X of MagR's features from a layer's calibration statistics (``.H_last`` or ``.H``)."""
        return stats.H_last if self.feature_source == "last_sample" else stats.H

    def feature_matrix(self, stats) -> torch.Tensor | None:
        """MagR's X itself where the statistics keep it (the last sample, ``.X_last``), else None."""
        return getattr(stats, "X_last", None) if self.feature_source == "last_sample" else None

    def apply(self, weights: Sequence[torch.Tensor], stats, group_size: int | None = None
              ) -> tuple[list[torch.Tensor], list[MagrInfo]]:
        """New weights (and diagnostics) for layers that share one input and so one ``stats``."""
        weights = list(weights)
        if not weights or any(w.dim() != 2 for w in weights) or len({w.shape[1] for w in weights}) != 1:
            raise ValueError(f"weights must be 2-D with one input width, got {[tuple(w.shape) for w in weights]}")
        cfg = self.for_group(group_size)
        return SOLVERS[cfg.solver](weights, self.features(stats), cfg.alpha, cfg.iters, group_size, cfg.precision,
                                   self.feature_matrix(stats))

    def __call__(self, W: torch.Tensor, H: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
        """MagR's weight for W (out x in) given H = X^T X (in x in) of the features MagR should keep."""
        cfg = self.for_group(group_size)
        return SOLVERS[cfg.solver]([W], H, cfg.alpha, cfg.iters, group_size, cfg.precision)[0][0]
