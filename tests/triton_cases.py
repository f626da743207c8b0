"""Every Triton kernel of magr against its CPU reference, on CPU tensors in Triton's interpreter.

Run by tests/test_triton_interpreter.py in one subprocess (TRITON_INTERPRET must be set before Triton is
imported): ``python triton_cases.py [case ...]`` prints one JSON line per case with what the test checks.
Shapes are small but cross every tile edge of the kernels:

- CD sweep (magr.core.cd_triton: ROWS = 16 rows per program, BK = 256 columns per update chunk, GB = the
  refit group padded to a power of two): 17, 18 or 21 rows (a second, partial row tile), 264 columns (a second,
  partial chunk), groups of 24 (padded to 32) and 128; per channel and per group, 2/3/4 bits, asymmetric and
  symmetric, cd_grid keep and refit. Checked against the C kernel (same arithmetic: equal codes, grids and
  passes) and against the pure-torch loop (differences only at rounding ties, traced as tests/test_cd_sweep.py).
- fused prox step (magr.core.kernels: rows of 2048 // BLOCK segments per program, BLOCK = the segment padded to a
  power of two): segments of 300 (padded to 512, 4 per program, a partial last program), 24 (padded to 32,
  64 per program, 70 segments), 128 (exact, 16 per program, 40 segments) and 4100 (padded to 8192, one per
  program); P in float32 and bfloat16, t = 0, small, large; against the torch step within float32 rounding.
- FISTA (magr.core.fista.magr_fista, the MagR step's solver) with the Triton prox against the torch prox: every
  iterate within float32 rounding, per channel and per group, stacked layers.
"""
from __future__ import annotations

import json
import sys
import time

import torch
from test_cd_sweep import correlated_layer  # the same layers as the C kernel's tests (tests/ is on sys.path)

EPS32 = 2.0**-24



# --- CD sweep -----------------------------------------------------------------------------------------

CD_CASES = {  # id: (bits, group_size, sym, grid, out, n, passes)
    "cd-w2-channel-keep": (2, None, False, "keep", 18, 264, 3),
    "cd-w3-channel-keep": (3, None, False, "keep", 21, 100, 2),
    "cd-w4-channel-keep": (4, None, False, "keep", 18, 100, 2),
    "cd-w2-g24-keep": (2, 24, False, "keep", 18, 96, 3),
    "cd-w2-g24-refit": (2, 24, False, "refit", 18, 96, 3),
    "cd-w3-g24-refit": (3, 24, False, "refit", 21, 72, 3),
    "cd-w4-g24-refit": (4, 24, False, "refit", 18, 72, 2),
    "cd-w2-g24-refit-sym": (2, 24, True, "refit", 18, 72, 3),
    "cd-w2-g128-refit": (2, 128, False, "refit", 17, 256, 2),
    "cd-w2-channel-converged": (2, None, False, "keep", 18, 40, 30),
}


def cd_case(bits, group_size, sym, grid_kind, out, n, passes) -> dict:
    from magr.core.cd_check import codes, compare_sweeps
    from magr.core.quantizers import Grid, rtn
    from magr.core.refinement import CD, cd_refine, cd_refine_compiled

    W, H = correlated_layer(bits * 100 + n + out, out, n)
    grid = Grid(bits, group_size, sym=sym, beta=0.9)
    Q0, p = rtn(W, grid)
    refit = grid if grid_kind == "refit" else None
    damp, eps = CD.damp, CD.eps
    qc, pc = cd_refine_compiled(Q0, W, H, p, passes, damp, eps, refit, kernel="c")
    qt, pt = cd_refine_compiled(Q0, W, H, p, passes, damp, eps, refit, kernel="triton")
    qr, pr = cd_refine(Q0, W, H, p, passes, damp, eps, refit)
    differ = (codes(qr, pr) != codes(qt, pt)) | (pr.scale != pt.scale)[:, pr.g_idx]
    ties = []
    if differ.any():  # trace every differing row to a rounding tie (reruns the sweeps pass by pass)
        ties = compare_sweeps(Q0, W, H, p, passes, damp, eps, refit, kernel="triton").ties
    return {"entries": qc.numel(), "changed_by_cd": int((codes(qc, pc) != codes(Q0.float(), p)).sum()),
            "differing_vs_c": int((codes(qc, pc) != codes(qt, pt)).sum()),
            "values_equal_c": bool(torch.equal(qc, qt)),
            "scales_equal_c": bool(torch.equal(pc.scale, pt.scale) and torch.equal(pc.zero, pt.zero)),
            "differing_vs_torch": int(differ.sum()), "ties_vs_torch": ties}


# --- fused prox step ----------------------------------------------------------------------------------

