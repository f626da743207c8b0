"""The fast MagR path (issue 6): fused sort-free prox step, Lanczos lambda_max, FISTA, stacked layers."""
from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from magr.core import kernels
from magr.core.kernels import linf_threshold_from_max, prox_step_
from magr.core.projection import l1_threshold, prox_linf
from magr.core.fista import fast_iters_matching, fista_momenta, magr_fista
from magr.core.preprocessing import MagR
from magr.core.solver import exact_objective, lambda_max_lanczos, magr_ista

import magr_problems


def problem(seed: int, out: int = 48, n: int = 96, tokens: int = 64, heavy: bool = False):
    """W_hat (out x n) with outlier entries and H = X^T X of random features (rank <= tokens)."""
    W, X = magr_problems.problem(seed, out, n, tokens, heavy)
    return W, X.T @ X


# --- sort-free threshold and the fused step --------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 6),
    n=st.integers(1, 40),
    t=st.sampled_from([0.0, 1e-4, 1e-2, 0.5, 3.0, 100.0]),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_threshold_from_max_matches_sort(rows, n, t, ties, seed):
    A = torch.rand(rows, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if ties:
        A = (A * 4).round() / 4  # many equal entries, including the maximum
    tau = linf_threshold_from_max(A, t)
    ref = l1_threshold(A, t, method="sort")
    assert torch.allclose(tau, ref, atol=1e-12, rtol=1e-10)
    # the defining equation: sum max(A - tau, 0) = t, or tau = 0 when sum A <= t
    f = (A - tau).clamp(min=0).sum(dim=1, keepdim=True)
    inside = A.sum(dim=1, keepdim=True) <= t
    assert torch.all(torch.where(inside, tau == 0, (f - t).abs() <= 1e-9 * (1 + A.sum(dim=1, keepdim=True))))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), n=st.integers(1, 40), t=st.sampled_from([0.0, 1e-3, 0.05, 0.5, 5.0]),
       ties=st.booleans(), seed=st.integers(0, 2**16))
def test_threshold_on_candidates_is_the_full_row_newton_to_the_bit(rows, n, t, ties, seed):
    """The candidate-only search returns exactly the float32 tau of the full-row Newton search it replaced."""
    from magr.core.projection import threshold_newton

    A = torch.rand(rows, n, generator=torch.Generator().manual_seed(seed))
    if ties:
        A = (A * 4).round() / 4
    tau0 = (A.amax(dim=1, keepdim=True) - t).clamp(min=0)
    assert torch.equal(linf_threshold_from_max(A, t), threshold_newton(A, t, max_iter=64, tau0=tau0))


