"""OPTQ / GPTQ (magr.core.optq) against RTN and against a plain column-by-column reference."""
from __future__ import annotations

import pytest
import torch

from magr.core.optq import OPTQ, damped_inverse_cholesky
from magr.core.quantizers import Grid, rtn


def optq(W, H, bits=4, group_size=None, beta=1.0, blocksize=128, percdamp=0.01, actorder=False,
         static_groups=False, return_params=False, group_grid="current"):
    """The OPTQ step built from these settings (the test's shorthand; group grids from the current weights,
    the convention the plain reference below follows)."""
    step = OPTQ(percdamp, blocksize, actorder, static_groups, group_grid)
    Q, p = step(W, H, Grid(bits, group_size, beta=beta))
    return (Q, p) if return_params else Q


def correlated_inputs(seed: int, n: int, tokens: int = 512, dead=()) -> torch.Tensor:
    """Tokens x n features with correlated, unevenly scaled columns and a mean offset."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) * torch.logspace(0, -1.5, n).unsqueeze(0)
    X = torch.randn(tokens, n, generator=g) @ mix + 0.3 * torch.randn(n, generator=g)
    X[:, list(dead)] = 0
    return X


def layer_loss(X: torch.Tensor, Q: torch.Tensor, W: torch.Tensor) -> float:
    """||X (Q - W)^T||_F^2 in float64."""
    return float(((X.double() @ (Q.double() - W.double()).T) ** 2).sum())


# ----------------------------------------------------------------------------- reference
def ref_grid(w: torch.Tensor, bits: int, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric grid (delta, z) of each row of w, shape (rows, 1), per the documented formula."""
    maxq = 2**bits - 1
    xmin = w.amin(dim=1).clamp(max=0)
    xmax = w.amax(dim=1).clamp(min=0)
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, -torch.ones_like(xmin), xmin)
    xmax = torch.where(flat, torch.ones_like(xmax), xmax)
    delta = beta * (xmax - xmin) / maxq
    return delta.unsqueeze(1), torch.round(-xmin / delta).unsqueeze(1)


def without_dead_inputs(W, H, bits):
    """float64 copies with dead inputs (H[j, j] = 0) set to H[j, j] = 1 and w_j = 0, as GPTQ; (W, H, n, maxq)."""
    W, H = W.double().clone(), H.double().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H, W.shape[1], 2**bits - 1


