"""l1-ball projection and l_inf prox (magr.core.projection) against an independent float64 reference.

The reference finds the soft threshold tau of f(tau) = sum_i max(|v_i| - tau, 0) - r by bisection in
numpy float64 down to adjacent floats (no sort, no closed form), so it shares no code with either
method under test. Optimality is also checked directly through the KKT conditions of
min 1/2 ||w - v||^2 s.t. ||w||_1 <= r: for v outside the ball there is tau > 0 with
v_i - w_i = tau * sign(w_i) where w_i != 0, |v_i| <= tau where w_i = 0, and ||w||_1 = r.
Tolerances are relative to the row's scale ||v||_inf (entries) or ||v||_1 (sums): 1e-10 in float64,
1e-5 in float32.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from magr.core.projection import l1_threshold, linf_norms, project_l1_ball, prox_linf

METHODS = ("sort", "newton")
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


# ----------------------------------------------------------------------------- independent reference
def ref_threshold(a: np.ndarray, r: float) -> float:
    """Root tau >= 0 of sum(max(a - tau, 0)) = r by float64 bisection (0 when sum(a) <= r)."""
    a = np.asarray(a, dtype=np.float64)
    if a.sum() <= r:
        return 0.0

    def f(tau: float) -> float:
        return float(np.maximum(a - tau, 0.0).sum()) - r

    lo, hi = 0.0, float(a.max())  # f(lo) > 0 >= f(hi)
    while True:
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:  # lo and hi are adjacent floats
            break
        if f(mid) > 0:
            lo = mid
        else:
            hi = mid
    return lo if abs(f(lo)) < abs(f(hi)) else hi


def ref_project(v: np.ndarray, r: float) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    if np.abs(v).sum() <= r:
        return v.copy()
    tau = ref_threshold(np.abs(v), r)
    return np.sign(v) * np.maximum(np.abs(v) - tau, 0.0)


# ----------------------------------------------------------------------------- checks
def assert_matches_reference(V: torch.Tensor, W: torch.Tensor, radii) -> None:
    tol = TOL[V.dtype]
    V64 = V.double().numpy()
    W64 = W.double().numpy()
    for v, w, r in zip(V64, W64, np.broadcast_to(np.asarray(radii, dtype=np.float64), (V.shape[0],))):
        ref = ref_project(v, float(r))
        scale = np.abs(v).max(initial=0.0)
        err = np.abs(w - ref).max(initial=0.0)
        assert err <= tol * scale, f"error {err:.3g} > {tol} * {scale:.3g} (n={v.size}, r={r:.3g})"


def assert_kkt(v: np.ndarray, w: np.ndarray, r: float, tol: float) -> None:
    """KKT conditions of the projection of v onto the l1 ball of radius r, checked on w alone."""
    v = np.asarray(v, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    l1v = np.abs(v).sum()
    scale = np.abs(v).max(initial=0.0)
    if l1v <= r:
        if l1v < r * (1 - tol):
            np.testing.assert_array_equal(w, v)  # clearly inside: returned unchanged
        else:  # on the sphere up to the dtype's rounding of r and of the sum: at most a tiny step
            assert np.abs(w - v).max(initial=0.0) <= tol * scale
        return
    # primal: |w| <= |v| entrywise, signs kept, ||w||_1 = r (the constraint is active)
    assert np.all(np.abs(w) <= np.abs(v) + tol * scale)
    nz = w != 0
    assert np.all(np.sign(w[nz]) == np.sign(v[nz])), "projection flipped a sign"
    assert abs(np.abs(w).sum() - r) <= tol * l1v, f"||w||_1 = {np.abs(w).sum()!r} != r = {r!r}"
    if not nz.any():  # w = 0: optimal with tau = max|v| (only when r is ~0 at this precision)
        assert r <= tol * l1v
        return
    # stationarity: v_i - w_i = tau * sign(w_i) on the support, |v_i| <= tau off it, tau > 0
    gaps = np.abs(v[nz]) - np.abs(w[nz])
    tau = float(np.median(gaps))
    assert tau >= -tol * scale
    assert np.abs(gaps - tau).max() <= tol * scale, "v - w is not tau * sign(w) on the support"
    assert np.all(np.abs(v[~nz]) <= tau + tol * scale), "a zeroed entry exceeds the threshold"


def check_projection(V: torch.Tensor, radii, method: str) -> torch.Tensor:
    W = project_l1_ball(V, radii, method=method)
    assert W.dtype == V.dtype and W.shape == V.shape
    assert_matches_reference(V, W, radii)
    rr = np.broadcast_to(np.asarray(radii, dtype=np.float64), (V.shape[0],))
    for v, w, r in zip(V.double().numpy(), W.double().numpy(), rr):
        assert_kkt(v, w, float(r), TOL[V.dtype])
    return W


# ----------------------------------------------------------------------------- reference sanity
def test_reference_threshold_on_known_cases():
    exact = pytest.approx  # bisection stops within an ulp or two of the root
    assert ref_threshold(np.array([3.0, 1.0]), 1.0) == exact(2.0, rel=1e-15)  # clip 3 -> 1, drop 1
    assert ref_threshold(np.array([3.0, 3.0, 3.0, 1.0, 1.0]), 6.0) == exact(1.0, rel=1e-15)  # tie
    assert ref_threshold(np.array([1.0, 2.0]), 5.0) == 0.0  # inside
    assert ref_threshold(np.array([2.0, 2.0]), 0.0) == exact(2.0, rel=1e-15)  # r = 0 -> w = 0


# ----------------------------------------------------------------------------- random rows (hypothesis)
@st.composite
def rows_and_radius(draw):
    n = draw(st.integers(1, 48))
    entry = st.one_of(
        st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32),
        st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, -2.5]),  # zeros and ties
    )
    v = np.array(draw(st.lists(entry, min_size=n, max_size=n)), dtype=np.float64)
    l1 = float(np.abs(v).sum())
    radius = draw(st.one_of(
        st.floats(0.0, 1.3).map(lambda frac: frac * l1),  # around the interesting range
        st.sampled_from([0.0, 1e-30, 1e-12, 1e-3, 1.0, 1e30]),
        st.just(l1),  # exactly on the sphere
    ))
    return v, radius


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=rows_and_radius())
def test_projection_random_rows(method, dtype, data):
    v, radius = data
    V = torch.tensor(v, dtype=dtype).unsqueeze(0)
    check_projection(V, radius, method)


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 300), rows=st.integers(1, 8))
def test_projection_batched_rows_with_per_row_radii(method, seed, n, rows):
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(rows, n, dtype=torch.float64, generator=g) * torch.rand(rows, 1, dtype=torch.float64,
                                                                             generator=g).mul(8).exp()
    radii = V.abs().sum(dim=1) * torch.rand(rows, dtype=torch.float64, generator=g) * 1.2
    W = check_projection(V, radii, method)
    # each row is projected independently of the others
    for i in range(rows):
        torch.testing.assert_close(W[i:i + 1], project_l1_ball(V[i:i + 1], radii[i].item(), method),
                                   rtol=0, atol=1e-12 * V[i].abs().max().item())


# ----------------------------------------------------------------------------- adversarial rows
def newton_worst_case_row(n: int = 15) -> list[float]:
    """Sorted rows where every Newton step drops only the smallest active entry (gaps grow ~ m!)."""
    b, T, e = [1.0], 1.0, 1e-15
    for m in range(2, n + 1):
        if m > 2:
            e *= m * 1.05
        b.append(T - e)
        T -= e / m
    return b


def adversarial_cases():
    rng = np.random.default_rng(0)
    big = rng.standard_normal(11008)
    heavy = rng.standard_cauchy(11008)
    cases = [
        ("ties-all-equal", [2.0] * 7, 3.0),
        ("ties-all-equal-signs", [2.0, -2.0] * 4, 15.9),
        ("tie-at-threshold", [3.0, -3.0, 3.0, 1.0, -1.0], 6.0),
        ("ties-below", [5.0, 1.0, 1.0, 1.0, -1.0], 2.0),
        ("zeros-only", [0.0] * 5, 1.0),
        ("zeros-only-r0", [0.0, -0.0, 0.0], 0.0),
        ("mostly-zeros", [0.0, 0.0, 4.0, 0.0, -3.0, 0.0], 2.0),
        ("inside", [0.1, -0.2, 0.3], 1.0),
        ("on-sphere", [0.25, -0.25, 0.5], 1.0),
        ("radius-zero", [1.0, -2.0, 3.0], 0.0),
        ("tiny-radius", [1.0, -2.0, 3.0, 3.0], 1e-30),
        ("tiny-radius-2", [1.0, -2.0, 3.0], 1e-9),
        ("huge-radius", [1e6, -2e6, 3.0], 1e30),
        ("length-1", [5.0], 2.0),
        ("length-1-neg", [-5.0], 2.0),
        ("length-1-inside", [-0.5], 2.0),
        ("tiny-values", list(1e-20 * rng.standard_normal(9)), 1e-20),
        ("huge-values", list(1e20 * rng.standard_normal(9)), 1e20),
        ("newton-worst-case", newton_worst_case_row(), 1e-12),
        ("length-11008", list(big), 0.3 * np.abs(big).sum()),
        ("length-11008-small-r", list(big), 1.0),
        ("length-11008-heavy", list(heavy), 5.0),
        ("length-11008-r0", list(big), 0.0),
    ]
    return cases


ADVERSARIAL = adversarial_cases()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name,row,radius", ADVERSARIAL, ids=[c[0] for c in ADVERSARIAL])
def test_projection_adversarial_rows(name, row, radius, dtype, method):
    if dtype == torch.float32 and not all(abs(x) < 1e30 for x in row):
        pytest.skip("out of float32 range")
    V = torch.tensor(row, dtype=dtype).unsqueeze(0)
    check_projection(V, radius, method)


@pytest.mark.parametrize("method", METHODS)
def test_projection_of_known_examples(method):
    V = torch.tensor([[3.0, -1.0], [2.0, 2.0], [0.1, 0.2], [-5.0, 0.0]], dtype=torch.float64)
    W = project_l1_ball(V, 1.0, method=method)
    expected = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.1, 0.2], [-1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(W, expected, rtol=0, atol=1e-15)


def test_methods_agree_on_threshold():
    g = torch.Generator().manual_seed(3)
    A = torch.randn(64, 500, dtype=torch.float64, generator=g).abs()
    r = A.sum(dim=1) * torch.rand(64, dtype=torch.float64, generator=g)
    t_sort = l1_threshold(A, r, "sort")
    t_newton = l1_threshold(A, r, "newton")
    assert t_sort.shape == (64, 1)
    torch.testing.assert_close(t_sort, t_newton, rtol=1e-12, atol=0)
    ref = torch.tensor([ref_threshold(a, float(ri)) for a, ri in zip(A.numpy(), r.numpy())],
                       dtype=torch.float64)
    torch.testing.assert_close(t_sort[:, 0], ref, rtol=1e-12, atol=0)


def test_projection_does_not_modify_input():
    V = torch.randn(4, 10)
    before = V.clone()
    project_l1_ball(V, 0.5)
    prox_linf(V, 0.5, group_size=5)
    assert torch.equal(V, before)


@pytest.mark.parametrize("bad,exc,words", [
    (lambda: project_l1_ball(torch.ones(3), 1.0), ValueError, ["(3,)"]),
    (lambda: project_l1_ball(torch.ones(2, 3, dtype=torch.int64), 1.0), TypeError, ["torch.int64"]),
    (lambda: project_l1_ball(torch.ones(2, 3), -0.5), ValueError, ["-0.5"]),
    (lambda: project_l1_ball(torch.ones(2, 3), torch.ones(3)), ValueError, ["3", "2"]),
    (lambda: project_l1_ball(torch.ones(2, 3), 1.0, method="bisect"), ValueError, ["bisect", "sort", "newton"]),
    (lambda: prox_linf(torch.ones(2, 3), -1.0), ValueError, ["-1.0"]),
])
def test_bad_input_raises_clear_errors(bad, exc, words):
    with pytest.raises(exc) as err:
        bad()
    for word in words:
        assert word in str(err.value)


# ----------------------------------------------------------------------------- prox of the l_inf norm
def random_rows(seed: int, rows: int, n: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(rows, n, dtype=torch.float64, generator=g)
    V[0, : n // 2] = 1.5  # ties at the top
    V[1 % rows] = 0.0  # a zero row
    return V.to(dtype)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("t", [1e-6, 0.3, 2.0, 50.0, 1e6])
def test_prox_moreau_identity(t, dtype, method):
    V = random_rows(1, 6, 40, dtype)
    P = prox_linf(V, t, method=method)
    proj = project_l1_ball(V / t, 1.0, method=method)
    scale = V.abs().amax(dim=1, keepdim=True)
    err = (P + t * proj - V).abs()
    assert torch.all(err <= 4 * TOL[dtype] * scale), f"Moreau identity off by {err.max().item():.3g}"


def assert_prox_optimality(v: np.ndarray, p: np.ndarray, t: float, tol: float) -> None:
    """(v - p)/t lies in the subdifferential of ||.||_inf at p."""
    scale = max(np.abs(v).max(initial=0.0), 1e-300)
    l1v = np.abs(v).sum()
    if l1v < t * (1 - tol):
        assert np.all(p == 0), "prox must be 0 when ||v||_1 <= t"
        return
    if abs(l1v - t) <= tol * l1v:  # ||v||_1 = t up to the dtype's rounding: p is (nearly) 0
        assert np.abs(p).max() <= tol * l1v
        return
    d = v - p
    pmax = np.abs(p).max()
    assert pmax > 0
    # ||v - p||_1 = t ...
    assert abs(np.abs(d).sum() - t) <= tol * np.abs(v).sum()
    # ... supported where |p_i| = ||p||_inf, with the sign of p_i
    support = np.abs(d) > tol * scale
    assert np.all(np.abs(np.abs(p[support]) - pmax) <= tol * scale), "v - p lives off the max set"
    assert np.all(np.sign(d[support]) == np.sign(p[support])), "v - p has the wrong sign"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@settings(max_examples=60, deadline=None)
@given(data=rows_and_radius())
def test_prox_optimality_condition(method, dtype, data):
    v, t = data
    t = min(max(t, 1e-6), 1e6)  # prox scale t > 0
    V = torch.tensor(v, dtype=dtype).unsqueeze(0)
    P = prox_linf(V, t, method=method)
    assert_prox_optimality(V.double().numpy()[0], P.double().numpy()[0], t, 4 * TOL[dtype])


@pytest.mark.parametrize("method", METHODS)
def test_prox_minimises_its_objective(method):
    """No random point beats the prox on 1/2 ||x - v||^2 + t ||x||_inf."""
    g = torch.Generator().manual_seed(5)
    V = torch.randn(20, 12, dtype=torch.float64, generator=g)
    t = 0.7
    P = prox_linf(V, t, method=method)

    def obj(X):
        return 0.5 * ((X - V) ** 2).sum(dim=1) + t * X.abs().amax(dim=1)

    best = obj(P)
    for scale in (1e-3, 1e-1, 1.0):
        for _ in range(20):
            X = P + scale * torch.randn(P.shape, dtype=P.dtype, generator=g)
            assert torch.all(obj(X) >= best - 1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_prox_edge_cases(method):
    V = torch.tensor([[3.0, -1.0, 0.5], [0.1, 0.1, -0.1]], dtype=torch.float64)
    assert torch.equal(prox_linf(V, 0.0, method=method), V)  # t = 0: identity
    assert torch.equal(prox_linf(V, 10.0, method=method), torch.zeros_like(V))  # ||v||_1 <= t: zero
    P = prox_linf(V, 1.0, method=method)
    torch.testing.assert_close(P[0], torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64))  # clip at 2
    assert torch.equal(P[1], torch.zeros(3, dtype=torch.float64))  # ||v||_1 = 0.3 <= 1


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("group_size", [1, 4, 8, 32])
def test_prox_group_form_equals_row_form_on_reshaped_tensor(group_size, method):
    V = random_rows(2, 5, 32)
    t = 0.4
    grouped = prox_linf(V, t, group_size=group_size, method=method)
    rows = prox_linf(V.reshape(-1, group_size), t, method=method).reshape(V.shape)
    assert torch.equal(grouped, rows)
    if group_size == 32:  # one group per row: the row form itself
        assert torch.equal(grouped, prox_linf(V, t, method=method))
    if group_size == 1:  # ||x||_inf of one entry is |x|: soft thresholding
        torch.testing.assert_close(grouped, torch.sign(V) * (V.abs() - t).clamp(min=0))


@pytest.mark.parametrize("group_size,n", [(5, 12), (7, 24), (24, 16)])
def test_prox_group_size_must_divide_row_length(group_size, n):
    with pytest.raises(ValueError) as err:
        prox_linf(torch.ones(3, n), 0.1, group_size=group_size)
    assert str(group_size) in str(err.value) and str(n) in str(err.value)
    with pytest.raises(ValueError, match=str(n)):
        linf_norms(torch.ones(3, n), group_size=group_size)


@pytest.mark.parametrize("group_size", [0, -4])
def test_prox_group_size_must_be_positive(group_size):
    with pytest.raises(ValueError, match=str(group_size)):
        prox_linf(torch.ones(2, 8), 0.1, group_size=group_size)


def test_linf_norms():
    W = torch.tensor([[1.0, -4.0, 2.0, 0.5], [0.0, 0.0, -3.0, 1.0]])
    torch.testing.assert_close(linf_norms(W), torch.tensor([4.0, 3.0]))
    torch.testing.assert_close(linf_norms(W, group_size=2), torch.tensor([4.0, 2.0, 0.0, 3.0]))
    assert math.isclose(float(linf_norms(W, 4).sum()), 7.0)