def test_threshold_falls_back_to_the_full_search_when_a_set_moves(monkeypatch):
    A = torch.rand(5, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    real = kernels._newton_on_candidates
    monkeypatch.setattr(kernels, "_newton_on_candidates", lambda *a: (a[2], real(*a)[1]))  # stops too early
    import magr.core.projection

    calls = []
    full = magr.core.projection.threshold_newton
    monkeypatch.setattr(magr.core.projection, "threshold_newton", lambda *a, **k: calls.append(1) or full(*a, **k))
    tau = linf_threshold_from_max(A, 0.5)
    assert calls, "the exactness check did not send the search to the full rows"
    assert torch.allclose(tau, l1_threshold(A, 0.5, method="sort"), atol=1e-12)


def test_prox_step_reuses_its_workspace():
    g = torch.Generator().manual_seed(4)
    W_hat = 0.02 * torch.randn(6, 16, generator=g)
    runs = []
    for work in (None, kernels.prox_workspace(W_hat)):
        W, P = W_hat.clone(), torch.zeros_like(W_hat)
        for k in range(4):
            G = 1e-2 * torch.randn(6, 16, generator=torch.Generator().manual_seed(k))
            prox_step_(W_hat, W, P, G, 1e-3, 0.5, 8, backend="torch", work=work)
        runs.append((W, P))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("group_size", [None, 8])
@pytest.mark.parametrize("momentum", [0.0, 0.6])
def test_prox_step_torch_is_prox_then_extrapolation(group_size, momentum):
    g = torch.Generator().manual_seed(3)
    W_hat = 0.02 * torch.randn(10, 32, generator=g)
    W = W_hat + 1e-3 * torch.randn(10, 32, generator=g)
    P = 1e-3 * torch.randn(10, 32, generator=g)
    G = 1e-3 * torch.randn(10, 32, generator=g)
    W_old = W.clone()
    expected = prox_linf(W_hat + P - G, 1e-3, group_size, method="sort")
    prox_step_(W_hat, W, P, G, 1e-3, momentum, group_size, backend="torch")
    assert torch.allclose(W, expected, atol=1e-8)
    assert torch.allclose(P, expected + momentum * (expected - W_old) - W_hat, atol=1e-8)


def test_prox_step_rejects_bad_input():
    a = torch.zeros(4, 6)
    with pytest.raises(ValueError, match="share one 2-D shape"):
        prox_step_(a, a.clone(), a.clone(), torch.zeros(4, 5), 1e-3)
    with pytest.raises(ValueError, match="group_size 4 does not divide"):
        prox_step_(a, a.clone(), a.clone(), a.clone(), 1e-3, group_size=4)
    with pytest.raises(ValueError, match="t must be >= 0"):
        prox_step_(a, a.clone(), a.clone(), a.clone(), -1.0)
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        prox_step_(a, a.clone(), a.clone(), a.clone(), 1e-3, backend="cuda")


def test_auto_backend_is_torch_on_cpu():
    assert kernels.resolve_backend("auto", torch.device("cpu")) == "torch"


# --- lambda_max, momenta -----------------------------------------------------------------------------


@pytest.mark.parametrize("n,tokens,heavy", [(64, 16, False), (200, 400, True), (5, 3, False)])
def test_lanczos_matches_eigvalsh(n, tokens, heavy):
    _, H = problem(n + tokens, out=1, n=n, tokens=tokens, heavy=heavy)
    exact = torch.linalg.eigvalsh(H.double()).max()
    got = lambda_max_lanczos(H)
    assert got.dtype == H.dtype
    assert abs(float(got) / float(exact) - 1) < 1e-5


def test_fista_momenta():
    m = fista_momenta(50)
    assert m[0] == 0.0 and all(0 <= a < b < 1 for a, b in zip(m[1:], m[2:]))
    assert fista_momenta(7, "none") == [0.0] * 7
    with pytest.raises(ValueError, match="unknown acceleration 'nesterov'"):
        fista_momenta(3, "nesterov")


# --- the solver --------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [None, 16])
def test_fast_without_acceleration_is_the_published_iteration(group_size):
    W, H = problem(0)
    alpha = 1e-3 if group_size is None else 1e-4
    ref = magr_ista(W, H, alpha, iters=60, group_size=group_size, projection="sort")
    fast = magr_fista(W, H, alpha, iters=60, group_size=group_size, accel="none", precision="fp32",
                                lambda_method="eigh")
    assert torch.allclose(fast, ref, atol=1e-6)
    assert not torch.allclose(fast, W, atol=1e-4)  # it did move


@pytest.mark.parametrize("heavy,ista_iters", [(False, 200), (True, 200), (False, 50)])
def test_fista_reaches_ista_objective_in_fewer_iterations(heavy, ista_iters):
    W, H = problem(1, heavy=heavy)
    Hn = H.double() / torch.linalg.eigvalsh(H.double()).max()
    ref = magr_ista(W, H, 1e-3, iters=ista_iters, projection="sort")
    k = fast_iters_matching(ista_iters)
    assert k < ista_iters / 2
    fast = magr_fista(W, H, 1e-3, iters=k, precision="fp32")
    F_ref = exact_objective(ref, W, Hn, 1e-3)
    F_fast = exact_objective(fast, W, Hn, 1e-3)
    F_start = exact_objective(W, W, Hn, 1e-3)
    assert F_ref < F_start
    assert F_fast <= F_ref * 1.001


def test_bf16_matmuls_change_the_objective_little():
    W, H = problem(2)
    Hn = H.double() / torch.linalg.eigvalsh(H.double()).max()
    f32 = magr_fista(W, H, 1e-3, iters=40, precision="fp32")
    b16 = magr_fista(W, H, 1e-3, iters=40, precision="bf16")
    F32, F16 = exact_objective(f32, W, Hn, 1e-3), exact_objective(b16, W, Hn, 1e-3)
    assert abs(F16 / F32 - 1) < 2e-2
    assert b16.dtype == W.dtype


def test_info_and_callback():
    W, H = problem(4)
    seen = []
    out, info = magr_fista(W, H, 1e-3, iters=12, return_info=True,
                                     callback=lambda k, Wk: seen.append((k, Wk.clone())))
    assert [k for k, _ in seen] == list(range(1, 13))
    assert torch.equal(seen[-1][1], out)
    Hn = H.double() / info.lambda_max
    assert info.objective[0] == pytest.approx(exact_objective(W, W, Hn, 1e-3), rel=1e-9)
    assert info.objective[-1] == pytest.approx(exact_objective(out, W, Hn, 1e-3), rel=1e-9)
    assert info.objective[-1] < info.objective[0]
    assert torch.all(info.row_max_after <= info.row_max_before + 1e-7)


class _Stats:
    """Calibration statistics with the same X for MagR's features and OPTQ's H."""

    def __init__(self, H):
        self.H = self.H_last = H


def test_magr_step_on_layers_sharing_an_input_equals_one_call_per_layer():
    W, H = problem(5, out=60)
    parts = [W[:20], W[20:45], W[45:].double()]
    grouped, infos = MagR(alpha=1e-3, iters=30).apply(parts, _Stats(H))
    assert len(infos) == 3 and all(i.objective[-1] < i.objective[0] for i in infos)
    for p, g in zip(parts, grouped):
        single = magr_fista(p, H, 1e-3, 30)
        assert g.shape == p.shape and g.dtype == p.dtype
        assert torch.allclose(g.double(), single.double(), atol=1e-6)
        torch.testing.assert_close(MagR(alpha=1e-3, iters=30)(p, H), single)


def test_magr_step_with_the_published_solver_and_infos():
    W, H = problem(6)
    parts = [W[:16], W[16:]]
    ref, infos = MagR(alpha=1e-3, iters=20, solver="ista").apply(parts, _Stats(H))
    for p, r in zip(parts, ref):
        assert torch.equal(r, magr_ista(p, H, 1e-3, 20))
    assert len(infos) == 2 and all(i.objective[-1] < i.objective[0] for i in infos)
    assert MagR().for_group(None).iters == 48 and MagR(solver="ista").for_group(None).iters == 200
    assert MagR().for_group(None).alpha == 1e-3 and MagR().for_group(64).alpha == 1e-4


def test_fast_rejects_bad_input():
    W, H = problem(7)
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        magr_fista(W, H, 1e-3, 10, precision="fp16")
    with pytest.raises(ValueError, match="unknown acceleration 'heavy-ball'"):
        magr_fista(W, H, 1e-3, 10, accel="heavy-ball")
    with pytest.raises(ValueError, match="unknown lambda_method 'power'"):
        magr_fista(W, H, 1e-3, 10, lambda_method="power")
    with pytest.raises(ValueError, match=r"H \(in x in\)"):
        magr_fista(W, H[:5, :5], 1e-3, 10)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        magr_fista(W, H, -1.0, 10)
    with pytest.raises(ValueError, match="one input width"):
        MagR().apply([], _Stats(H))
    with pytest.raises(ValueError, match="one input width"):
        MagR().apply([W, W[:, :10]], _Stats(H))
    with pytest.raises(ValueError, match="solver='slow' is not allowed"):
        MagR(solver="slow")


def test_zero_H_leaves_weight_unchanged():
    W, _ = problem(8)
    out = magr_fista(W, torch.zeros(W.shape[1], W.shape[1]), 1e-3, 5)
    assert torch.equal(out, W)


# --- CUDA (skipped without a GPU) ------------------------------------------------------------------

cuda = pytest.mark.cuda


@cuda
@pytest.mark.parametrize("shape,group_size", [((64, 4096), None), ((24, 11008), None), ((40, 4096), 128),
                                               ((8, 300), None)])
@pytest.mark.parametrize("p_dtype", [torch.float32, torch.bfloat16])
def test_triton_step_matches_torch_step(shape, group_size, p_dtype):
    from triton_cases import PROX_THRESHOLDS, prox_both_backends, prox_problem

    W_hat, W, P, G = prox_problem(*shape, p_dtype, device="cuda")
    for t in PROX_THRESHOLDS:
        (Wt, Pt), (Wk, Pk) = prox_both_backends(W_hat, W, P, G, t, group_size)
        assert torch.allclose(Wk, Wt, atol=1e-7, rtol=0), (t, (Wk - Wt).abs().max())
        rtol = 0 if p_dtype == torch.float32 else 2**-7  # bf16: at most one rounding step apart
        assert torch.allclose(Pk.float(), Pt.float(), atol=1e-7, rtol=rtol)
        ref = prox_linf((W_hat + P.float() - G).double().cpu(), t, group_size, method="sort")
        assert torch.allclose(Wk.double().cpu(), ref, atol=1e-6)


@cuda
def test_fast_on_cuda_matches_cpu_reference():
    W, H = problem(9, out=256, n=512, tokens=256)
    before = torch.get_float32_matmul_precision()
    ref = magr_ista(W, H, 1e-3, iters=50, projection="sort")
    fast = magr_fista(W.cuda(), H.cuda(), 1e-3, iters=50, accel="none", precision="fp32",
                                kernel="triton")
    assert torch.get_float32_matmul_precision() == before
    assert fast.device.type == "cuda"
    assert torch.allclose(fast.cpu(), ref, atol=1e-5)


@cuda
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_fista_on_cuda_reaches_ista_objective(precision):
    W, H = problem(10, out=512, n=1024, tokens=512)
    Hn = H.double() / torch.linalg.eigvalsh(H.double()).max()
    ref = magr_ista(W.cuda(), H.cuda(), 1e-3, iters=200, projection="sort").cpu()
    fast = magr_fista(W.cuda(), H.cuda(), 1e-3, 64, precision=precision, rows=[200, W.shape[0] - 200]).cpu()
    assert exact_objective(fast, W, Hn, 1e-3) <= exact_objective(ref, W, Hn, 1e-3) * 1.001


@cuda
def test_lanczos_on_cuda():
    _, H = problem(11, out=1, n=2048, tokens=512)
    exact = torch.linalg.eigvalsh(H.double()).max()
    assert abs(float(lambda_max_lanczos(H.cuda())) / float(exact) - 1) < 1e-5


def test_benchmark_script_runs_on_cpu(capsys, monkeypatch):
    """benchmarks/bench_magr.py end to end on the tiny block with few iterations."""
    from conftest import load_benchmark

    bench = load_benchmark("bench_magr", monkeypatch)
    bench.main(["--device", "cpu", "--shape", "tiny", "--ref-iters", "12", "--iters", "10", "--repeats", "1",
                "--variants", "default,ista", "--trace", "12"])
    out = capsys.readouterr().out
    assert "device: CPU" in out and "Per block (7 layers" in out
    ista = next(line for line in out.splitlines() if line.strip().startswith("fast ISTA 12"))
    worst = float(re.search(r"worst layer ([-+0-9.e]+)", ista).group(1))
    assert abs(worst) < 1e-3  # the sort-free ISTA gives the reference's objective, layer by layer
    assert "iterations to reach F <= 1.001 * F_ref(ISTA 12)" in out
