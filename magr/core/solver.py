"""MagR: l_inf-regularised weight magnitude reduction by proximal gradient descent (paper Algorithm 1).

For one linear layer with weight W_hat (``nn.Linear`` layout, out x in) and features X (tokens x in),

    min_W  F(W) = 1/2 ||X (W - W_hat)^T||_F^2 + alpha * sum_rows ||w_row||_inf        (paper eq. (3))

(or the l_inf penalty on every group of ``group_size`` consecutive inputs of a row). With
H = X^T X the gradient is (W - W_hat) H, and one proximal step with eta = 1 / lambda_max(H) is

    V = W - eta * (W - W_hat) H,    W <- prox_{eta * alpha ||.||_inf}(V)  row by row.

Published convention: X is divided by its largest singular value, so lambda_max(H) = 1, eta = 1 and
the prox scale is alpha itself. Here H is normalised the same way (H / lambda_max(H)), so ``alpha`` has
the published meaning. The iteration starts at W = W_hat and runs ``iters`` steps (200 in the released
code, 150 in the paper). :func:`magr_ista` is that published procedure; :mod:`magr.core.fista` minimises the
same F faster; :class:`magr.core.preprocessing.MagR` is the step that runs either in front of a quantizer.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from .projection import linf_norms, prox_linf

log = logging.getLogger(__name__)


@dataclass
class MagrInfo:
    """Diagnostics of one MagR solve (objectives use the normalised H)."""

    objective: list[float] = field(default_factory=list)  # F(W_k), k = 0..iters
    row_max_before: torch.Tensor | None = None  # max |w| per row of W_hat
    row_max_after: torch.Tensor | None = None  # max |w| per row of the result
    lambda_max: float = float("nan")  # largest eigenvalue of the H given
    seconds: float = 0.0


def lambda_max(H: torch.Tensor, method: str = "eigh", iters: int = 30) -> torch.Tensor:
    """Largest eigenvalue of a symmetric PSD H.

    ``"eigh"``: exact (the published code takes the top singular value of X, the same number).
    ``"power"``: ``iters`` power iterations from a fixed start, a slight under-estimate that is then
    raised by 1 % so the step 1/lambda stays below 1/L (a safe step), far cheaper than eigh on GPUs.
    """
    if method == "eigh":
        return torch.linalg.eigvalsh(H.double()).max().to(H.dtype)
    if method == "power":
        v = torch.ones(H.shape[0], 1, dtype=H.dtype, device=H.device)
        for _ in range(iters):
            v = H @ v
            v = v / v.norm().clamp(min=torch.finfo(H.dtype).tiny)
        return (v.T @ H @ v).squeeze() * 1.01
    if method == "lanczos":  # accurate to ~1e-7 relative, see lambda_max_lanczos below
        return lambda_max_lanczos(H)
    raise ValueError(f"unknown lambda_max method {method!r}; allowed: 'eigh', 'power', 'lanczos'")


def check_problem(W: torch.Tensor, H: torch.Tensor, alpha: float, iters: int) -> None:
    if W.dim() != 2 or H.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"W must be (out x in) and H (in x in); got W {tuple(W.shape)}, H {tuple(H.shape)}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")


def magr_objective(W, W_hat, H, alpha, group_size=None) -> float:
    """F(W) = 1/2 tr((W - W_hat) H (W - W_hat)^T) + alpha * sum ||w||_inf (paper eq. (3))."""
    D = W - W_hat
    return float(0.5 * (D @ H * D).sum() + alpha * linf_norms(W, group_size).sum())


def magr_ista(W: torch.Tensor, H: torch.Tensor, alpha: float, iters: int, group_size: int | None = None,
              projection: str = "sort", normalize: bool = True, lambda_method: str = "eigh",
              dtype: torch.dtype = torch.float32, return_info: bool = False):
    """MagR by the published algorithm (paper Algorithm 1, ISTA); return the new weight (and a :class:`MagrInfo`).

    Args:
        W: weight W_hat in ``nn.Linear`` layout (out x in).
        H: X^T X (in x in) of the layer's input features X.
        alpha: l_inf penalty, relative to H scaled to lambda_max = 1 (the published convention).
            Published values: 1e-3 per channel, 1e-4 per group.
        iters: proximal-gradient iterations (200 in the released code, 150 in the paper).
        group_size: penalise every group of this many consecutive inputs instead of whole rows.
        projection: l1-ball threshold method, ``"sort"`` (published) or ``"newton"`` (sort-free).
        normalize: divide H by lambda_max(H) (step 1, prox scale alpha; the published convention).
            With False, ``alpha`` is absolute: F uses H as given, with step 1/lambda_max(H) and prox
            scale alpha/lambda_max(H).
        lambda_method: ``"eigh"`` (exact) or ``"power"`` (see :func:`lambda_max`).
        dtype: the computation dtype (float32 as published; float64 for checks).
        return_info: also return diagnostics (objective per iteration, row maxima before and after).
    """
    check_problem(W, H, alpha, iters)
    start = time.perf_counter()
    W_hat = W.to(dtype)
    Hc = H.to(device=W.device, dtype=dtype)
    lam = lambda_max(Hc, lambda_method)
    if not torch.isfinite(lam) or lam <= 0:
        log.warning("lambda_max(H) = %s: MagR leaves the weight unchanged", float(lam))
        out = W.clone()
        return (out, MagrInfo(lambda_max=float(lam))) if return_info else out
    if normalize:
        Hc = Hc / lam
        eta, prox_t = 1.0, alpha
    else:
        eta, prox_t = 1.0 / float(lam), alpha / float(lam)

    Wk = W_hat.clone()
    info = MagrInfo(lambda_max=float(lam)) if return_info else None
    for _ in range(iters):
        D = Wk - W_hat
        G = D @ Hc  # gradient of 1/2 ||X (W - W_hat)^T||^2
        if info is not None:
            info.objective.append(float(0.5 * (D * G).sum() + alpha * linf_norms(Wk, group_size).sum()))
        Wk = prox_linf(Wk - eta * G, prox_t, group_size, projection)
    if info is not None:
        info.objective.append(magr_objective(Wk, W_hat, Hc, alpha, group_size))
        info.row_max_before = W_hat.abs().amax(dim=1).cpu()
        info.row_max_after = Wk.abs().amax(dim=1).cpu()
        info.seconds = time.perf_counter() - start
    out = Wk.to(W.dtype)
    return (out, info) if return_info else out


def exact_objective(W, W_hat, H, alpha, group_size=None) -> float:
    """F(W) of :func:`magr_objective` computed in float64 (never TF32/bf16), whatever the inputs' dtype."""
    return magr_objective(W.double(), W_hat.double(), H.to(device=W.device, dtype=torch.float64), alpha, group_size)


