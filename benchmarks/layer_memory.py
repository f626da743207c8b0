"""Peak memory of one layer's quantization, in copies of its weight and of its H = X^T X (magr.pipeline.memory).

Each method runs ``magr.pipeline.blocks.quantize_group`` (MagR, the quantizer, the refinement and the error
report, as a run does) on one random layer in a fresh process of one thread; the process's peak resident memory
(the kernel's high-water mark, ``ru_maxrss``) above its memory just before the call is the method's working set.
Two shapes, one with H large beside W (out 256 x in 4096) and one with W large beside H (out 4096 x in 1024), give
the two coefficients of peak = a * |W| + b * |H| (float32 bytes) by solving the 2 x 2 system; the layer's
statistics (H, H_last, X_last: :class:`magr.pipeline.calibration.LayerStats`) exist before the call and are not
in b. ``magr.pipeline.memory.WORKING_SET`` holds these coefficients rounded up, plus the statistics.

    python benchmarks/layer_memory.py                         # the paper's methods at 4 bits, MagR by fista and spg
    python benchmarks/layer_memory.py --methods optq --actorder       # OPTQ's permuted copy of H

Not covered: spg's factored gradient (2 x tokens < in, from X instead of H), X_last, half-precision layers (their
float32 copy: ``magr.pipeline.memory.working_set_bytes`` adds it). A CPU measurement of host memory, with ``steady_allocator`` (as streamed runs of large models: buffers of 1 MiB
or more mmapped and given back when freed), so the peak is what was live at once; on a GPU the caching
allocator's peak would be the figure to read.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import psutil
import torch

from magr.core.methods import PRESETS


def child(method: str, n: int, out: int, bits: int, tokens: int, solver: str, actorder: bool) -> dict:
    from magr.core.methods import QuantConfig
    from magr.pipeline.blocks import quantize_group
    from magr.pipeline.calibration import LayerStats
    from magr.pipeline.memory import steady_allocator

    steady_allocator()  # freed buffers of 1 MiB or more go back at once: the peak is what was live together
    torch.set_num_threads(1)
    torch.manual_seed(0)

    def problem(n_in, n_out, n_tok):
        mix = torch.randn(n_in, n_in // 8) / (n_in // 8) ** 0.5  # correlated features, H of full rank
        X = torch.randn(n_tok, n_in // 8) @ mix.T + 0.1 * torch.randn(n_tok, n_in)
        st = LayerStats(n_in, "cpu")
        st.has_last = True
        st.add(X[None])
        layer = torch.nn.Linear(n_in, n_out, bias=False)
        return layer, st

    magr = {"solver": solver, "precision": PRECISION[solver]} if PRESETS[method].preprocess else {}
    optq = {"actorder": actorder} if "optq" in method else {}
    cfg = QuantConfig.build(method=method, bits=bits, **magr, **optq)
    small, small_st = problem(64, 8, 128)
    quantize_group([small], small_st, cfg)  # the libraries loaded and their pools started before the measurement
    layer, st = problem(n, out, tokens)
    before = psutil.Process().memory_info().rss
    quantize_group([layer], st, cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"peak_above_mib": round((peak - before) / 2**20, 1)}


SHAPES = ((256, 4096), (4096, 1024))  # (out, in): H large beside W, then W large beside H
PRECISION = {"fista": "tf32", "spg": "bf16", "ista": "fp32"}  # each MagR solver at its default (spg: the profiles')


def measure(method: str, out: int, n: int, bits: int, tokens: int, solver: str, actorder: bool) -> dict:
    res = subprocess.run([sys.executable, __file__, "--child", method, "--n", str(n), "--out", str(out), "--bits",
                          str(bits), "--tokens", str(tokens), "--solver", solver,
                          "--actorder" if actorder else "--no-actorder"], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--tokens", type=int, default=2048, help="calibration tokens (the last sample: all of them)")
    p.add_argument("--methods", nargs="+", default=["rtn", "optq", "magr+rtn", "magr+optq", "magr+optq-cd"])
    p.add_argument("--solvers", nargs="+", default=["fista", "spg"], choices=list(PRECISION),
                   help="MagR solvers, each at its default precision (fista: the library's default, spg: the profiles')")
    p.add_argument("--actorder", action=argparse.BooleanOptionalAction, default=False,
                   help="OPTQ with act-order (its permuted copy of H)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--solver", default="fista", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.n, args.out, args.bits, args.tokens, args.solver, args.actorder)))
        return 0
    (o1, n1), (o2, n2) = SHAPES
    print(f"torch {torch.__version__}; one thread; {args.bits} bits, {args.tokens} calibration tokens, act-order "
          f"{args.actorder}; peak above "
          f"the call's start in MiB for out x in = {o1} x {n1} and {o2} x {n2}; a, b: peak = a |W| + b |H|")
    print(f"| method | peak, {o1} x {n1} | peak, {o2} x {n2} | a (copies of W) | b (copies of H) |\n"
          "|---|---:|---:|---:|---:|")
    for method in args.methods:
        for solver in args.solvers if PRESETS[method].preprocess else [None]:
            p1, p2 = (measure(method, o, n, args.bits, args.tokens, solver or "fista", args.actorder)["peak_above_mib"]
                      * 2**20
                      for o, n in SHAPES)
            sol = torch.linalg.solve(torch.tensor([[4.0 * o1 * n1, 4.0 * n1 * n1], [4.0 * o2 * n2, 4.0 * n2 * n2]],
                                                  dtype=torch.float64), torch.tensor([p1, p2], dtype=torch.float64))
            name = f"{method} ({solver} {PRECISION[solver]})" if solver else method
            print(f"| {name} | {p1 / 2**20:.1f} | {p2 / 2**20:.1f} | {sol[0]:.2f} | {sol[1]:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
