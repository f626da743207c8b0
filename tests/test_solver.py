"""MagR's published algorithm (magr.core.solver.magr_ista): monotone objective, magnitude reduction, limits."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from magr.core.projection import linf_norms
from magr.core.solver import MagrInfo, lambda_max, magr_ista, magr_objective


def correlated_problem(seed: int, out: int = 16, n: int = 32, tokens: int = 128, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, dtype=dtype, generator=g) @ torch.randn(n, n, dtype=dtype, generator=g)
    W = 0.1 * torch.randn(out, n, dtype=dtype, generator=g)
    return W, X.T @ X, X


def rank_deficient_problem(seed: int = 0):
    """X: 2048 tokens x 256 features of rank 64; W: 128 x 256 with an outlier in every 4th row."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2048, 64, generator=g) @ torch.randn(64, 256, generator=g)
    W = 0.02 * torch.randn(128, 256, generator=g)
    rows = torch.arange(0, 128, 4)
    cols = torch.randint(0, 256, (len(rows),), generator=g)
    W[rows, cols] = 0.3 * torch.sign(torch.randn(len(rows), generator=g))
    return W, X


def relative_output_change(X, W, W_new) -> float:
    """||X (W - W_new)^T||_F / ||X W^T||_F in float64."""
    X, W, W_new = X.double(), W.double(), W_new.double()
    return float((X @ (W - W_new).T).norm() / (X @ W.T).norm())


@pytest.mark.parametrize("projection", ["sort", "newton"])
@pytest.mark.parametrize("group_size", [None, 8])
@pytest.mark.parametrize("normalize", [True, False])
def test_objective_never_increases_float64(projection, group_size, normalize):
    W, H, _ = correlated_problem(0)
    alpha = (1e-3 if group_size is None else 1e-4) * (1.0 if normalize else float(lambda_max(H)))
    W_new, info = magr_ista(W, H, alpha=alpha, iters=60, group_size=group_size,
                                  projection=projection, normalize=normalize, dtype=torch.float64,
                                  return_info=True)
    obj = np.array(info.objective)
    assert len(obj) == 61 and np.all(np.isfinite(obj))
    steps = np.diff(obj)
    assert steps.max() <= 1e-12 * obj[0], f"objective rose by {steps.max():.3g}"
    assert obj[-1] < obj[0]  # and it does move
    # the recorded values are F itself: F(W_hat) = alpha * sum ||w||_inf, then F(result)
    Hn = H / float(lambda_max(H)) if normalize else H
    assert obj[0] == pytest.approx(alpha * float(linf_norms(W, group_size).sum()), rel=1e-12)
    assert obj[-1] == pytest.approx(magr_objective(W_new, W, Hn, alpha, group_size), rel=1e-12)


@pytest.mark.parametrize("group_size", [None, 8])
def test_objective_never_increases_float32(group_size):
    W, H, _ = correlated_problem(1, dtype=torch.float32)
    alpha = 1e-3 if group_size is None else 1e-4
    W_new, info = magr_ista(W, H, alpha=alpha, iters=60, group_size=group_size, return_info=True)
    assert W_new.dtype == torch.float32
    obj = np.array(info.objective)
    assert np.diff(obj).max() <= 1e-5 * obj[0]
    assert obj[-1] < obj[0]


def test_rank_deficient_features_reduce_magnitudes_and_keep_outputs():
    """Acceptance check (issue 2, item 3): per-row max |w| falls, the layer output barely moves."""
    W, X = rank_deficient_problem()
    assert int(torch.linalg.matrix_rank(X)) == 64
    W_new, info = magr_ista(W, X.T @ X, alpha=1e-3, iters=200, return_info=True)
    ratio = info.row_max_after / info.row_max_before
    torch.testing.assert_close(info.row_max_before, W.abs().amax(dim=1))
    torch.testing.assert_close(info.row_max_after, W_new.abs().amax(dim=1))
    rel = relative_output_change(X, W, W_new)
    outlier_rows = ratio[::4]
    print(f"\n[MagR rank-deficient] mean per-row max|w| after/before = {ratio.mean():.4f} "
          f"(max {ratio.max():.4f}, outlier rows {outlier_rows.mean():.4f}); "
          f"relative output change ||X(W - W_hat)^T|| / ||X W_hat^T|| = {rel:.3e}")
    assert ratio.max() < 0.85, "every row's max |w| should fall"
    assert ratio.mean() < 0.7
    assert outlier_rows.mean() < 0.6, "outliers should be pulled in most"
    assert rel < 0.01


def test_rank_deficient_features_group_form():
    W, X = rank_deficient_problem(1)
    g = 32
    W_new, info = magr_ista(W, X.T @ X, alpha=1e-4, iters=100, group_size=g, return_info=True)
    ratio = linf_norms(W_new, g) / linf_norms(W, g)
    rel = relative_output_change(X, W, W_new)
    print(f"\n[MagR rank-deficient, g{g}] mean per-group max|w| after/before = {ratio.mean():.4f}; "
          f"relative output change = {rel:.3e}")
    assert np.diff(info.objective).max() <= 1e-5 * info.objective[0]
    assert ratio.mean() < 0.9
    assert rel < 0.01


