"""Equality of two coordinate-descent implementations, code by code, with every difference traced to a tie.

Two implementations of the same passes (:func:`magr.core.refinement.cd_refine`, the pure-torch reference, and
:func:`magr.core.refinement.cd_refine_compiled`) sum the targets

    u = P[r, j] - sum_{k != j} Q[r, k] N[k, j]

in different orders, so their float32 roundings differ by a few units in the last place of the terms'
magnitude m = |P[r, j]| + sum_k |Q[r, k] N[k, j]|. Rounding u to the grid can then differ only where the
exact u lies that close to a rounding boundary (a half-integer multiple of the step, "a tie"). Rows are
independent problems, so a difference in a row is traced to its first differing (pass, column): there both
implementations saw the same state of the row, and the exact target (float64) must sit on a boundary within
``tie_ulps`` x 2^-24 x m. Entries after it in that row follow from the tie (a changed code moves later targets).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .quantizers import Grid, QuantParams, quantize_codes
from .refinement import cd_covariance, cd_refine, cd_refine_compiled


@dataclass
class SweepComparison:
    """Counts of one comparison: differing codes, rows, and per first difference its distance to the tie."""

    entries: int
    differing: int = 0
    rows: int = 0
    ties: list[dict] = field(default_factory=list)  # per differing row: pass, column, distance in 2^-24 m

    def all_ties(self, tie_ulps: float) -> bool:
        return all(t["ulps"] <= tie_ulps for t in self.ties)


def codes(Q: torch.Tensor, params: QuantParams) -> torch.Tensor:
    scale, zero = params.columns()
    return quantize_codes(Q.float(), scale, zero, params.maxq)


def _first_difference(runs_ref, runs_got, row: int) -> tuple[int, int]:
    """(pass, column) of the first difference in ``row``; runs_*[p] is the state after p passes."""
    for p in range(1, len(runs_ref)):
        diff = (runs_ref[p][0][row] != runs_got[p][0][row]).nonzero()
        if len(diff):
            return p, int(diff[0])
    raise AssertionError(f"row {row} has no differing pass")


def _tie_distance(before: torch.Tensor, after: torch.Tensor, j: int, row_grid, W_row, N, Nfull) -> float:
    """Distance of the exact target of column j to the nearest rounding boundary, in units of 2^-24 m."""
    state = torch.cat([after[:j], before[j:]]).double()
    terms = state * N[:, j]
    u = float(W_row.double() @ Nfull[:, j] - terms.sum())
    m = abs(float(W_row.double() @ Nfull[:, j])) + float(terms.abs().sum())
    s, z = row_grid(j, state)
    x = u / s
    boundary = torch.floor(torch.tensor(x)).item() + 0.5
    return abs(x - boundary) * s / (m * 2.0**-24)


def compare_sweeps(Q0: torch.Tensor, W: torch.Tensor, H: torch.Tensor, params: QuantParams, passes: int,
                   damp: float, eps: float, refit: Grid | None = None, kernel: str = "auto") -> SweepComparison:
    """Run the reference and the compiled sweep (``kernel``: see :func:`magr.core.cd_sweep.compiled_sweep`); count
    differing codes and trace each differing row to a tie."""
    ref, p_ref = cd_refine(Q0, W, H, params, passes, damp, eps, refit)
    got, p_got = cd_refine_compiled(Q0, W, H, params, passes, damp, eps, refit, kernel)
    c_ref, c_got = codes(ref, p_ref), codes(got, p_got)
    differ = (c_ref != c_got) | (p_ref.scale != p_got.scale)[:, p_ref.g_idx]
    out = SweepComparison(entries=c_ref.numel(), differing=int(differ.sum()), rows=int(differ.any(dim=1).sum()))
    if not out.differing:
        return out
    # the state after every pass count, from both implementations (the compiled one is prefix-consistent)
    runs_ref, runs_got, Q, p = [(Q0.float(), params)], [(Q0.float(), params)], Q0, params
    for k in range(1, passes + 1):
        Q, p = cd_refine(Q, W, H, p, 1, damp, eps, refit)
        runs_ref.append((Q, p))
        runs_got.append(cd_refine_compiled(Q0, W, H, params, k, damp, eps, refit, kernel))
    Nfull = cd_covariance(H, damp, eps).float().double()
    N = Nfull.clone().fill_diagonal_(0)
    for r in differ.any(dim=1).nonzero().flatten().tolist():
        pk, j = _first_difference(runs_ref, runs_got, r)
        (before, p_before), (after, p_after) = runs_ref[pk - 1], runs_ref[pk]

        def row_grid(col, state, r=r, p_before=p_before, p_after=p_after):
            if refit is not None and refit.group_size is not None and not params.static:
                g0 = col - col % refit.group_size
                s, z = refit.row_params(before[r:r + 1, g0:g0 + refit.group_size])  # fitted at the group start
                return float(s), float(z)
            gi = int(p_before.g_idx[col])
            return float(p_before.scale[r, gi]), float(p_before.zero[r, gi])

        ulps = _tie_distance(before[r], after[r], j, row_grid, W[r].float(), N, Nfull)
        out.ties.append({"row": r, "pass": pk, "column": j, "ulps": ulps})
    return out
