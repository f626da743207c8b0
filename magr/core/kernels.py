"""Fused proximal step of the fast MagR solver: one pass over the weights per iteration.

Given the reference weights W_hat, the current iterate W_k, the extrapolation offset P = Y - W_hat
and the gradient G = P H at Y, one (accelerated) proximal-gradient step is

    V = Y - G = W_hat + P - G,     W_{k+1} = prox_{t ||.||_inf}(V) = clip(V, -tau, tau)  per segment,
    P <- W_{k+1} + m (W_{k+1} - W_k) - W_hat,      W_k <- W_{k+1}                  (m: momentum)

where a segment is a whole row or a group of ``L`` consecutive entries, and tau solves
sum_i max(|v_i| - tau, 0) = t (tau = 0 when ||v||_1 <= t). tau is found sort-free and exactly by
Newton/Michelot steps started at tau_0 = max(max|v| - t, 0), which is never above the root
(f(max|v| - t) >= t), so the steps rise monotonically to the root and stop once the active set
{|v| > tau} stops changing; with a small t only the few largest entries are active, so it takes
2 or 3 steps. m = 0 gives the plain proximal-gradient step of the published algorithm.

Two backends compute the same thing: a Triton kernel (CUDA, one program per segment or per block of
short segments, the whole threshold search on-chip) and a pure-torch version (any device).
"""
from __future__ import annotations


import torch


try:  # Triton is optional: the torch backend covers the CPU and machines without it.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAVE_TRITON = False

BACKENDS = ("auto", "triton", "torch")
NEWTON_MAX_STEPS = 64


def _newton_on_candidates(vals, rows, tau, t: float | torch.Tensor, n_rows: int, max_steps: int):
    """Newton/Michelot steps on the candidate entries only (values ``vals`` of rows ``rows``), from ``tau``.

    ``t``: one prox scale, or one per row. Returns (tau, count): the last step left every row's active set (of
    ``count`` entries) unchanged.
    """
    count = None
    for _ in range(max_steps):
        act = vals > tau[rows]
        # tau only rises, so an entry once inactive stays so: keep the active ones (in order: the same sums)
        vals, rows = vals[act], rows[act]
        new_count = torch.bincount(rows, minlength=n_rows)
        if count is not None and torch.equal(new_count, count):
            break
        count = new_count
        s = torch.zeros(n_rows, dtype=vals.dtype, device=vals.device).index_add_(0, rows, vals)
        tau = torch.maximum(tau, (s - t) / count.clamp(min=1).to(vals.dtype))
    return tau, count


def linf_threshold_from_max(A: torch.Tensor, t: float, max_steps: int = NEWTON_MAX_STEPS,
                            mask: torch.Tensor | None = None, kept: torch.Tensor | None = None) -> torch.Tensor:
    """tau >= 0 per row of a nonnegative A with sum_i max(A_i - tau, 0) = t (tau = 0 if sum A <= t).

    Newton/Michelot, tau <- max(tau, (sum_{A_i > tau} A_i - t) / #{A_i > tau}) for every row at once, from
    tau_0 = max(max A - t, 0), a lower bound of the root: tau only rises, so only the few candidates
    A_i > tau_0 can ever be active, and the steps run on those alone (gathered once). The search ends when
    no row's active set changes; the last step is then taken again on the full rows (the sum over the
    active set as a full-row masked sum, as :func:`magr.core.projection.threshold_newton` takes it, so the result
    is the same to the bit) and checked: where an active set would still change, the full-row Newton
    search runs instead. The root is the sort formula's tau. ``mask`` (bool) and ``kept`` (A's dtype), shaped
    like A, are optional work buffers. Returns shape (rows, 1).
    """
    from .projection import threshold_newton

    mask = torch.empty_like(A, dtype=torch.bool) if mask is None else mask
    kept = torch.empty_like(A) if kept is None else kept
    tau0 = (A.amax(dim=1, keepdim=True) - t).clamp(min=0)
    rows, cols = torch.gt(A, tau0, out=mask).nonzero(as_tuple=True)
    vals = A[rows, cols]
    tau, count = _newton_on_candidates(vals, rows, tau0[:, 0], t, A.shape[0], max_steps)
    if count is None:  # max_steps == 0: no Newton step ran
        return tau0
    active = torch.gt(A, tau.unsqueeze(1), out=mask)
    s = torch.where(active, A, A.new_zeros(()), out=kept).sum(dim=1)
    tau = torch.maximum(tau0[:, 0], (s - t) / count.clamp(min=1).to(A.dtype))
    if not torch.equal(torch.bincount(rows[vals > tau[rows]], minlength=A.shape[0]), count):
        return threshold_newton(A, t, max_iter=max_steps, tau0=tau0)  # a float tie moved a set: full search
    return tau.unsqueeze(1).clamp(min=0)


