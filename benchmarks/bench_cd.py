"""Compiled coordinate descent vs the pure-torch loop, and the MagR prox step vs its gradient matmul (issue 11).

For each layer shape (out x in) of SmolLM2-135M (hidden 576, intermediate 1536) and of LLaMA-2-7B, in one run:

- CD: 30 passes of :func:`magr.core.refinement.cd_refine_compiled` (one kernel call) and of :func:`cd_refine` (the
  pure-torch loop, the reference; also without its stop after a pass that changed nothing, i.e. the loop as it
  was before issue 11), from the OPTQ codes of a random weight with outliers (RTN codes on the
  LLaMA shapes, where OPTQ on the CPU would dominate the run) and H = X^T X of correlated random features;
  the codes of both are compared (differing entries counted). On the LLaMA shapes the torch loop runs one pass
  and its time is multiplied by 30 ("x30, extrapolated"): an upper bound, since it stops early once converged.
- prox: one fast-MagR (FISTA) iteration is a matmul G = P H_n and a prox step; the script times both on the
  iterates of a real run (median over the iterations), for the prox step as it is now (candidate search,
  reused buffers) and as it was (full-row Newton search, fresh buffers), and prints the prox's share.

    python benchmarks/bench_cd.py                       # SmolLM2 shapes, then LLaMA-2-7B shapes
    python benchmarks/bench_cd.py --shapes smollm2 --repeats 3 --json out.json

Timings on a shared machine vary between runs: compare the figures of one run (the ratios), and repeat.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from magr.core.cd_check import codes
from magr.core.fista import fista_momenta
from magr.core.kernels import prox_step_, prox_workspace
from magr.core.optq import OPTQ
from magr.core.projection import threshold_newton
from magr.core.quantizers import Grid, default_beta, rtn
from magr.core.refinement import CD, cd_refine, cd_refine_compiled
from magr.core.solver import lambda_max

SHAPES = {
    "smollm2": {"q/o_proj": (576, 576), "k/v_proj": (192, 576), "gate/up_proj": (1536, 576),
                "down_proj": (576, 1536)},
    "llama2-7b": {"q/k/v/o_proj": (4096, 4096), "gate/up_proj": (11008, 4096), "down_proj": (4096, 11008)},
    "tiny": {"layer": (24, 48)},  # smoke test
}
TOKENS = {"smollm2": 2048, "llama2-7b": 2048, "tiny": 64}  # SmolLM2 profile: 4 x 512 calibration tokens


def layer(out: int, n: int, tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rank = min(tokens, n) // 2
    X = torch.randn(tokens, rank, generator=g) @ (torch.randn(rank, n, generator=g) / rank**0.5)
    X += 0.1 * torch.randn(tokens, n, generator=g)
    W = 0.02 * torch.randn(out, n, generator=g)
    W[::16, 7] = 0.3
    return W, X.T @ X


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def bench_cd(W, H, grid: Grid, passes: int, ref_passes: int, start: str) -> dict:
    Q0, p = OPTQ()(W, H, grid) if start == "optq" else rtn(W, grid)
    cd = CD()
    (Qc, pc), t_comp = timed(cd_refine_compiled, Q0, W, H, p, passes, cd.damp, cd.eps)
    (Qr, pr), t_ref = timed(cd_refine, Q0, W, H, p, ref_passes, cd.damp, cd.eps)
    # without the early stop: the same work as above when only one pass runs (the stop acts after a pass)
    t_all = timed(cd_refine, Q0, W, H, p, ref_passes, cd.damp, cd.eps, None, 128, False)[1] if ref_passes > 1 else t_ref
    row = {"compiled_s": t_comp, "torch_s": t_ref * passes / ref_passes, "torch_extrapolated": ref_passes != passes,
           "torch_all_passes_s": t_all * passes / ref_passes}
    if ref_passes == passes:
        row["differing_codes"] = int((codes(Qc, pc) != codes(Qr, pr)).sum())
    else:  # compare one pass with one pass
        Q1, p1 = cd_refine_compiled(Q0, W, H, p, ref_passes, cd.damp, cd.eps)
        row["differing_codes"] = int((codes(Q1, p1) != codes(Qr, pr)).sum())
    row["speedup"] = row["torch_s"] / t_comp
    row["speedup_all_passes"] = row["torch_all_passes_s"] / t_comp
    return row


def previous_prox_step(W_hat, W, P, G, t, momentum, seg) -> None:
    """The prox step before issue 11: full-row Newton search from max|v| - t, fresh tensors each step."""
    V = (W_hat + P - G).reshape(-1, seg)
    A = V.abs()
    tau = threshold_newton(A, t, max_iter=64, tau0=(A.amax(dim=1, keepdim=True) - t).clamp(min=0))
    W_new = torch.minimum(torch.maximum(V, -tau), tau).reshape(W.shape)
    P.copy_(W_new + momentum * (W_new - W) - W_hat)
    W.copy_(W_new)


def bench_prox(W, H, group_size: int | None, iters: int) -> dict:
    """Median seconds of the matmul and of both prox steps over the iterations of one FISTA run."""
    Hn = H / lambda_max(H, "lanczos")
    alpha = 1e-3 if group_size is None else 1e-4
    seg = group_size or W.shape[1]
    W_hat, Wk, P = W.clone(), W.clone(), torch.zeros_like(W)
    G, work = torch.empty_like(W), prox_workspace(W)
    mm, now, before = [], [], []
    for m in fista_momenta(iters):
        mm.append(_time_matmul(P, Hn, G))
        W2, P2 = Wk.clone(), P.clone()
        before.append(timed(previous_prox_step, W_hat, W2, P2, G, alpha, m, seg)[1])
        now.append(timed(prox_step_, W_hat, Wk, P, G, alpha, m, group_size, "torch", work)[1])
        assert torch.equal(W2, Wk) and torch.equal(P2, P), "the prox step changed its result"
    med = statistics.median
    return {"matmul_s": med(mm), "prox_s": med(now), "prox_previous_s": med(before),
            "prox_share": med(now) / (med(now) + med(mm)),
            "prox_previous_share": med(before) / (med(before) + med(mm))}


def _time_matmul(P, Hn, G) -> float:
    t0 = time.perf_counter()
    torch.matmul(P, Hn, out=G)
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="smollm2,llama2-7b", help="comma list of: " + ", ".join(SHAPES))
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=None, help="CD grid per group (default per channel)")
    ap.add_argument("--passes", type=int, default=30)
    ap.add_argument("--prox-iters", type=int, default=14, help="FISTA iterations timed per shape")
    ap.add_argument("--repeats", type=int, default=1, help="repeat the whole measurement")
    ap.add_argument("--skip", default="", help="comma list of: cd, prox")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    grouping = f"g{args.group_size}" if args.group_size else "per channel"
    print(f"CPU {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; W{args.bits} {grouping}; CD {args.passes} passes; timings on a possibly shared machine: "
          "compare within this run")
    grid = Grid(args.bits, args.group_size, beta=default_beta(args.bits, args.group_size))
    results = []
    for rep in range(args.repeats):
        for family in args.shapes.split(","):
            for name, (out, n) in SHAPES[family].items():
                W, H = layer(out, n, TOKENS[family])
                row = {"family": family, "layer": name, "shape": [out, n], "repeat": rep}
                where = f"{family:9s} {name:13s} {out:5d} x {n:5d}"
                if "cd" not in args.skip:
                    small = family != "llama2-7b"
                    row.update(bench_cd(W, H, grid, args.passes, args.passes if small else 1, "optq" if small else "rtn"))
                    print(f"{where}  CD {args.passes} passes: compiled {row['compiled_s']:7.2f} s; torch loop "
                          f"{row['torch_s']:8.1f} s ({row['speedup']:5.1f}x), without its early stop "
                          f"{row['torch_all_passes_s']:8.1f} s ({row['speedup_all_passes']:5.1f}x)"
                          f"{'; torch: 1 pass x30, extrapolated' if row['torch_extrapolated'] else ''}; "
                          f"differing codes {row['differing_codes']}", flush=True)
                if "prox" not in args.skip:
                    row.update(bench_prox(W, H, args.group_size, args.prox_iters))
                    print(f"{where}  FISTA iteration: matmul {1e3 * row['matmul_s']:7.1f} ms, prox "
                          f"{1e3 * row['prox_s']:6.1f} ms ({row['prox_share']:.0%} of the iteration; previous prox "
                          f"{1e3 * row['prox_previous_s']:.1f} ms, {row['prox_previous_share']:.0%})", flush=True)
                results.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "args": vars(args), "rows": results}, f, indent=2)


if __name__ == "__main__":
    main()
