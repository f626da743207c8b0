"""MagR problems for the solver tests (tests/test_spg.py, tests/test_fast_solver.py): a weight with outlier entries
and random features."""
from __future__ import annotations

import torch


def problem(seed: int, out: int = 48, n: int = 96, tokens: int = 64, heavy: bool = False, massive: bool = False):
    """W_hat (out x n) with outlier entries and features X (tokens x n, rank <= tokens); ``massive``: one token 30x
    larger (as the attention-sink token of real LLM features), ``heavy``: log-normal channel scales."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g)
    if heavy:
        X = X * torch.exp(torch.randn(n, generator=g))
    if massive:
        X[0] *= 30.0
    W = 0.02 * torch.randn(out, n, generator=g)
    W[::7, n // 2] = 0.3
    return W, X