def test_alpha_zero_leaves_weight_unchanged():
    W, H, _ = correlated_problem(2, dtype=torch.float32)
    assert torch.equal(magr_ista(W, H, alpha=0.0, iters=50), W)
    assert torch.equal(magr_ista(W, H, alpha=0.0, iters=50, group_size=8), W)


@pytest.mark.parametrize("alpha", [1e-6, 1e-9, 1e-12])
def test_small_alpha_moves_weight_at_most_iters_times_alpha(alpha):
    """Each prox step moves a row by at most alpha in l2 and the gradient step is a contraction, so
    ||w_row - w_hat_row||_2 <= iters * alpha: alpha -> 0 gives back W."""
    W, H, _ = correlated_problem(3)
    iters = 40
    W_new = magr_ista(W, H, alpha=alpha, iters=iters, dtype=torch.float64)
    assert (W_new - W).norm(dim=1).max() <= iters * alpha * (1 + 1e-9)


def test_group_size_equal_to_row_length_is_per_channel():
    W, H, _ = correlated_problem(4)
    a = magr_ista(W, H, alpha=1e-3, iters=30, dtype=torch.float64)
    b = magr_ista(W, H, alpha=1e-3, iters=30, group_size=W.shape[1], dtype=torch.float64)
    assert torch.equal(a, b)


def test_sort_and_newton_projections_agree():
    W, H, _ = correlated_problem(5)
    a = magr_ista(W, H, alpha=1e-3, iters=50, projection="sort", dtype=torch.float64)
    b = magr_ista(W, H, alpha=1e-3, iters=50, projection="newton", dtype=torch.float64)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_normalize_false_with_scaled_alpha_is_the_published_convention():
    """alpha is relative to H / lambda_max(H): absolute alpha * lambda_max gives the same iterates."""
    W, H, _ = correlated_problem(6)
    lam = float(lambda_max(H))
    a = magr_ista(W, H, alpha=1e-3, iters=30, dtype=torch.float64)
    b = magr_ista(W, H, alpha=1e-3 * lam, iters=30, normalize=False, dtype=torch.float64)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_result_is_a_fixed_point_after_convergence():
    """At a minimiser, one more proximal step changes nothing (objective flat at the end)."""
    W, H, _ = correlated_problem(7, n=16, out=4)
    W1, info = magr_ista(W, H, alpha=1e-2, iters=3000, dtype=torch.float64, return_info=True)
    obj = np.array(info.objective)
    assert abs(obj[-1] - obj[-2]) <= 1e-12 * obj[0]
    Hn = H / float(lambda_max(H))
    F = magr_objective(W1, W, Hn, 1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # no nearby point does better (convexity: local = global)
        P = W1 + 1e-4 * torch.randn(W1.shape, dtype=W1.dtype, generator=g)
        assert magr_objective(P, W, Hn, 1e-2) >= F - 1e-12


def test_info_and_dtypes():
    W, H, _ = correlated_problem(8, dtype=torch.float32)
    out, info = magr_ista(W, H.double(), alpha=1e-3, iters=5, dtype=torch.float64, return_info=True)
    assert isinstance(info, MagrInfo)
    assert out.dtype == W.dtype and out.shape == W.shape
    assert len(info.objective) == 6 and info.seconds > 0
    assert info.lambda_max == pytest.approx(float(torch.linalg.eigvalsh(H.double()).max()), rel=1e-5)
    out2 = magr_ista(W, H, alpha=1e-3, iters=0)
    assert torch.equal(out2, W)


def test_zero_hessian_leaves_weight_unchanged(caplog):
    W = torch.randn(4, 6)
    with caplog.at_level(logging.WARNING, logger="magr.core.solver"):
        out, info = magr_ista(W, torch.zeros(6, 6), 1e-3, 200, return_info=True)
    assert torch.equal(out, W)
    assert "unchanged" in caplog.text


def test_lambda_max():
    _, H, _ = correlated_problem(9)
    exact = float(np.linalg.eigvalsh(H.numpy()).max())
    assert float(lambda_max(H)) == pytest.approx(exact, rel=1e-12)
    power = float(lambda_max(H, "power", iters=200))
    assert exact <= power <= 1.02 * exact  # a safe (over-)estimate
    with pytest.raises(ValueError, match="no-such-method"):
        lambda_max(H, "no-such-method")


@pytest.mark.parametrize("kwargs,words", [
    (dict(W=torch.ones(3, 4), H=torch.ones(5, 5)), ["(3, 4)", "(5, 5)"]),
    (dict(W=torch.ones(4), H=torch.ones(4, 4)), ["(4,)"]),
    (dict(W=torch.ones(3, 4), H=torch.eye(4), alpha=-1e-3), ["-0.001"]),
    (dict(W=torch.ones(3, 4), H=torch.eye(4), iters=-1), ["-1"]),
    (dict(W=torch.ones(3, 4), H=torch.eye(4), group_size=3), ["3", "4"]),
    (dict(W=torch.ones(3, 4), H=torch.eye(4), projection="bisect"), ["bisect"]),
])
def test_bad_input_raises_value_error(kwargs, words):
    with pytest.raises(ValueError) as err:
        magr_ista(**{"alpha": 1e-3, "iters": 10, **kwargs})
    for word in words:
        assert word in str(err.value)
