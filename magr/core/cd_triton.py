"""The coordinate-descent sweep of :mod:`magr.core.cd_sweep` as one Triton kernel launch (CUDA).

One program per tile of ROWS rows runs every pass over the columns of its rows: per column it loads the rows'
targets t[:, j] (float64), rounds them to the grid in float32 (the formula of magr.core.quantizers.quantize, with
IEEE division and round-half-to-even), and only when a code changed corrects the targets of the changed rows,
t -= delta * N[j, :], in chunks of BK columns; rows whose pass changed nothing stop. With ``refit_group`` g > 0
the grid of each group is re-fitted at its first column from Q[:, j:j+g] (Grid.row_params). Same arithmetic as
the C kernel (no FMA contraction), so CPU and CUDA give the same codes up to rounding ties.

Tested on the CPU with TRITON_INTERPRET=1 (tests/test_cd_sweep.py); not run on a GPU while it was written.
"""
from __future__ import annotations

import os

import torch

try:  # optional: without Triton the pure-torch loop runs on CUDA
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

ROWS, BK = 16, 256


def triton_unavailable() -> str | None:
    """Why the Triton sweep cannot run here, or None."""
    if triton is None:
        return "Triton is not installed"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "no CUDA device"
    return None


if triton is not None:

    @triton.jit
    def _round_half_even(x):
        r = tl.floor(x)
        d = x - r  # exact for the magnitudes of grid codes
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        return tl.where((d > 0.5) | ((d == 0.5) & odd), r + 1.0, r)

    @triton.jit
    def _cd_sweep_kernel(Q, T, N, S, Z, GI, RAN, out, n, n_groups, refit_group, passes, beta, maxq,
                         ROWS: tl.constexpr, BK: tl.constexpr, GB: tl.constexpr, REFIT: tl.constexpr,
                         SYM: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        inside = rows < out
        r64 = rows.to(tl.int64)
        active = inside.to(tl.int32)
        ran = tl.zeros([ROWS], dtype=tl.int32)
        n_active = tl.sum(active, axis=0)
        p = n_active * 0  # an int32 scalar: loop-carried values keep one type
        while (p < passes) & (n_active > 0):
            changed = tl.zeros([ROWS], dtype=tl.int32)
            for j in range(0, n):
                live = active != 0
                if REFIT:
                    if j % refit_group == 0:  # Grid.row_params of Q[rows, j:j+g], the current values
                        cols = j + tl.arange(0, GB)
                        m = live[:, None] & (cols[None, :] < j + refit_group)
                        v = tl.load(Q + r64[:, None] * n + cols[None, :], mask=m, other=0.0)
                        xmin = tl.minimum(tl.min(v, axis=1), 0.0)
                        xmax = tl.maximum(tl.max(v, axis=1), 0.0)
                        if SYM:
                            xmax = tl.maximum(-xmin, xmax)
                            xmin = tl.where(xmin < 0.0, -xmax, xmin)
                        flat = (xmin == 0.0) & (xmax == 0.0)
                        xmin = tl.where(flat, -1.0, xmin)
                        xmax = tl.where(flat, 1.0, xmax)
                        s_new = tl.math.div_rn(beta * (xmax - xmin), maxq)
                        if SYM:
                            z_new = tl.zeros([ROWS], dtype=tl.float32) + (maxq + 1.0) * 0.5
                        else:
                            z_new = _round_half_even(tl.math.div_rn(-xmin, s_new))
                        gpos = r64 * n_groups + j // refit_group
                        tl.store(S + gpos, s_new, mask=live)
                        tl.store(Z + gpos, z_new, mask=live)
                        tl.debug_barrier()
                gi = tl.load(GI + j)
                s = tl.load(S + r64 * n_groups + gi, mask=live, other=1.0)
                z = tl.load(Z + r64 * n_groups + gi, mask=live, other=0.0)
                u = tl.load(T + r64 * n + j, mask=live, other=0.0).to(tl.float32)
                old = tl.load(Q + r64 * n + j, mask=live, other=0.0)
                q = _round_half_even(tl.math.div_rn(u, s)) + z
                q = tl.minimum(tl.maximum(q, 0.0), maxq)
                new = s * (q - z)
                ch = live & (new != old)
                tl.store(Q + r64 * n + j, new, mask=ch)
                changed = changed | ch.to(tl.int32)
                if tl.sum(ch.to(tl.int32), axis=0) > 0:
                    d = tl.where(ch, new.to(tl.float64) - old.to(tl.float64), 0.0)
                    for k0 in range(0, n, BK):
                        ks = k0 + tl.arange(0, BK)
                        nj = tl.load(N + j * n + ks, mask=ks < n, other=0.0).to(tl.float64)
                        m2 = ch[:, None] & (ks < n)[None, :]
                        ptr = T + r64[:, None] * n + ks[None, :]
                        tl.store(ptr, tl.load(ptr, mask=m2, other=0.0) - d[:, None] * nj[None, :], mask=m2)
                tl.debug_barrier()  # the next column reads targets and codes other threads wrote
            ran = tl.where(active != 0, p + 1, ran)
            active = active & changed
            n_active = tl.sum(active, axis=0)
            p += 1
        tl.store(RAN + rows, ran.to(tl.int64), mask=inside)


def sweep_triton(Q, T, N, scale, zero, g_idx, refit_group: int, beta: float, maxq: int, sym: bool,
                 passes: int) -> torch.Tensor:
    """:func:`magr.core.cd_sweep.sweep_cpu` on CUDA (or the Triton interpreter): in place, returns passes per row."""
    out, n = Q.shape
    for name, x in (("Q", Q), ("T", T), ("N", N), ("scale", scale), ("zero", zero), ("g_idx", g_idx)):
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous for the Triton sweep")
    ran = torch.zeros(out, dtype=torch.int64, device=Q.device)
    gb = triton.next_power_of_2(max(refit_group, 1))
    _cd_sweep_kernel[(triton.cdiv(out, ROWS),)](
        Q, T, N, scale, zero, g_idx, ran, out, n, scale.shape[1], max(refit_group, 1), passes, float(beta),
        float(maxq), ROWS=ROWS, BK=BK, GB=gb, REFIT=refit_group > 0, SYM=bool(sym), enable_fp_fusion=False)
    return ran
