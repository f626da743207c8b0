"""Compiled coordinate descent (magr.core.cd_sweep) against the pure-torch loop; the released code's grid refit."""
from __future__ import annotations

import logging

import pytest
import torch

from magr.core.cd_check import codes, compare_sweeps
from magr.core.methods import QuantConfig
from magr.core.optq import OPTQ
from magr.core.quantizers import Grid, default_beta, quantize, rtn
from magr.core.refinement import CD, cd_objective, cd_refine, cd_refine_compiled, refine_function
from test_quantizers import assert_on_grid

DAMP, EPS = CD.damp, CD.eps
TIE_ULPS = 256  # a first difference must lie within 256 x 2^-24 of the terms' magnitude from a boundary


def correlated_layer(seed: int, out: int = 48, n: int = 96, tokens: int = 256):
    """W (out x n) with outliers and H = X^T X of correlated features of rank < n."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n // 2, generator=g) @ torch.randn(n // 2, n, generator=g)
    X += 0.1 * torch.randn(tokens, n, generator=g)
    W = 0.05 * torch.randn(out, n, generator=g)
    W[::5, 3] = 0.4
    return W, X.T @ X


def start(W, H, bits, group_size, quantizer="optq"):
    grid = Grid(bits, group_size, beta=default_beta(bits, group_size))
    Q, p = OPTQ()(W, H, grid) if quantizer == "optq" else rtn(W, grid)
    return Q, p, grid


def check_equal(W, H, Q0, p, grid, passes, refit_grid, where=""):
    res = compare_sweeps(Q0, W, H, p, passes, DAMP, EPS, grid if refit_grid else None)
    assert res.all_ties(TIE_ULPS), f"{where}: a difference that is not a rounding tie: {res.ties}"
    return res


@pytest.mark.parametrize("passes", [1, 30])
@pytest.mark.parametrize("refit_grid", [False, True])
@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_compiled_equals_torch_loop_on_random_layers(bits, group_size, refit_grid, passes):
    differing = 0
    for seed in range(3):
        W, H = correlated_layer(seed + 10 * bits)
        Q0, p, grid = start(W, H, bits, group_size)
        differing += check_equal(W, H, Q0, p, grid, passes, refit_grid, f"seed {seed}").differing
    assert differing <= 3 * 48  # ties are rare: at most one row's worth per layer


@pytest.mark.parametrize("group_size", [None, 4])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_compiled_equals_torch_loop_on_every_stories260k_layer(stories_layers, bits, group_size):
    total = differing = 0
    for i, (W, H) in enumerate(stories_layers):
        Q0, p, grid = start(W, H, bits, group_size)
        for refit_grid in (False, True):
            for passes in (1, 30):
                res = check_equal(W, H, Q0, p, grid, passes, refit_grid, f"layer {i}, refit {refit_grid}, {passes}")
                total, differing = total + res.entries, differing + res.differing
    assert differing <= total * 1e-3


def test_tie_check_can_fail(monkeypatch):
    """A compiled sweep that rounds a code the wrong way away from any tie is caught."""
    W, H = correlated_layer(1)
    Q0, p, grid = start(W, H, 3, None)
    real = cd_refine_compiled

    def wrong(Q, *args, **kw):
        Q, params = real(Q, *args, **kw)
        Q = Q.clone()
        Q[5, 7] = quantize(Q[5, 7] + params.scale[5, 0], params.scale[5, 0], params.zero[5, 0], params.maxq)
        if Q[5, 7] == real(Q0, *args, **kw)[0][5, 7]:
            Q[5, 7] = quantize(Q[5, 7] - 2 * params.scale[5, 0], params.scale[5, 0], params.zero[5, 0], params.maxq)
        return Q, params

    monkeypatch.setattr("magr.core.cd_check.cd_refine_compiled", wrong)
    res = compare_sweeps(Q0, W, H, p, 1, DAMP, EPS)
    assert res.differing >= 1 and not res.all_ties(TIE_ULPS)


def released_cd(Q, W, XtX, scale, zero, maxq, passes, grid: Grid, static_groups: bool = False):
    """The released code's coordinate-descent loop (AozhongZhang/MagR, optq.py, after OPTQ), transcribed:
    float64 throughout; targets from P_hat of the pass start plus the corrections of the columns already
    updated; a non-static group's grid found again from Q_comq[:, j:j+g] at j % g == 0."""
    XtX = XtX.double().clone()
    mean = torch.mean(torch.diagonal(XtX))
    torch.diagonal(XtX).add_(0.75 * mean)
    norm_sigma = XtX / (torch.diagonal(XtX) + 0.1)
    P = W.double() @ norm_sigma
    norm_sigma.fill_diagonal_(0)
    norm_sigma = norm_sigma.t()
    Q_comq = Q.double().clone()
    g = grid.group_size
    s, z = scale.double(), zero.double()  # (out, 1) per channel, else set at each group start
    for _ in range(passes):
        delta_Q = Q_comq.clone().t()
        P_hat = (norm_sigma @ delta_Q).t()
        for j in range(Q.shape[1]):
            u = P[:, j] - P_hat[:, j]
            if j > 0:
                u = u + norm_sigma[j, :j] @ delta_Q[:j, :]
            if g is not None:
                if not static_groups and j % g == 0:
                    s, z = (t.double() for t in grid.row_params(Q_comq[:, j:j + g].float()))
                elif static_groups:
                    s, z = scale[:, j // g:j // g + 1].double(), zero[:, j // g:j // g + 1].double()
            u = s[:, 0] * (torch.clamp(torch.round(u / s[:, 0]) + z[:, 0], 0, maxq) - z[:, 0])
            Q_comq[:, j] = u
            delta_Q[j, :] -= u
    return Q_comq


@pytest.mark.parametrize("backend", ["torch", "compiled"])
@pytest.mark.parametrize("bits,group_size", [(2, 8), (3, 16), (4, 8), (2, None), (3, None)])
def test_refit_matches_the_released_loop(backend, bits, group_size):
    W, H = correlated_layer(bits + 7, out=24, n=64)
    Q0, p, grid = start(W, H, bits, group_size)
    ref = released_cd(Q0, W, H, p.scale, p.zero, p.maxq, 3, grid)
    fn = cd_refine if backend == "torch" else cd_refine_compiled
    Q, params = fn(Q0, W, H, p, 3, DAMP, EPS, grid)
    assert_on_grid(Q, params)
    assert torch.allclose(Q.double(), ref, rtol=0, atol=1e-6), (Q.double() - ref).abs().max()
    if group_size is not None:  # the returned grids: fitted in the last pass on the values of the pass before
        prev = released_cd(Q0, W, H, p.scale, p.zero, p.maxq, 2, grid).float()
        last = torch.cat([grid.row_params(prev[:, j:j + group_size])[0] for j in range(0, 64, group_size)], 1)
        assert torch.allclose(params.scale, last, rtol=1e-6, atol=0)
        assert torch.equal(params.g_idx, torch.arange(64) // group_size)


def test_refit_keeps_static_groups_and_differs_from_keep():
    W, H = correlated_layer(3, out=24, n=64)
    grid = Grid(2, 8, beta=0.8)
    Q0, p = OPTQ(static_groups=True)(W, H, grid)
    assert p.static
    ref = released_cd(Q0, W, H, p.scale, p.zero, p.maxq, 2, grid, static_groups=True)
    for fn in (cd_refine, cd_refine_compiled):
        Q, params = fn(Q0, W, H, p, 2, DAMP, EPS, grid)
        assert torch.equal(params.scale, p.scale) and torch.allclose(Q.double(), ref, atol=1e-6)
    Q1, _ = OPTQ()(W, H, grid)
    keep, _ = cd_refine(Q1, W, H, _, 2, DAMP, EPS)
    refit, _ = cd_refine(Q1, W, H, _, 2, DAMP, EPS, grid)
    assert not torch.equal(keep, refit)


def test_refit_with_actorder_makes_groups_consecutive():
    W, H = correlated_layer(4, out=16, n=64)
    grid = Grid(3, 16, beta=0.95)
    Q0, p = OPTQ(actorder=True)(W, H, grid)
    assert not torch.equal(p.g_idx, torch.arange(64) // 16)
    Q, params = cd_refine_compiled(Q0, W, H, p, 2, DAMP, EPS, grid)
    assert torch.equal(params.g_idx, torch.arange(64) // 16)
    assert_on_grid(Q, params)


def test_keep_never_increases_the_objective_and_converged_rows_stop():
    W, H = correlated_layer(5)
    Q0, p, grid = start(W, H, 2, None)
    objective = [cd_objective(Q0, W, H, DAMP, EPS)]
    for passes in (1, 2, 5, 30, 200):
        Q, _ = cd_refine_compiled(Q0, W, H, p, passes, DAMP, EPS)
        objective.append(cd_objective(Q, W, H, DAMP, EPS))
    assert all(b <= a * (1 + 1e-9) for a, b in zip(objective, objective[1:]))
    assert objective[-1] == objective[-2]  # converged long before 30 passes


def test_step_returns_codes_and_grids_that_agree():
    W, H = correlated_layer(6)
    Q0, p, grid = start(W, H, 2, 16)
    for cd_grid in ("keep", "refit"):
        for backend in ("torch", "compiled"):
            Q, params = CD(passes=3, grid=cd_grid, backend=backend)(Q0, W, H, p, grid)
            assert_on_grid(Q, params)
    assert CD(passes=0)(Q0, W, H, p, grid) == (Q0, p)


def test_pipeline_stores_the_refined_grids(stories260k):
    from magr.pipeline.calibration_data import get_calibration
    from magr.pipeline.blocks import quantize_model

    model, tok = stories260k
    calib = get_calibration("tinystories", tok, nsamples=4, seqlen=64, seed=0)
    cfg = QuantConfig.build(method="magr+optq-cd", bits=2, group_size=4, cd_passes=2, cd_grid="refit", iters=2)
    res = quantize_model(model, calib, cfg, device="cpu", progress=False)
    for name, params in res.params.items():
        Q = model.get_submodule(name).weight.data
        assert_on_grid(Q, params)
        assert torch.equal(codes(Q, params).float(), assert_on_grid(Q, params))


def test_fallback_without_a_compiler(no_compiler, caplog):
    with pytest.raises(RuntimeError, match="cd_backend='compiled' cannot run"):
        refine_function("compiled", torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="magr.core.refinement"):
        assert refine_function("auto", torch.device("cpu")) is cd_refine
    assert "using the pure-torch loop" in caplog.text
    W, H = correlated_layer(2, out=8, n=16)
    Q0, p, grid = start(W, H, 2, None)
    Q, _ = CD(passes=2)(Q0, W, H, p, grid)  # runs, on the torch loop
    torch.testing.assert_close(Q, cd_refine(Q0, W, H, p, 2, DAMP, EPS)[0], rtol=0, atol=0)


def test_cd_settings_are_checked():
    with pytest.raises(ValueError, match="cd_grid='sometimes' is not allowed; allowed: keep, refit"):
        CD(grid="sometimes")
    with pytest.raises(ValueError, match="cd_backend='fortran' is not allowed"):
        CD(backend="fortran")
    cfg = QuantConfig.build(method="magr+optq-cd", bits=2, cd_grid="refit", cd_backend="torch")
    assert (cfg.refine.grid, cfg.refine.backend, cfg.refine.passes) == ("refit", "torch", 30)
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg


def test_benchmark_script_runs(capsys, monkeypatch):
    """benchmarks/bench_cd.py end to end on a tiny layer: both timings printed, no differing code."""
    from conftest import load_benchmark

    load_benchmark("bench_cd", monkeypatch).main(["--shapes", "tiny", "--passes", "3", "--prox-iters", "3"])
    out = capsys.readouterr().out
    assert "differing codes 0" in out and "without its early stop" in out
    assert "of the iteration; previous prox" in out


def sm90_ptx() -> str:
    """The Triton sweep compiled ahead of time for an H100/H200 (no GPU needed): its PTX."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from magr.core import cd_triton

    sig = {"Q": "*fp32", "T": "*fp64", "N": "*fp32", "S": "*fp32", "Z": "*fp32", "GI": "*i64", "RAN": "*i64",
           "out": "i32", "n": "i32", "n_groups": "i32", "refit_group": "i32", "passes": "i32", "beta": "fp32",
           "maxq": "fp32", "ROWS": "constexpr", "BK": "constexpr", "GB": "constexpr", "REFIT": "constexpr",
           "SYM": "constexpr"}
    src = ASTSource(fn=cd_triton._cd_sweep_kernel, signature=sig,
                    constexprs={"ROWS": cd_triton.ROWS, "BK": cd_triton.BK, "GB": 128, "REFIT": True, "SYM": False})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False}).asm["ptx"]


def test_triton_sweep_compiles_for_sm90_with_ieee_arithmetic():
    """IEEE division, no FMA contraction in the sm_90 PTX (compiled in a fresh process when this one runs
    Triton's interpreter, whose kernels cannot be compiled)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        out = subprocess.run([sys.executable, "-c", "import test_cd_sweep as t; print(t.sm90_ptx())"],
                             cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        ptx = out.stdout
    else:
        ptx = sm90_ptx()
    assert "div.rn.f32" in ptx and "div.full.f32" not in ptx and "fma.rn" not in ptx
