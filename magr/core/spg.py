"""MagR by spectral proximal gradient: per-row Barzilai-Borwein steps with a nonmonotone safeguard (issue 19).

Same objective as :func:`magr.core.solver.magr_ista` (paper eq. (3)); every row w of W is an independent problem

    min_w  f(w) + alpha ||w||_inf,    f(w) = 1/2 (w - w_hat) H_n (w - w_hat)^T,   H_n = H / lambda_max(H),

(or the penalty on every group of ``group_size`` consecutive inputs). The published iteration takes the
step 1 = 1/L on every row. MagR's H is very ill-conditioned (the spectrum of H_n falls to 1e-3..1e-4 by the
256th eigenvalue, the last-window X has rank <= 512), so that step is far too short for almost all
directions. Here each row r takes its own step s_r (SpaRSA, Wright-Nowak-Figueiredo 2009):

    w_{k+1} = prox_{s_r alpha ||.||_inf}(w_k - s_r g_k),         g_k = (w_k - w_hat) H_n,

    s_r = <dw, dw> / <dw, dg>  (BB1, even k)  or  <dw, dg> / <dg, dg>  (BB2, odd k),   clipped to [1, s_max],

with dw = w_{k+1} - w_k, dg = g_{k+1} - g_k of the row (the inverse Rayleigh quotient of H_n along the last
move). A trial is accepted when F_r(w_{k+1}) <= max of the row's last ``memory`` accepted values (the GLL
nonmonotone test); a rejected row stays at w_k and retries with the step max(1, ``backtrack`` * s_r) (0.25;
the step 1 is one published ISTA step, which never increases F, so a row is rejected a few times in a row
at most). F comes for free from the gradient (F = 1/2 <w - w_hat, g> + alpha * threshold), so
each iteration is still one matmul; the result is, per row, the best iterate seen.

With ``features`` X (tokens x in) and 2 * tokens < in (down_proj: 512 tokens, 1536 inputs) the gradient is
((w - w_hat) X_n^T) X_n, X_n = X / sqrt(lambda_max), cheaper than the product with H_n. ``precision="bf16"``
uses bfloat16 operands with float32 accumulation for that matmul (about 2x faster on CPUs with AVX512-BF16;
changes the numbers, opt-in).

Measured on SmolLM2-135M (benchmarks/NOTES.md, reports/magr_solver.md, issue 19; all 210 layers per channel,
14 per group of 64): 16 iterations (bf16, factored gradient) end below the F of 200 published iterations on 209
of 210 layers (mean 0.892; 1.005 on block 3's down_proj; per group at most 0.991), in ~0.9x the time of FISTA 14
on one thread; 20 iterations end below it on all 210 (at most 0.986); 12 miss on 2 of 105 layers of 15 blocks;
FISTA needs 37-38. On synthetic features without the structure of real ones (Gaussian X
with 24 tokens for 96 inputs, or well-conditioned X where ISTA-200 is already converged) it needs up to ~32
(tests/test_spg.py).
"""
from __future__ import annotations

import logging
import time

import torch

from .fista import PRECISIONS, solve_infos, unchanged
from .kernels import _newton_on_candidates
from .solver import check_problem, lambda_max, matmul_precision

log = logging.getLogger(__name__)

SPG_MEMORY = 10
SPG_STEP_MAX = 1e3
SPG_BACKTRACK = 0.25


def linf_prox_rows(V: torch.Tensor, t: torch.Tensor, max_steps: int = 64) -> torch.Tensor:
    """In place: every row of V (segments x L) clipped at +-tau, sum_i max(|v_i| - tau, 0) = t_row (t: (segments,)).

    Newton/Michelot from tau_0 = max|v| - t, a lower bound of the root, on the candidates |v| > tau_0
    only. Returns the clip level min(tau, max|v|) per segment, which is ||prox(v)||_inf.
    """
    A = V.abs()
    vmax = A.amax(dim=1)
    tau = (vmax - t).clamp(min=0)
    rows, cols = (A > tau.unsqueeze(1)).nonzero(as_tuple=True)
    tau, _ = _newton_on_candidates(A[rows, cols], rows, tau, t, V.shape[0], max_steps)  # the fused prox's steps
    tau = torch.minimum(tau.clamp(min=0), vmax)
    torch.clamp(V, min=-tau.unsqueeze(1), max=tau.unsqueeze(1), out=V)
    return tau