def ref_optq(W, H, bits, group_size=None, beta=1.0, percdamp=0.01, actorder=False, static_groups=False):
    """GPTQ without lazy blocks, in float64: for each column j in order, q_j = quant(w_j),
    err = (w_j - q_j) / U[j, j], W[:, j+1:] -= err U[j, j+1:], with U the upper Cholesky factor of
    (H + percdamp * mean(diag H) I)^{-1}. Dead inputs (H[j, j] = 0) get H[j, j] = 1 and w_j = 0."""
    W, H, n, maxq = without_dead_inputs(W, H, bits)
    g = group_size or n
    initial_grids = [ref_grid(W[:, k * g:(k + 1) * g], bits, beta) for k in range(n // g)]
    perm = torch.argsort(torch.diagonal(H), descending=True) if actorder else torch.arange(n)
    W, H = W[:, perm], H[perm][:, perm]
    damped = H + percdamp * torch.diagonal(H).mean() * torch.eye(n, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(damped)).T  # inv = U^T U, U upper
    Q = torch.zeros_like(W)
    for j in range(n):
        if group_size is None:
            delta, z = initial_grids[0]
        elif static_groups:
            delta, z = initial_grids[int(perm[j]) // g]  # the column's own group, fixed up front
        else:
            if j % g == 0:  # a new group (in processing order) takes its grid from the current W
                current = ref_grid(W[:, j:j + g], bits, beta)
            delta, z = current
        Q[:, j] = (delta * (torch.clamp(torch.round(W[:, j:j + 1] / delta) + z, 0, maxq) - z))[:, 0]
        err = (W[:, j] - Q[:, j]) / U[j, j]
        W[:, j + 1:] -= err.unsqueeze(1) * U[j, j + 1:].unsqueeze(0)
    return Q[:, torch.argsort(perm)]


def released_optq(W, H, bits, group_size, beta=1.0, percdamp=0.01, blocksize=128):
    """The released MagR code's OPTQ loop (GPTQ's fasterquant), transcribed in float64 without act-order or
    static groups: lazy blocks of ``blocksize`` columns; a group's grid is fitted when its first column j is
    reached, on W[:, j:j+g] of the tensor W that is only updated at the end of each block."""
    W, H, n, maxq = without_dead_inputs(W, H, bits)
    H += percdamp * torch.diagonal(H).mean() * torch.eye(n, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1, dtype=W.dtype), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if (i1 + i) % group_size == 0:
                delta, z = ref_grid(W[:, i1 + i:i1 + i + group_size], bits, beta)
            w, d = W1[:, i], Hinv1[i, i]
            q = (delta * (torch.clamp(torch.round(w.unsqueeze(1) / delta) + z, 0, maxq) - z))[:, 0]
            Q[:, i1 + i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size,blocksize", [(8, 12), (12, 32), (16, 16), (6, 16)])
def test_block_start_group_grids_equal_the_released_loop(bits, group_size, blocksize):
    """group_grid="block_start" is the released code's convention, also where groups start inside a block."""
    X = correlated_inputs(50 + bits, 48, tokens=256)
    W = torch.randn(8, 48, generator=torch.Generator().manual_seed(60 + bits))
    H = X.T @ X
    beta = 0.9 if bits < 4 else 1.0
    Q = optq(W, H, bits, group_size, beta=beta, blocksize=blocksize, group_grid="block_start")
    ref = released_optq(W, H, bits, group_size, beta, blocksize=blocksize)
    assert rel_diff(Q, ref) <= 1e-5
    if blocksize % group_size:  # groups start inside blocks: the two conventions really differ
        assert rel_diff(optq(W, H, bits, group_size, beta=beta, blocksize=blocksize), ref) > 1e-3


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


CONFIGS = [  # (group_size, actorder, static_groups)
    (None, False, False), (None, True, False),
    (8, False, False), (8, True, False), (8, False, True), (8, True, True),
    (16, True, False), (16, False, True),
]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size,actorder,static_groups", CONFIGS)
@pytest.mark.parametrize("blocksize", [32, 16, 5])
def test_equals_plain_column_by_column_reference(bits, group_size, actorder, static_groups, blocksize):
    """Lazy blocks (blocksize < n) and groups that start inside a block give the plain algorithm."""
    X = correlated_inputs(bits, 32, tokens=256)
    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(100 + bits))
    H = X.T @ X
    beta = 0.9 if bits < 4 else 1.0
    Q = optq(W, H, bits, group_size, beta=beta, blocksize=blocksize, actorder=actorder,
             static_groups=static_groups)
    ref = ref_optq(W, H, bits, group_size, beta, actorder=actorder, static_groups=static_groups)
    assert rel_diff(Q, ref) <= 1e-5


def test_result_does_not_depend_on_blocksize():
    X = correlated_inputs(7, 48)
    W = torch.randn(16, 48, generator=torch.Generator().manual_seed(7))
    H = X.T @ X
    for kwargs in (dict(group_size=None), dict(group_size=12), dict(group_size=12, actorder=True),
                   dict(group_size=24, static_groups=True, actorder=True)):
        results = [optq(W, H, 3, blocksize=b, **kwargs) for b in (1, 7, 16, 48, 128)]
        for Q in results[1:]:
            assert rel_diff(Q, results[0]) <= 1e-5, kwargs


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size,actorder,static_groups", CONFIGS)
def test_layer_loss_below_rtn(bits, group_size, actorder, static_groups):
    X = correlated_inputs(10 + bits, 64)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(bits))
    H = X.T @ X
    Q = optq(W, H, bits, group_size, actorder=actorder, static_groups=static_groups, blocksize=16)
    loss_optq = layer_loss(X, Q, W)
    loss_rtn = layer_loss(X, rtn(W, Grid(bits, group_size))[0], W)
    assert loss_optq < loss_rtn, f"OPTQ {loss_optq:.4g} >= RTN {loss_rtn:.4g}"


@pytest.mark.parametrize("group_size,actorder,static_groups", CONFIGS)
def test_outputs_lie_on_the_returned_grid(group_size, actorder, static_groups):
    X = correlated_inputs(20, 32)
    W = torch.randn(6, 32, generator=torch.Generator().manual_seed(20))
    Q, p = optq(W, X.T @ X, 3, group_size, actorder=actorder, static_groups=static_groups,
                blocksize=8, return_params=True)
    g = group_size or 32
    assert p.scale.shape == (6, 32 // g) and p.g_idx.shape == (32,)
    # every group (in processing order) is one of the grids, and each column is on its group's grid
    assert sorted(torch.bincount(p.g_idx).tolist()) == [g] * (32 // g)
    scale, zero = p.columns()
    codes = Q.double() / scale.double() + zero.double()
    assert torch.all((codes - codes.round()).abs() <= 1e-3)
    assert codes.round().min() >= 0 and codes.round().max() <= p.maxq


@pytest.mark.parametrize("group_size,actorder,static_groups", CONFIGS)
def test_dead_inputs(group_size, actorder, static_groups):
    """Inputs that are never active (zero Hessian diagonal) get a zero weight column, as in GPTQ."""
    dead = (0, 5, 17, 31)
    X = correlated_inputs(30, 32, dead=dead)
    H = X.T @ X
    assert torch.all(torch.diagonal(H)[list(dead)] == 0)
    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(30))
    Q = optq(W, H, 3, group_size, actorder=actorder, static_groups=static_groups, blocksize=8)
    assert torch.all(torch.isfinite(Q))
    assert torch.all(Q[:, list(dead)] == 0)
    ref = ref_optq(W, H, 3, group_size, actorder=actorder, static_groups=static_groups)
    assert rel_diff(Q, ref) <= 1e-5
    assert layer_loss(X, Q, W) < layer_loss(X, rtn(W, Grid(3, group_size))[0], W)


def test_all_inputs_dead_gives_zero_weight():
    W = torch.randn(4, 8)
    Q = optq(W, torch.zeros(8, 8), 4)
    assert torch.equal(Q, torch.zeros_like(W))


@pytest.mark.parametrize("dead,actorder", [((), False), ((), True), ((2, 7), False), ((2, 7), True)])
def test_dtype_and_input_not_modified(dead, actorder):
    """OPTQ reads the caller's H without copying it, and copies it where a dead input changes it."""
    X = correlated_inputs(40, 16, dead=dead)
    H = X.T @ X
    W = torch.randn(4, 16, dtype=torch.float64)
    W0, H0 = W.clone(), H.clone()
    Q = optq(W, H, 4, actorder=actorder)
    assert Q.dtype == torch.float64 and Q.shape == W.shape
    assert torch.equal(W, W0) and torch.equal(H, H0)


def test_damped_inverse_cholesky_is_the_formula_to_the_bit():
    """The damping added to a copy's diagonal gives the values of chol((H + damp I)^-1) as GPTQ writes it."""
    X = correlated_inputs(42, 48)
    H = X.T @ X
    H0 = H.clone()
    damp = 0.01 * torch.diagonal(H).mean()
    L = torch.linalg.cholesky(H + damp * torch.eye(48))
    expected = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    assert torch.equal(damped_inverse_cholesky(H, 0.01), expected)
    assert torch.equal(H, H0)


def test_singular_hessian_without_damping_still_works():
    X = correlated_inputs(41, 16, tokens=4)  # rank 4 < 16
    W = torch.randn(4, 16)
    Q = optq(W, X.T @ X, 4, percdamp=0.0)
    assert torch.all(torch.isfinite(Q))


@pytest.mark.parametrize("kwargs,words", [
    (dict(H=torch.eye(5)), ["(5, 5)", "(4, 16)"]),
    (dict(percdamp=-0.1), ["percdamp=-0.1"]),
    (dict(blocksize=0), ["blocksize=0"]),
    (dict(group_grid="late"), ["group_grid='late'", "block_start"]),
    (dict(bits=5), ["bits=5"]),
    (dict(group_size=5), ["5", "16"]),
    (dict(beta=1.2), ["beta=1.2"]),
])
def test_bad_input_raises_value_error(kwargs, words):
    args = dict(W=torch.randn(4, 16), H=torch.eye(16))
    args.update(kwargs)
    with pytest.raises(ValueError) as err:
        optq(**args)
    for word in words:
        assert word in str(err.value)
