"""Compiled OPTQ column loop vs the pure-torch loop (magr.core.optq, ``OPTQ.backend``), per layer shape.

OPTQ runs per layer, so the shapes are each layer's (out x in): SmolLM2-135M (hidden 576, intermediate 1536:
q/o 576 x 576, k/v 192 x 576, gate/up 1536 x 576, down 576 x 1536) and LLaMA-2-7B (q/k/v/o 4096 x 4096,
gate/up 11008 x 4096, down 4096 x 11008), on a random weight with outliers and H = X^T X of correlated
random features. Per shape, in one run: seconds of one whole OPTQ call with each backend (median of
``--repeats``, backends alternating), of its column loop alone (the part the backend changes; the rest, the
same torch code in both, is U, the inverse Cholesky factor of H, also timed alone, and the block-end
matmuls), and the codes of both compared (they are equal to the bit by construction).

    python benchmarks/bench_optq.py                             # SmolLM2 shapes (x 30 blocks: one model), LLaMA
    python benchmarks/bench_optq.py --shapes llama2-7b --repeats 1 --group-size 128

Timings on a shared machine vary between runs: compare the figures of one run (the ratios), and repeat.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import replace

import torch
from bench_cd import layer, timed  # benchmarks/ is on sys.path when a script here runs

from magr.core.optq import OPTQ, damped_inverse_cholesky
from magr.core.optq_block import compare_results
from magr.pipeline.persistence import write_json
from magr.core.quantizers import Grid, default_beta

SHAPES = {
    "smollm2": {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
                "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)},
    "llama2-7b": {"q/k/v/o_proj": (4096, 4096), "gate/up_proj": (11008, 4096), "down_proj": (4096, 11008)},
    "tiny": {"layer": (24, 48)},  # smoke test
}
TOKENS = 2048  # SmolLM2 profile: 4 x 512 calibration tokens


@contextmanager
def column_loop_timer():
    """Within the block: OPTQ's column loop (:func:`magr.core.optq.column_function`'s choice) timed, the seconds
    summed into the yielded list's first entry."""
    module = sys.modules["magr.core.optq"]  # the package exports the function optq under the module's name
    choose, spent = module.column_function, [0.0]

    def timing(backend, device):
        columns = choose(backend, device)

        def timed_columns(*args):
            t0 = time.perf_counter()
            columns(*args)
            spent[0] += time.perf_counter() - t0
        return timed_columns

    module.column_function = timing
    try:
        yield spent
    finally:
        module.column_function = choose


def bench_layer(W, H, grid: Grid, step: OPTQ, repeats: int) -> dict:
    """Median seconds of OPTQ with each backend, of its column loop and of U alone; differing codes, grids."""
    times = {"torch": [], "compiled": []}
    loops = {"torch": [], "compiled": []}
    results = {}
    for _ in range(repeats):
        for backend in ("torch", "compiled"):
            with column_loop_timer() as spent:
                results[backend], t = timed(replace(step, backend=backend), W, H, grid)
            times[backend].append(t)
            loops[backend].append(spent[0])
    u = [timed(damped_inverse_cholesky, H.float(), step.percdamp)[1] for _ in range(repeats)]
    med = statistics.median
    same = compare_results(results["torch"], results["compiled"])
    row = {"torch_s": med(times["torch"]), "compiled_s": med(times["compiled"]), "inverse_cholesky_s": med(u),
           "torch_loop_s": med(loops["torch"]), "compiled_loop_s": med(loops["compiled"]),
           "differing_codes": same["differing_codes"], "same_grids": same["same_grids"]}
    row["speedup"] = row["torch_s"] / row["compiled_s"]
    row["loop_speedup"] = row["torch_loop_s"] / max(row["compiled_loop_s"], 1e-9)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="smollm2,llama2-7b", help="comma list of: " + ", ".join(SHAPES))
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=None, help="grid per group (default per channel)")
    ap.add_argument("--group-grid", default="block_start", choices=("block_start", "current"))
    ap.add_argument("--actorder", action="store_true")
    ap.add_argument("--repeats", type=int, default=3, help="calls per backend and shape (median)")
    ap.add_argument("--model-layers", type=int, default=30, help="blocks per model: the SmolLM2 sum is x this")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    grid = Grid(args.bits, args.group_size, beta=default_beta(args.bits, args.group_size))
    step = OPTQ(actorder=args.actorder, group_grid=args.group_grid)
    grouping = f"g{args.group_size} ({args.group_grid})" if args.group_size else "per channel"
    print(f"CPU {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; OPTQ W{args.bits} {grouping}{', act-order' if args.actorder else ''}; median of "
          f"{args.repeats}; timings on a possibly shared machine: compare within this run", flush=True)
    rows = []
    for family in args.shapes.split(","):
        total = {"torch_s": 0.0, "compiled_s": 0.0, "torch_loop_s": 0.0, "compiled_loop_s": 0.0}
        for name, (out, n) in SHAPES[family].items():
            W, H = layer(out, n, TOKENS)
            row = {"family": family, "layer": name, "shape": [out, n], **bench_layer(W, H, grid, step, args.repeats)}
            rows.append(row)
            for k in total:
                total[k] += row[k]
            print(f"{family:9s} {name:13s} {out:5d} x {n:5d}  OPTQ: torch {row['torch_s']:8.3f} s, compiled "
                  f"{row['compiled_s']:8.3f} s ({row['speedup']:5.1f}x); column loop: torch {row['torch_loop_s']:8.3f}"
                  f" s, compiled {row['compiled_loop_s']:7.3f} s ({row['loop_speedup']:5.1f}x); U alone "
                  f"{row['inverse_cholesky_s']:.3f} s; differing codes {row['differing_codes']}, same grids "
                  f"{row['same_grids']}", flush=True)
        if family == "smollm2":
            k = args.model_layers
            print(f"smollm2   one model ({k} blocks x 7 layers): OPTQ torch {k * total['torch_s']:.1f} s, compiled "
                  f"{k * total['compiled_s']:.1f} s ({total['torch_s'] / total['compiled_s']:.1f}x); column loop torch "
                  f"{k * total['torch_loop_s']:.1f} s, compiled {k * total['compiled_loop_s']:.1f} s", flush=True)
    if args.json:
        write_json(args.json, {"threads": torch.get_num_threads(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