def lambda_max_lanczos(H: torch.Tensor, iters: int = 128, tol: float = 1e-7, seed: int = 0) -> torch.Tensor:
    """Largest eigenvalue of a symmetric PSD H by Lanczos with full reorthogonalisation.

    The top eigenvalue theta of the tridiagonal T_k = Q_k^T H Q_k (Q_k an orthonormal basis of the
    Krylov space of a random start) is a lower bound of lambda_max that converges fast; it stops when
    the residual bound beta_k |s_k| (s the Ritz vector of T_k) is below ``tol * theta``.
    Costs ~``iters`` matrix-vector products instead of a full eigendecomposition.
    """
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be square, got shape {tuple(H.shape)}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    n = H.shape[0]
    k_max = min(iters, n)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, generator=g, dtype=torch.float64).to(device=H.device, dtype=H.dtype)
    q = q / q.norm()
    Q = torch.zeros(k_max, n, dtype=H.dtype, device=H.device)
    alphas = torch.zeros(k_max, dtype=torch.float64, device=H.device)
    betas = torch.zeros(k_max, dtype=torch.float64, device=H.device)
    theta = None
    h_scale = float(H.norm())  # >= lambda_max: the scale of "numerically zero"
    with matmul_precision("fp32"):
        for j in range(k_max):
            Q[j] = q
            w = H @ q
            alphas[j] = torch.dot(w, q)
            for _ in range(2):  # full reorthogonalisation, twice ("twice is enough")
                w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
            b = w.norm()
            betas[j] = b
            last = j + 1 == k_max
            if (j + 1) % 8 == 0 or last:
                T = torch.diag(alphas[: j + 1]) + torch.diag(betas[:j], 1) + torch.diag(betas[:j], -1)
                evals, evecs = torch.linalg.eigh(T.cpu())
                theta = float(evals[-1])
                resid = float(betas[j].cpu()) * abs(float(evecs[-1, -1]))
                if resid <= tol * abs(theta) or last:
                    break
            if float(b) <= 10 * torch.finfo(H.dtype).eps * h_scale:  # invariant subspace: T_k is exact
                T = torch.diag(alphas[: j + 1]) + torch.diag(betas[:j], 1) + torch.diag(betas[:j], -1)
                theta = float(torch.linalg.eigvalsh(T.cpu())[-1])
                break
            q = w / b
    return torch.tensor(theta, dtype=H.dtype, device=H.device)


class matmul_precision:
    """Context manager: float32 matmuls in IEEE fp32 ('fp32') or TF32 ('tf32'); 'bf16' leaves the setting.

    Uses ``torch.set_float32_matmul_precision`` and restores the previous value on exit.
    """

    _MAP = {"fp32": "highest", "tf32": "high"}

    def __init__(self, precision: str):
        self.precision = precision

    def __enter__(self):
        self.before = torch.get_float32_matmul_precision()
        if self.precision in self._MAP:
            torch.set_float32_matmul_precision(self._MAP[self.precision])

    def __exit__(self, *exc):
        torch.set_float32_matmul_precision(self.before)
        return False


