"""Uniform quantizer grids and RTN (magr.core.quantizers).

Grids are re-derived here from the documented formula with numpy float64, one row / group at a time:
xmin = min(min w, 0), xmax = max(max w, 0), delta = beta * (xmax - xmin) / (2^b - 1),
z = round(-xmin / delta); symmetric: xmax = max(|xmin|, xmax), xmin = -xmax, z = 2^(b-1).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from magr.core.quantizers import Grid, QuantParams, default_beta, quantize, quantize_codes, rtn

BITS = (2, 3, 4, 8)


def ref_grid(w: np.ndarray, bits: int, beta: float, sym: bool) -> tuple[float, float]:
    """(delta, z) of one row or group from the documented formula."""
    maxq = 2**bits - 1
    xmin, xmax = min(w.min(), 0.0), max(w.max(), 0.0)
    if sym:
        xmax = max(-xmin, xmax)
        if xmin < 0:
            xmin = -xmax
    if xmin == 0 and xmax == 0:
        xmin, xmax = -1.0, 1.0
    delta = beta * (xmax - xmin) / maxq
    z = (maxq + 1) / 2 if sym else float(np.round(-xmin / delta))
    return delta, z


def random_weight(seed: int, out: int = 6, n: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n, generator=g) * torch.rand(out, 1, generator=g).add(0.1)
    W[0] = W[0].abs()  # an all-positive row (xmin clamps to 0)
    W[1] = -W[1].abs()  # an all-negative row
    W[2, 5] = 8.0  # an outlier
    return W


def assert_on_grid(Q: torch.Tensor, p: QuantParams) -> torch.Tensor:
    """Every entry is scale * (q - zero) with an integer code q in [0, maxq]; returns the codes."""
    scale, zero = p.columns()
    codes = Q.double() / scale.double() + zero.double()
    assert torch.all((codes - codes.round()).abs() <= 1e-3), "an entry is off its grid"
    codes = codes.round()
    assert codes.min() >= 0 and codes.max() <= p.maxq
    return codes


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [None, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("beta", [1.0, 0.8])
def test_rtn_grid_matches_formula_and_is_nearest(bits, group_size, sym, beta):
    W = random_weight(bits)
    Q, p = rtn(W, Grid(bits, group_size, sym, beta))
    out, n = W.shape
    g = group_size or n
    assert p.maxq == 2**bits - 1
    assert p.scale.shape == p.zero.shape == (out, n // g)
    torch.testing.assert_close(p.g_idx, torch.arange(n) // g)
    for i in range(out):
        for k in range(n // g):
            delta, z = ref_grid(W[i, k * g:(k + 1) * g].double().numpy(), bits, beta, sym)
            assert float(p.scale[i, k]) == pytest.approx(delta, rel=1e-6)
            assert float(p.zero[i, k]) == z
    assert_on_grid(Q, p)
    # nearest grid point: no other point of the row's / group's grid is closer
    scale, zero = p.columns()
    levels = torch.arange(p.maxq + 1, dtype=torch.float64)
    grid = scale.double().unsqueeze(-1) * (levels - zero.double().unsqueeze(-1))  # (out, n, 2^b)
    best = (grid - W.double().unsqueeze(-1)).abs().amin(dim=-1)
    slack = 1e-6 * (scale.double() + W.double().abs())  # float32 rounding of w / delta and of Q
    assert torch.all((Q.double() - W.double()).abs() <= best + slack)


@pytest.mark.parametrize("bits", BITS)
def test_beta_shrinks_the_step(bits):
    W = random_weight(10 + bits)
    _, p1 = rtn(W, Grid(bits))
    for beta in (0.95, 0.9, 0.8, 0.5):
        _, pb = rtn(W, Grid(bits, beta=beta))
        torch.testing.assert_close(pb.scale, beta * p1.scale, rtol=1e-6, atol=0)
        torch.testing.assert_close(pb.zero, torch.round(-W.amin(dim=1, keepdim=True).clamp(max=0) / pb.scale))
    # beta < 1 clips the largest weight of a row: the top grid point lies below it
    Q, _ = rtn(W, Grid(bits, beta=0.8))
    top = W.amax(dim=1)
    assert torch.all(Q.amax(dim=1)[top > 0] < top[top > 0])


def test_symmetric_grid():
    W = torch.tensor([[-3.0, 1.0, 0.5, 2.0], [1.0, -0.5, 0.25, 4.0]])
    Q, p = rtn(W, Grid(4, sym=True))
    assert torch.all(p.zero == 8)
    torch.testing.assert_close(p.scale[:, 0], torch.tensor([6.0 / 15, 8.0 / 15]))
    assert_on_grid(Q, p)


def test_flat_rows_quantize_to_zero():
    W = torch.zeros(3, 8)
    Q, p = rtn(W, Grid(3))
    assert torch.equal(Q, W)
    assert torch.all(torch.isfinite(p.scale)) and torch.all(p.scale > 0)


def test_codes_and_dequantization_agree():
    W = random_weight(20)
    _, p = rtn(W, Grid(3, group_size=8))
    scale, zero = p.columns()
    codes = quantize_codes(W, scale, zero, p.maxq)
    assert codes.dtype == torch.int32 and codes.min() >= 0 and codes.max() <= 7
    torch.testing.assert_close(scale * (codes.float() - zero), quantize(W, scale, zero, p.maxq))


def test_per_group_grid_is_the_grid_of_each_reshaped_group():
    W = random_weight(21, n=48)
    Qg, pg = rtn(W, Grid(3, group_size=16))
    Qr, pr = rtn(W.reshape(-1, 16), Grid(3))
    assert torch.equal(Qg, Qr.reshape(W.shape))
    assert torch.equal(pg.scale.reshape(-1), pr.scale.reshape(-1))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), bits=st.sampled_from(BITS), groups=st.integers(1, 4),
       g=st.sampled_from([1, 4, 16]), sym=st.booleans(), beta=st.floats(0.5, 1.0))
def test_rtn_outputs_on_grid_property(seed, bits, groups, g, sym, beta):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(5, groups * g, generator=gen) * torch.randn(5, 1, generator=gen).exp()
    for group_size in (None, g):
        Q, p = rtn(W, Grid(bits, group_size, sym, beta))
        assert torch.all(torch.isfinite(Q))
        assert_on_grid(Q, p)


@pytest.mark.parametrize("kwargs,value", [
    (dict(bits=1), "1"), (dict(bits=5), "5"), (dict(bits=16), "16"),
    (dict(beta=0.0), "0.0"), (dict(beta=-0.5), "-0.5"), (dict(beta=1.5), "1.5"),
    (dict(group_size=0), "0"), (dict(group_size=-4), "-4"),
])
def test_bad_quantizer_settings_raise_value_error(kwargs, value):
    with pytest.raises(ValueError) as err:
        Grid(**kwargs)
    name = next(iter(kwargs))
    assert f"{name}={value}" in str(err.value)


def test_group_size_must_divide_in_features():
    with pytest.raises(ValueError) as err:
        rtn(torch.randn(4, 24), Grid(4, group_size=7))
    assert "7" in str(err.value) and "24" in str(err.value)


def test_default_beta():
    assert default_beta(2) == 0.8 and default_beta(3) == 0.9 and default_beta(4) == 1.0
    assert default_beta(2, 128) == 0.95 and default_beta(3, 128) == 0.95
    assert default_beta(2, 64) == 1.0 and default_beta(4, 128) == 1.0
