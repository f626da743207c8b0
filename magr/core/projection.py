"""Euclidean projection onto the l1 ball and the prox of the l_inf norm, row by row.

Both rest on one scalar per row, the soft threshold tau >= 0 that solves

    f(tau) = sum_i max(|v_i| - tau, 0) = r          (tau = 0 when ||v||_1 <= r),

a convex, piecewise-linear, decreasing function of tau. Then

    proj_{||.||_1 <= r}(v) = sign(v) * max(|v| - tau, 0)          (paper Algorithms 2 and 3),
    prox_{t ||.||_inf}(v)  = v - t * proj_{||.||_1 <= 1}(v / t)    (Moreau decomposition)
                           = clip(v, -tau_t, tau_t)  with tau_t the threshold of v for r = t.

Two exact ways to find tau, selected by ``method``:

- ``"sort"``: Duchi et al. (2008), the published algorithm. Sort |v| descending into mu, take
  rho = max{i : mu_i > (sum_{k<=i} mu_k - r) / i} and tau = (sum_{k<=rho} mu_k - r) / rho.
- ``"newton"``: sort-free. Newton's method on f from tau = 0 (Michelot's algorithm):
  tau <- (sum_{|v_i| > tau} |v_i| - r) / #{|v_i| > tau}. On a convex decreasing f the iterates rise
  monotonically to the root and stop once the active set no longer changes, where tau equals the
  sort formula exactly. Each step is a masked row reduction, so it batches over rows and suits GPUs.
"""
from __future__ import annotations

import torch

METHODS = ("sort", "newton")


def _check_rows(V: torch.Tensor) -> None:
    if V.dim() != 2:
        raise ValueError(f"expected a 2-D tensor (rows x entries), got shape {tuple(V.shape)}")
    if not V.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got dtype {V.dtype}")


def _as_row_radius(radius, V: torch.Tensor) -> torch.Tensor:
    r = torch.as_tensor(radius, dtype=V.dtype, device=V.device)
    if r.dim() == 0:
        r = r.expand(V.shape[0])
    r = r.reshape(-1, 1)
    if r.shape[0] != V.shape[0]:
        raise ValueError(f"radius has {r.shape[0]} entries, expected 1 or one per row ({V.shape[0]})")
    if torch.any(r < 0):
        raise ValueError(f"radius must be >= 0, got min {r.min().item()}")
    return r


def threshold_sort(A: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """tau per row for nonnegative rows A (Duchi et al. 2008); r has shape (rows, 1); returns (rows, 1)."""
    n = A.shape[1]
    mu, _ = torch.sort(A, dim=1, descending=True)
    cs = torch.cumsum(mu, dim=1) - r
    idx = torch.arange(1, n + 1, device=A.device, dtype=A.dtype)
    cond = mu * idx > cs  # mu_i > (cumsum_i - r) / i, without the division
    # rho = the largest i where cond holds (cond holds on a prefix in exact arithmetic).
    rho = torch.where(cond, idx, torch.zeros_like(idx)).amax(dim=1, keepdim=True).clamp(min=1)
    tau = cs.gather(1, rho.long() - 1) / rho
    return tau.clamp(min=0)


def threshold_newton(A: torch.Tensor, r, max_iter: int = 100, tau0: torch.Tensor | None = None) -> torch.Tensor:
    """tau per row for nonnegative rows A by Newton/Michelot steps from tau = 0 (sort-free, exact).

    Stops when no row's active set {A > tau} changes, so the result is the same closed form as the
    sort path, reached in a handful of masked reductions (typically under 10). ``tau0`` (rows, 1), a
    lower bound of the root, may replace the start tau = 0. ``r`` is a float or a (rows, 1) tensor.
    """
    tau = torch.zeros(A.shape[0], 1, dtype=A.dtype, device=A.device) if tau0 is None else tau0
    count = None
    for _ in range(max_iter):
        active = A > tau
        new_count = active.sum(dim=1, keepdim=True)
        if count is not None and torch.equal(new_count, count):
            break
        count = new_count
        s = torch.where(active, A, torch.zeros_like(A)).sum(dim=1, keepdim=True)
        tau = torch.maximum(tau, (s - r) / count.clamp(min=1).to(A.dtype))
    return tau.clamp(min=0)


def l1_threshold(A: torch.Tensor, radius, method: str = "sort") -> torch.Tensor:
    """The root tau >= 0 of sum_i max(A_i - tau, 0) = radius for every row of a nonnegative A.

    Rows with sum(A) <= radius get tau = 0. Returns shape (rows, 1).
    """
    r = _as_row_radius(radius, A)
    if method == "sort":
        tau = threshold_sort(A, r)
    elif method == "newton":
        tau = threshold_newton(A, r)
    else:
        raise ValueError(f"unknown projection method {method!r}; allowed: {', '.join(METHODS)}")
    inside = A.sum(dim=1, keepdim=True) <= r
    return torch.where(inside, torch.zeros_like(tau), tau)


def project_l1_ball(V: torch.Tensor, radius=1.0, method: str = "sort") -> torch.Tensor:
    """Project every row of V onto {x : ||x||_1 <= radius} (paper Algorithms 2-3).

    w = sign(v) * max(|v| - tau, 0) with tau from :func:`l1_threshold`; rows already inside are
    returned unchanged. ``radius`` is a scalar or one value per row.
    """
    _check_rows(V)
    A = V.abs()
    r = _as_row_radius(radius, V)
    tau = l1_threshold(A, r, method)
    out = torch.sign(V) * (A - tau).clamp(min=0)
    inside = A.sum(dim=1, keepdim=True) <= r
    return torch.where(inside, V, out)


def _grouped(V: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """View a (rows, n) tensor as (rows * n / g, g): groups of g consecutive entries of a row."""
    if group_size is None:
        return V
    n = V.shape[1]
    if group_size <= 0 or n % group_size != 0:
        raise ValueError(
            f"group_size {group_size} does not divide the row length {n}; "
            f"use a positive divisor of {n} or None for whole rows"
        )
    return V.reshape(-1, group_size)


def prox_linf(V: torch.Tensor, t, group_size: int | None = None, method: str = "sort") -> torch.Tensor:
    """prox of t * ||.||_inf on every row, or on every group of ``group_size`` consecutive entries.

    By the Moreau decomposition prox_{t||.||_inf}(v) = v - t * proj_{l1 ball}(v / t), which is v
    clipped at +-tau with sum_i max(|v_i| - tau, 0) = t (the whole row becomes 0 when ||v||_1 <= t).
    Used by MagR's proximal step (paper eq. (4), Algorithm 1). ``t`` is a scalar >= 0.
    """
    _check_rows(V)
    t = float(t)
    if t < 0:
        raise ValueError(f"prox scale t must be >= 0, got {t}")
    if t == 0:
        return V.clone()
    G = _grouped(V, group_size)
    tau = l1_threshold(G.abs(), t, method)
    return torch.minimum(torch.maximum(G, -tau), tau).reshape(V.shape)


def linf_norms(W: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """||w||_inf of every row (or every group of a row), the penalty of paper eq. (3)."""
    return _grouped(W, group_size).abs().amax(dim=1)