def prox_workspace(W: torch.Tensor) -> dict[str, torch.Tensor]:
    """Work buffers of the torch prox step for weights shaped like W, to reuse across iterations (a fresh
    buffer in every step costs a page fault per 4 KiB page on first touch, often more than the arithmetic)."""
    return {"V": torch.empty_like(W), "A": torch.empty_like(W), "mask": torch.empty_like(W, dtype=torch.bool),
            "kept": torch.empty_like(W)}


def _prox_step_torch(W_hat, W, P, G, t: float, momentum: float, seg: int, work=None) -> None:
    work = prox_workspace(W_hat) if work is None else work
    V = torch.add(W_hat, P.to(W_hat.dtype), out=work["V"]).sub_(G.to(W_hat.dtype))  # V = W_hat + P - G
    A = torch.abs(V, out=work["A"])
    tau = linf_threshold_from_max(A.view(-1, seg), t, mask=work["mask"].view(-1, seg), kept=work["kept"].view(-1, seg))
    Vs = V.view(-1, seg)
    torch.minimum(torch.maximum(Vs, -tau, out=Vs), tau, out=Vs)  # W_new = clip(V, -tau, tau), in place
    D = torch.sub(V, W, out=A).mul_(momentum)  # m (W_new - W), in A's buffer
    P.copy_(torch.add(V, D, out=D).sub_(W_hat))  # W_new + m (W_new - W) - W_hat
    W.copy_(V)


