"""Fast MagR: the same objective F as :func:`magr.core.solver.magr_ista` (paper eq. (3)), minimised by FISTA.

One iteration is one gradient matmul (TF32 or bf16 operands allowed) and one fused proximal step
(:func:`magr.core.kernels.prox_step_`: sort-free exact threshold, clip, extrapolation); rows of layers that share
H are stacked into one matrix by the caller, lambda_max comes from Lanczos. FISTA (Beck-Teboulle momentum)
reaches the objective of N published (ISTA) iterations in about 2.7 sqrt(N) iterations
(:func:`fast_iters_matching`; benchmarks/NOTES.md), so 48 iterations stand in for the published 200.
"""
from __future__ import annotations

import logging
import math
import time

import torch

from .projection import linf_norms
from .solver import MagrInfo, check_problem, lambda_max, matmul_precision

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "tf32", "bf16")
ACCELERATIONS = ("fista", "none")


def fista_momenta(iters: int, accel: str = "fista") -> list[float]:
    """Extrapolation weights m_k = (t_k - 1) / t_{k+1}, t_1 = 1, t_{k+1} = (1 + sqrt(1 + 4 t_k^2)) / 2 (Beck-Teboulle)."""
    if accel not in ACCELERATIONS:
        raise ValueError(f"unknown acceleration {accel!r}; allowed: {', '.join(ACCELERATIONS)}")
    if accel == "none":
        return [0.0] * iters
    out, t = [], 1.0
    for _ in range(iters):
        t_next = (1.0 + (1.0 + 4.0 * t * t) ** 0.5) / 2.0
        out.append((t - 1.0) / t_next)
        t = t_next
    return out


def fast_iters_matching(ista_iters: int, margin: float = 1.25) -> int:
    """FISTA iterations to reach the objective of ``ista_iters`` published iterations, with a margin.

    Measured (benchmarks/NOTES.md): FISTA needs about 2.7 * sqrt(N) iterations to match N ISTA
    iterations (18 for 50, 37-38 for 200, on random and real features); 200 -> 48 with margin 1.25.
    """
    if ista_iters < 0 or margin <= 0:
        raise ValueError(f"need ista_iters >= 0 and margin > 0, got {ista_iters}, {margin}")
    return math.ceil(margin * 2.7 * math.sqrt(ista_iters))


FAST_ITERS = fast_iters_matching(200)  # 48 FISTA iterations for the published 200 (benchmarks/NOTES.md)


def _row_penalties(W, alpha, group_size) -> torch.Tensor:
    """alpha * ||w||_inf of every row (summed over its groups), in float64: F(W_hat) row by row."""
    return alpha * linf_norms(W.double(), group_size).reshape(W.shape[0], -1).sum(dim=1)


def _row_objectives(W, W_hat, Hn, alpha, group_size) -> torch.Tensor:
    """F of every row in float64: 1/2 (w - w_hat) H (w - w_hat)^T + alpha ||w||_inf (rows are independent)."""
    D = W.double() - W_hat.double()
    return 0.5 * (D @ Hn.to(device=D.device, dtype=torch.float64) * D).sum(dim=1) + _row_penalties(W, alpha, group_size)


def unchanged(W: torch.Tensor, lam: torch.Tensor, return_info: bool, rows: list[int] | None):
    """lambda_max(H) is not a positive number (H = 0: no features): MagR leaves the weight as it is."""
    log.warning("lambda_max(H) = %s: MagR leaves the weight unchanged", float(lam))
    out = W.clone()
    if not return_info:
        return out
    return out, MagrInfo(lambda_max=float(lam)) if rows is None else [MagrInfo(lambda_max=float(lam)) for _ in rows]


