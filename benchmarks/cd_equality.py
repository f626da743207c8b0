"""Codes of the compiled coordinate-descent sweep vs the pure-torch loop, counted (issue 11, acceptance 1).

For every linear layer of stories260K (H from 8 x 64 TinyStories tokens) and for random correlated layers, per
channel and per group, bits 2/3/4, both grid conventions (keep, refit), 1 and 30 passes, from OPTQ's codes:
the number of differing codes; each row with a difference is traced to its first differing (pass, column)
and the exact target's distance to the rounding boundary is printed in units of 2^-24 x the magnitude of the
target's terms (magr.core.cd_check). tests/test_cd_sweep.py asserts the same on the same problems.

    python benchmarks/cd_equality.py                 # stories260K (g4) and random layers (g16)
    python benchmarks/cd_equality.py --llama q/k/v/o_proj,gate/up_proj   # + LLaMA-2-7B shapes: W2, 1 pass, RTN start
"""
from __future__ import annotations

import argparse

import torch

from magr.core.cd_check import compare_sweeps
from magr.pipeline.blocks import layer_problems
from magr.core.optq import OPTQ
from magr.core.quantizers import Grid, default_beta, rtn
from magr.core.refinement import CD


def random_layers(count: int, out: int = 48, n: int = 96, tokens: int = 256):
    for seed in range(count):
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(tokens, n // 2, generator=g) @ torch.randn(n // 2, n, generator=g)
        X += 0.1 * torch.randn(tokens, n, generator=g)
        W = 0.05 * torch.randn(out, n, generator=g)
        W[::5, 3] = 0.4
        yield f"random-{seed}", W, X.T @ X


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--random", type=int, default=6, help="random correlated layers (48 x 96)")
    ap.add_argument("--llama", default="", help="also these LLaMA-2-7B layer shapes of bench_cd.py (comma list; "
                    "W2 per channel, 1 pass from RTN codes, H as in bench_cd.py)")
    args = ap.parse_args()
    cd = CD()
    for name in filter(None, args.llama.split(",")):
        from bench_cd import SHAPES, TOKENS, layer

        W, H = layer(*SHAPES["llama2-7b"][name], TOKENS["llama2-7b"])
        Q0, p = rtn(W, Grid(2, None, beta=default_beta(2)))
        res = compare_sweeps(Q0, W, H, p, 1, cd.damp, cd.eps)
        print(f"llama2-7b {name} {tuple(W.shape)} W2 pc keep 1 pass: {res.differing} of {res.entries} codes differ "
              f"in {res.rows} rows; first differences: {res.ties}", flush=True)
    from magr.pipeline.calibration_data import get_calibration
    from magr.pipeline.models import load_model

    model, tok = load_model("stories260k")
    suites = {"stories260k (g4)": (layer_problems(model, get_calibration("tinystories", tok, 8, 64, seed=0)), 4),
              "random (g16)": (list(random_layers(args.random)), 16)}
    for suite, (layers, group) in suites.items():
        for bits in (2, 3, 4):
            for group_size in (None, group):
                grid = Grid(bits, group_size, beta=default_beta(bits, group_size))
                starts = [(W, H, *OPTQ()(W, H, grid)) for _, W, H in layers]
                for cd_grid in ("keep", "refit"):
                    for passes in (1, 30):
                        entries = differing = rows = 0
                        ties = []
                        for W, H, Q0, p in starts:
                            refit = grid if cd_grid == "refit" else None
                            res = compare_sweeps(Q0, W, H, p, passes, cd.damp, cd.eps, refit)
                            entries, differing, rows = entries + res.entries, differing + res.differing, rows + res.rows
                            ties += res.ties
                        worst = max((t["ulps"] for t in ties), default=None)
                        print(f"{suite:17s} W{bits} {'g%d' % group_size if group_size else 'pc':3s} {cd_grid:5s} "
                              f"{passes:2d} passes: {differing} of {entries} codes differ in {rows} rows"
                              + (f"; first differences at {worst:.1f} x 2^-24 m from a boundary (max)" if ties else ""),
                              flush=True)


if __name__ == "__main__":
    main()