if HAVE_TRITON:

    @triton.jit
    def _prox_step_kernel(
        W_hat_ptr, W_ptr, P_ptr, G_ptr,
        n_seg, seg_len, t, momentum,
        ROWS: tl.constexpr, BLOCK: tl.constexpr, MAX_STEPS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        mask = (rows[:, None] < n_seg) & (cols[None, :] < seg_len)
        offs = rows[:, None].to(tl.int64) * seg_len + cols[None, :]
        v = (tl.load(W_hat_ptr + offs, mask=mask, other=0.0)
             + tl.load(P_ptr + offs, mask=mask, other=0.0).to(tl.float32)
             - tl.load(G_ptr + offs, mask=mask, other=0.0).to(tl.float32))
        # |v| of masked entries is 0, never active (tau >= 0); only v stays live in the search
        tau = tl.maximum(tl.max(tl.abs(v), axis=1) - t, 0.0)
        count = tl.zeros([ROWS], dtype=tl.int32) - 1
        changed = tl.sum(tl.full([ROWS], 1, tl.int32), axis=0)  # int32 scalars, loop-carried
        step = changed * 0
        while changed > 0:
            active = tl.abs(v) > tau[:, None]
            new_count = tl.sum(active.to(tl.int32), axis=1)
            s = tl.sum(tl.where(active, tl.abs(v), 0.0), axis=1)
            tau = tl.maximum(tau, (s - t) / tl.maximum(new_count, 1).to(tl.float32))
            changed = tl.sum((new_count != count).to(tl.int32), axis=0)
            count = new_count
            step += 1
            changed = changed * (step < MAX_STEPS).to(tl.int32)
        w_new = tl.minimum(tl.maximum(v, -tau[:, None]), tau[:, None])
        w_hat = tl.load(W_hat_ptr + offs, mask=mask, other=0.0)  # again: an L2 hit, fewer live registers
        w_old = tl.load(W_ptr + offs, mask=mask, other=0.0)
        p_new = w_new + momentum * (w_new - w_old) - w_hat
        tl.store(W_ptr + offs, w_new, mask=mask)
        tl.store(P_ptr + offs, p_new.to(P_ptr.dtype.element_ty), mask=mask)


def _launch_config(seg: int) -> tuple[int, int, int]:
    """(rows per program, padded segment length, warps): >= 2048 elements per program, 8 per thread.

    8 elements per thread keep the whole segment in registers without spills on sm_90 (ptxas: 64
    registers for a 4096 or 16384 row with 16 or 32 warps, 128 for 16 groups of 128 with 8 warps).
    """
    block = triton.next_power_of_2(seg)
    rows = max(1, 2048 // block)
    warps = min(32, max(4, (rows * block) // 256))
    return rows, block, warps


def _prox_step_triton(W_hat, W, P, G, t: float, momentum: float, seg: int) -> None:
    for name, x in (("W_hat", W_hat), ("W", W), ("P", P), ("G", G)):
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous for the Triton backend")
    n_seg = W.numel() // seg
    rows, block, warps = _launch_config(seg)
    grid = (triton.cdiv(n_seg, rows),)
    _prox_step_kernel[grid](
        W_hat, W, P, G, n_seg, seg, float(t), float(momentum),
        ROWS=rows, BLOCK=block, MAX_STEPS=NEWTON_MAX_STEPS, num_warps=warps,
    )


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA when Triton is installed, else 'torch'."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if (HAVE_TRITON and device.type == "cuda") else "torch"
    if backend == "triton" and not HAVE_TRITON:
        raise RuntimeError("kernel backend 'triton' requested but Triton is not installed; use 'torch' or 'auto'")
    if backend == "triton" and device.type != "cuda" and not _interpreting():
        raise RuntimeError(f"kernel backend 'triton' needs a CUDA tensor, got device {device}")
    return backend


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def prox_step_(W_hat, W, P, G, t: float, momentum: float = 0.0, group_size: int | None = None,
               backend: str = "auto", work: dict | None = None) -> None:
    """In place: W <- prox_{t||.||_inf}(W_hat + P - G) per row (or group); P <- W_new + m (W_new - W_old) - W_hat.

    W_hat and W are float32 or float64 (out x in); P (the matmul input, may be bfloat16) and G (the
    gradient P @ H, any float dtype) have the same shape. ``t`` >= 0 is the prox scale, ``momentum``
    the extrapolation weight m (0 for plain proximal gradient). ``work``: :func:`prox_workspace` of W_hat,
    reused by the torch backend across calls.
    """
    if not (W_hat.shape == W.shape == P.shape == G.shape) or W.dim() != 2:
        raise ValueError(
            f"W_hat, W, P, G must share one 2-D shape; got {tuple(W_hat.shape)}, {tuple(W.shape)}, "
            f"{tuple(P.shape)}, {tuple(G.shape)}"
        )
    if t < 0:
        raise ValueError(f"prox scale t must be >= 0, got {t}")
    seg = W.shape[1] if group_size is None else int(group_size)
    if seg <= 0 or W.shape[1] % seg != 0:
        raise ValueError(f"group_size {group_size} does not divide the row length {W.shape[1]}")
    kind = resolve_backend(backend, W.device)
    if kind == "triton" and W.dtype == torch.float32 and W_hat.dtype == torch.float32:
        _prox_step_triton(W_hat, W, P, G, t, momentum, seg)
    else:
        _prox_step_torch(W_hat, W, P, G, t, momentum, seg, work)