def solve_infos(W_hat, out, Hn, alpha, group_size, lam, start: float, rows: list[int] | None):
    """A :class:`MagrInfo` of a solve (float64 objectives [F(W_hat), F(out)], row maxima), or one per block of
    ``rows``. F(W_hat) is the penalty alone (W_hat - W_hat = 0)."""
    f0, f1 = _row_penalties(W_hat, alpha, group_size), _row_objectives(out, W_hat, Hn, alpha, group_size)
    seconds = time.perf_counter() - start
    split = [W_hat.shape[0]] if rows is None else rows
    infos = [MagrInfo(objective=[float(a.sum()), float(b.sum())], row_max_before=wb.abs().amax(dim=1).cpu(),
                      row_max_after=wa.abs().amax(dim=1).cpu(), lambda_max=float(lam), seconds=seconds)
             for a, b, wb, wa in zip(*(torch.split(x, split, dim=0) for x in (f0, f1, W_hat, out)))]
    return infos[0] if rows is None else infos


def magr_fista(
    W: torch.Tensor,
    H: torch.Tensor,
    alpha: float,
    iters: int,
    group_size: int | None = None,
    accel: str = "fista",
    precision: str = "tf32",
    lambda_method: str = "lanczos",
    kernel: str = "auto",
    normalize: bool = True,
    dtype: torch.dtype = torch.float32,
    return_info: bool = False,
    callback=None,
    rows: list[int] | None = None,
):
    """Fast MagR: minimise the same F as :func:`magr.core.solver.magr_ista` by FISTA with a fused prox step.

    Y_0 = W_0 = W_hat;  W_{k+1} = prox_{alpha||.||_inf}(Y_k - (Y_k - W_hat) H_n),
    Y_{k+1} = W_{k+1} + m_k (W_{k+1} - W_k)  (m_k from :func:`fista_momenta`; all 0 with accel="none",
    which is the published iteration), H_n = H / lambda_max(H). Each iteration is one matmul
    (P H_n with P = Y - W_hat, in ``precision``: "fp32", "tf32", or "bf16" operands with float32
    accumulation) and one fused pass (:func:`magr.core.kernels.prox_step_`: sort-free exact threshold).
    FISTA reaches the objective of 200 plain iterations in far fewer (see benchmarks/). Arguments as in
    :func:`magr.core.solver.magr_ista`; ``kernel`` picks the prox backend ("auto", "triton", "torch");
    ``callback(k, W_k)``, if given, sees every iterate (k = 1..iters; for diagnostics, not timing).
    With ``return_info`` also returns a :class:`MagrInfo` (objectives [F(W_hat), F(result)] in float64), or,
    given ``rows`` (consecutive row counts summing to out_features), a list of one per block of rows.
    """
    from .kernels import prox_step_, prox_workspace, resolve_backend

    check_problem(W, H, alpha, iters)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    if lambda_method not in ("lanczos", "eigh"):
        raise ValueError(f"unknown lambda_method {lambda_method!r}; allowed: 'lanczos', 'eigh'")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    momenta = fista_momenta(iters, accel)
    resolve_backend(kernel, W.device)
    start = time.perf_counter()
    W_hat = W.to(dtype).contiguous()
    Hc = H.to(device=W.device, dtype=dtype)
    lam = lambda_max(Hc, lambda_method)
    if not torch.isfinite(lam) or lam <= 0:
        return unchanged(W, lam, return_info, rows)
    Hn = Hc / lam
    prox_t = alpha if normalize else alpha / float(lam)
    mm_dtype = torch.bfloat16 if precision == "bf16" else dtype
    Hm = Hn.to(mm_dtype)
    Wk = W_hat.clone()
    P = torch.zeros_like(W_hat, dtype=mm_dtype)  # Y_0 - W_hat
    G = torch.empty_like(P)
    work = prox_workspace(W_hat) if resolve_backend(kernel, W.device) == "torch" else None
    with matmul_precision(precision):
        for k, m in enumerate(momenta, start=1):
            torch.matmul(P, Hm, out=G)
            prox_step_(W_hat, Wk, P, G, prox_t, m, group_size, backend=kernel, work=work)
            if callback is not None:
                callback(k, Wk)
    out = Wk.to(W.dtype)
    if not return_info:
        return out
    return out, solve_infos(W_hat, Wk, Hn, prox_t, group_size, lam, start, rows)