PROX_CASES = {  # id: (out, in, group_size, P dtype)
    "prox-channel-300": (10, 300, None, "float32"),
    "prox-g24": (10, 168, 24, "float32"),
    "prox-g128": (20, 256, 128, "float32"),
    "prox-channel-4100": (3, 4100, None, "float32"),
    "prox-channel-300-bf16": (10, 300, None, "bfloat16"),
    "prox-g24-bf16": (10, 168, 24, "bfloat16"),
}


PROX_THRESHOLDS = (1e-3, 1e-4, 0.0, 10.0)  # small, smaller, none, and one that clips every entry


def prox_problem(out: int, n: int, dtype=torch.float32, device="cpu"):
    """(W_hat, W, P, G) of one prox step, with a zero row (tau = 0); P in ``dtype``."""
    g = torch.Generator().manual_seed(out * n)
    W_hat = 0.02 * torch.randn(out, n, generator=g)
    W_hat[0] = 0.0
    W = W_hat + 1e-3 * torch.randn(out, n, generator=g)
    P = (1e-3 * torch.randn(out, n, generator=g)).to(dtype)
    G = 1e-3 * torch.randn(out, n, generator=g)
    P[0], G[0] = 0.0, 0.0
    return tuple(x.to(device) for x in (W_hat, W, P, G))


def prox_both_backends(W_hat, W, P, G, t, group_size):
    """((W, P) after the torch step, (W, P) after the Triton step) from the same state."""
    from magr.core.kernels import prox_step_

    outs = []
    for backend in ("torch", "triton"):
        W2, P2 = W.clone(), P.clone()
        prox_step_(W_hat, W2, P2, G, t, 0.5, group_size, backend=backend)
        outs.append((W2, P2))
    return outs


def prox_case(out, n, group_size, p_dtype) -> dict:
    from magr.core.projection import prox_linf

    W_hat, W, P, G = prox_problem(out, n, getattr(torch, p_dtype))
    rows = []
    for t in PROX_THRESHOLDS:
        (Wt, Pt), (Wk, Pk) = prox_both_backends(W_hat, W, P, G, t, group_size)
        V = W_hat + P.float() - G
        ref = prox_linf(V.double(), t, group_size, method="sort")
        scale = float(V.abs().max())
        rows.append({"t": t, "w_ulps": float((Wk - Wt).abs().max()) / (scale * EPS32),
                     "p_rel": float(((Pk.float() - Pt.float()).abs() / Pt.float().abs().clamp(min=scale * EPS32)).max()),
                     "ref_ulps": float((Wk.double() - ref).abs().max()) / (scale * EPS32),
                     "clipped": int((Wk != V).sum())})
    return {"entries": out * n, "steps": rows}


# --- FISTA with the Triton prox -----------------------------------------------------------------------

FISTA_CASES = {  # id: (rows per stacked layer, in, group_size, iters)
    "fista-channel-stacked": ([24, 9], 100, None, 20),
    "fista-g24": ([18], 72, 24, 20),
}


def fista_case(rows, n, group_size, iters) -> dict:
    from magr.core.fista import magr_fista

    W, H = correlated_layer(n, sum(rows), n)
    alpha = 1e-3 if group_size is None else 1e-4
    runs = {}
    for kernel in ("torch", "triton"):
        its = []
        out, infos = magr_fista(W, H, alpha, iters, group_size, precision="fp32", kernel=kernel, return_info=True,
                                rows=rows, callback=lambda k, Wk: its.append(Wk.clone()))
        runs[kernel] = (its, out, infos)
    (it_t, out_t, inf_t), (it_k, out_k, inf_k) = runs["torch"], runs["triton"]
    scale = float(W.abs().max())
    diffs = [float((a - b).abs().max()) / (scale * EPS32) for a, b in zip(it_t, it_k)]
    return {"iters": len(it_k), "iterate_ulps": diffs, "moved": float((out_k - W).abs().max()),
            "objective_rel": max(abs(a.objective[-1] / b.objective[-1] - 1) for a, b in zip(inf_k, inf_t)),
            "objective_decreased": all(i.objective[-1] < i.objective[0] for i in inf_k)}


CASES = {**{k: (cd_case, v) for k, v in CD_CASES.items()}, **{k: (prox_case, v) for k, v in PROX_CASES.items()},
         **{k: (fista_case, v) for k, v in FISTA_CASES.items()}}


def main(names: list[str]) -> None:
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (the Triton kernels run on CPU tensors in the interpreter)")
    torch.set_num_threads(1)
    for name in names or list(CASES):
        fn, args = CASES[name]
        t0 = time.perf_counter()
        try:
            result = fn(*args)
        except Exception as exc:  # reported to the test that owns the case
            result = {"error": f"{type(exc).__name__}: {exc}"}
        result["seconds"] = time.perf_counter() - t0
        print(json.dumps({"case": name, **result}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