def magr_spg(
    W: torch.Tensor,
    H: torch.Tensor,
    alpha: float,
    iters: int,
    group_size: int | None = None,
    *,
    precision: str = "fp32",
    features: torch.Tensor | None = None,
    memory: int = SPG_MEMORY,
    step_max: float = SPG_STEP_MAX,
    lambda_method: str = "lanczos",
    backtrack: float = SPG_BACKTRACK,
    return_info: bool = False,
    rows: list[int] | None = None,
):
    """MagR (the F of :func:`magr.core.solver.magr_ista`) by per-row spectral proximal gradient; see the module doc.

    Args as :func:`magr.core.fista.magr_fista` (H is normalised to lambda_max = 1, ``alpha`` has the published
    meaning). ``precision``: "fp32"/"tf32" or "bf16" (bfloat16 gradient operands, float32 accumulation).
    ``features``: X (tokens x in) with H = X^T X, used for the factored gradient when 2 * tokens < in.
    ``memory``: accepted values the nonmonotone test looks back on; ``step_max``: largest BB step;
    ``backtrack``: factor of a rejected row's step for its retry (0: retry with the safe step 1).
    Returns the new weight (W's dtype), with ``return_info`` also :class:`MagrInfo` (float64 objectives
    [F(W_hat), F(result)]; one per block of ``rows`` when given).
    """
    check_problem(W, H, alpha, iters)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    if memory < 1 or step_max < 1:
        raise ValueError(f"need memory >= 1 and step_max >= 1, got {memory}, {step_max}")
    start = time.perf_counter()
    f32 = torch.float32
    W_hat = W.to(f32).contiguous()
    Hc = H.to(device=W.device, dtype=f32)
    lam = lambda_max(Hc, lambda_method)
    if not torch.isfinite(lam) or lam <= 0:
        return unchanged(W, lam, return_info, rows)
    n_rows, n_in = W_hat.shape
    seg = n_in if group_size is None else int(group_size)
    if seg <= 0 or n_in % seg:
        raise ValueError(f"group_size {group_size} does not divide the row length {n_in}")
    per_row = n_in // seg
    mm = torch.bfloat16 if precision == "bf16" else f32
    Hn = Hc / lam
    if features is not None and 2 * features.shape[0] < n_in:
        Xn = (features.to(device=W.device, dtype=f32) / lam.sqrt()).to(mm)
        XnT = Xn.T.contiguous()

        def grad(D, out):
            return torch.matmul(torch.matmul(D, XnT), Xn, out=out)
    else:
        Hm = Hn.to(mm)

        def grad(D, out):
            return torch.matmul(D, Hm, out=out)

    def penalty(tau):  # alpha * sum of the clip levels = alpha * sum ||w||_inf over a row's segments
        return alpha * tau.view(n_rows, per_row).sum(dim=1)

    def dot(a, b):  # row-wise <a, b>
        return torch.linalg.vecdot(a, b)

    Wk = W_hat.clone()  # accepted iterate
    Gk = torch.zeros(n_rows, n_in, dtype=f32, device=W.device)  # its gradient (float32)
    Fk = penalty(W_hat.abs().view(-1, seg).amax(dim=1))  # F(W_hat)
    Wn, Gn, D, dw = (torch.empty_like(Wk) for _ in range(4))
    Dm = torch.empty_like(Wk, dtype=mm) if mm != f32 else D  # the matmul operand
    Gm = torch.empty_like(Wk, dtype=mm) if mm != f32 else None  # the matmul result, when not float32
    best = torch.empty_like(Wk)  # rows whose best iterate is not the current one
    best_F, cur_is_best = Fk.clone(), torch.ones(n_rows, dtype=torch.bool, device=W.device)
    hist = Fk.unsqueeze(0).repeat(memory, 1)
    step = torch.ones(n_rows, 1, dtype=f32, device=W.device)
    with matmul_precision(precision):
        for k in range(iters):
            torch.addcmul(Wk, step, Gk, value=-1.0, out=Wn)  # V = w - s g, then the prox in place
            tau = linf_prox_rows(Wn.view(-1, seg), (step * alpha).repeat_interleave(per_row, dim=0).view(-1))
            torch.sub(Wn, W_hat, out=D)
            if Dm is not D:
                Dm.copy_(D)
            if Gm is None:
                grad(Dm, Gn)
            else:
                Gn.copy_(grad(Dm, Gm))
            Fn = 0.5 * dot(D, Gn) + penalty(tau)
            rej = Fn > hist.amax(dim=0)
            # BB step from the move (rejected rows are restored below and take a shorter step)
            torch.sub(Wn, Wk, out=dw)
            dg = torch.sub(Gn, Gk, out=D)  # D is free again
            sy = dot(dw, dg)
            new = dot(dw, dw) / sy if k % 2 == 0 else sy / dot(dg, dg)
            new = torch.where(sy > 0, new, torch.full_like(new, step_max)).nan_to_num_(step_max).clamp_(1.0, step_max)
            if bool(rej.any()):
                idx = rej.nonzero(as_tuple=True)[0]
                Wn[idx], Gn[idx], Fn[idx] = Wk[idx], Gk[idx], Fk[idx]
                new[idx] = (step[idx, 0] * backtrack).clamp(min=1.0)
            step = new.unsqueeze(1)
            # best iterate per row: save the current one where the next is worse
            worse = (Fn >= best_F) & cur_is_best
            if bool(worse.any()):
                idx = worse.nonzero(as_tuple=True)[0]
                best[idx] = Wk[idx]
            cur_is_best = Fn < best_F
            best_F = torch.where(cur_is_best, Fn, best_F)
            Wk, Wn, Gk, Gn, Fk = Wn, Wk, Gn, Gk, Fn
            hist[k % memory] = Fk
    out = torch.where(cur_is_best.unsqueeze(1), Wk, best)
    result = out.to(W.dtype)
    if not return_info:
        return result
    return result, solve_infos(W_hat, out, Hn, alpha, group_size, lam, start, rows)
