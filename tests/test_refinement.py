"""Coordinate-descent refinement (magr.core.refinement): never increases its objective, equals the column loop."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from magr.core.quantizers import Grid, default_beta, rtn
from magr.core.refinement import CD, cd_covariance, cd_objective, cd_refine
from test_quantizers import assert_on_grid

DAMP, EPS = CD.damp, CD.eps  # the released code's constants (the dataclass defaults)


def cd_problem(seed: int, out: int = 8, n: int = 40, bits: int = 2, group_size: int | None = 8):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(200, n, generator=g) @ torch.randn(n, n, generator=g) + torch.randn(n, generator=g)
    W = torch.randn(out, n, generator=g)
    Q, p = rtn(W, Grid(bits, group_size, beta=default_beta(bits)))
    return W, X.T @ X, Q, p


def naive_cd(Q, W, S, p, passes, damp=0.75, eps=0.1):
    """Column-by-column refinement in float64, straight from the definition (no blocks)."""
    S = S.double()
    Sd = S + damp * torch.diagonal(S).mean() * torch.eye(S.shape[0], dtype=S.dtype)
    N = Sd / (torch.diagonal(Sd) + eps).unsqueeze(0)
    P = W.double() @ N
    Q = Q.double().clone()
    scale, zero = (t.double() for t in p.columns())
    for _ in range(passes):
        for j in range(W.shape[1]):
            others = Q @ N[:, j] - Q[:, j] * N[j, j]
            target = P[:, j] - others
            Q[:, j] = scale[:, j] * (torch.clamp(torch.round(target / scale[:, j]) + zero[:, j], 0, p.maxq)
                                     - zero[:, j])
    return Q


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [None, 8])
def test_cd_never_increases_its_objective(bits, group_size):
    W, S, Q, p = cd_problem(bits, bits=bits, group_size=group_size)
    history = [cd_objective(Q, W, S, DAMP, EPS)]
    for _ in range(8):
        Q, _ = cd_refine(Q, W, S, p, 1, DAMP, EPS, block_size=16)
        assert_on_grid(Q, p)
        history.append(cd_objective(Q, W, S, DAMP, EPS))
    steps = np.diff(history)
    assert steps.max() <= 1e-6 * history[0], f"objective rose by {steps.max():.3g}: {history}"
    assert history[-1] < history[0]


@pytest.mark.parametrize("block_size", [1, 7, 16, 128])
@pytest.mark.parametrize("group_size", [None, 8])
def test_blocked_cd_equals_column_loop(block_size, group_size):
    W, S, Q0, p = cd_problem(11, group_size=group_size)
    ref = naive_cd(Q0, W, S, p, passes=3)
    got, _ = cd_refine(Q0, W, S, p, 3, DAMP, EPS, block_size=block_size)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    # several passes equal repeated single passes
    again = Q0
    for _ in range(3):
        again, _ = cd_refine(again, W, S, p, 1, DAMP, EPS, block_size=block_size)
    torch.testing.assert_close(again, got, rtol=0, atol=0)


def test_cd_column_step_is_the_exact_grid_minimiser():
    """After a pass, re-running only column j cannot improve: each column update minimised the
    objective over its grid given the others (checked against all 2^b candidates per entry)."""
    W, S, Q0, p = cd_problem(12, out=3, n=8, bits=2, group_size=None)
    Q, _ = cd_refine(Q0, W, S, p, 1, DAMP, EPS)
    j = W.shape[1] - 1  # the last column saw the final values of all others
    scale, zero = p.columns()
    base = cd_objective(Q, W, S, DAMP, EPS)
    for i in range(W.shape[0]):
        for level in range(p.maxq + 1):
            C = Q.clone()
            C[i, j] = scale[i, j] * (level - zero[i, j])
            assert cd_objective(C, W, S, DAMP, EPS) >= base - 1e-9 * abs(base)


def test_cd_covariance_formula():
    S = torch.tensor([[4.0, 1.0], [1.0, 2.0]])
    N = cd_covariance(S, damp=0.5, eps=0.1)
    Sd = S + 0.5 * 3.0 * torch.eye(2)
    expected = Sd / (torch.diagonal(Sd) + 0.1).unsqueeze(0)
    torch.testing.assert_close(N, expected.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cd_covariance_is_the_formula_to_the_bit_and_leaves_h(dtype):
    """One float64 copy, damped on its diagonal in place: the values of the released code's H + damp * I; the
    caller's H (float64 too: no conversion copies it) unchanged."""
    X = torch.randn(300, 40, generator=torch.Generator().manual_seed(3)) * torch.logspace(0, -2, 40)
    H = (X.T @ X).to(dtype)
    H0 = H.clone()
    Hd = H.double() + DAMP * torch.diagonal(H.double()).mean() * torch.eye(40, dtype=torch.float64)
    assert torch.equal(cd_covariance(H, DAMP, EPS), Hd / (torch.diagonal(Hd) + EPS).unsqueeze(0))
    assert torch.equal(H, H0)


def test_cd_step_passes_follow_the_released_rule():
    W, S, Q0, p = cd_problem(13, bits=3, group_size=None)
    assert CD().resolved(Grid(2)).passes == 30 and CD().resolved(Grid(3)).passes == 1
    torch.testing.assert_close(CD(backend="torch")(Q0, W, S, p, Grid(3))[0], cd_refine(Q0, W, S, p, 1, DAMP, EPS)[0],
                               rtol=0, atol=0)
    assert CD(passes=0)(Q0, W, S, p, Grid(3))[0] is Q0
