"""Wall time of one fast MagR call with diagnostics (with its diagnostics, as the pipeline runs it) on
SmolLM2-shaped groups: q/k/v (576 + 192 + 192 rows x 576 inputs) and down_proj (576 x 1536), 14 FISTA
iterations (the CPU profile's --iters 16), X = 512 Gaussian tokens. Prints the median of 5 calls and the
objectives, so two revisions can be compared:

    OMP_NUM_THREADS=2 PYTHONPATH=<checkout> python benchmarks/magr_group_info.py
"""
import time

import torch

import magr
from magr.core.preprocessing import SOLVERS

torch.manual_seed(0)
print(magr.__file__)
for n, outs in [(576, [576, 192, 192]), (1536, [576])]:
    X = torch.randn(512, n)
    H = X.T @ X
    ws = [torch.randn(o, n) * 0.05 for o in outs]
    SOLVERS["fista"](ws, H, 1e-3, 14, None)  # warm-up
    times = []
    for _ in range(5):
        t = time.perf_counter()
        _, infos = SOLVERS["fista"](ws, H, 1e-3, 14, None)
        times.append(time.perf_counter() - t)
    print(f"inputs {n}, rows {outs}: median {sorted(times)[2]:.4f} s; F per layer",
          [round(i.objective[-1], 6) for i in infos])
