"""Compiled OPTQ column loop (magr.core.optq_block) against the pure-torch loop: equal to the bit.

The kernel performs the torch loop's float32 operations in the same order, so every integer code, every
grid and every weight must be the same: the tests count differing codes and require none, on random
correlated layers and on every linear layer of stories260K, for 2/3/4 bits, per channel and per group (both
group grid conventions, groups starting inside blocks and crossing block ends), act-order, static groups,
symmetric grids and dead inputs.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch

from magr.core import optq_block
from magr.core.methods import QuantConfig
from magr.core.optq import OPTQ, column_function, columns_torch, damped_inverse_cholesky
from magr.core.optq_block import columns_cpu, compare_backends
from magr.core.quantizers import Grid, default_beta
from test_optq import correlated_inputs

CONFIGS = [  # (group_size, blocksize, OPTQ settings)
    (None, 128, {}), (None, 16, {"actorder": True}),
    (8, 128, {}), (8, 16, {"group_grid": "current"}),
    (12, 32, {}), (12, 32, {"group_grid": "current"}),  # groups start inside blocks and cross block ends
    (12, 20, {"group_grid": "current", "actorder": True}), (16, 24, {"static_groups": True}),
    (16, 24, {"static_groups": True, "actorder": True}), (48, 32, {"group_grid": "current"}),
]


def random_layer(seed: int, out: int = 40, n: int = 96, dead=()):
    X = correlated_inputs(seed, n, tokens=256, dead=dead)
    W = 0.05 * torch.randn(out, n, generator=torch.Generator().manual_seed(seed))
    W[::7, 5] = 0.5  # outliers
    return W, X.T @ X


def assert_equal(res: dict, where: str) -> None:
    assert res["differing_codes"] == 0, f"{where}: {res['differing_codes']} of {res['entries']} codes differ"
    assert res["same_grids"] and res["same_weights"], f"{where}: {res}"


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size,blocksize,settings", CONFIGS)
def test_compiled_equals_torch_loop_on_random_layers(bits, group_size, blocksize, settings):
    grid = Grid(bits, group_size, beta=default_beta(bits, group_size))
    for seed, dead in ((bits, ()), (10 + bits, (0, 9, 50, 95))):
        W, H = random_layer(seed, dead=dead)
        assert_equal(compare_backends(W, H, grid, OPTQ(blocksize=blocksize, **settings)), f"seed {seed}")


@pytest.mark.parametrize("sym", [False, True])
def test_symmetric_grids_flat_rows_and_two_threads(sym, monkeypatch):
    W, H = random_layer(3)
    W[4] = 0  # a flat row: the grid's range becomes [-1, 1]
    W[6, :48] = 0  # flat groups
    for group_size, settings in ((None, {}), (12, {"group_grid": "current"}), (12, {})):
        grid = Grid(3, group_size, sym=sym, beta=0.85)
        assert_equal(compare_backends(W, H, grid, OPTQ(blocksize=32, **settings)), f"one thread {group_size}")
        monkeypatch.setattr(optq_block, "MIN_CHUNK", 8)  # several row chunks, run in two threads
        previous = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            assert_equal(compare_backends(W, H, grid, OPTQ(blocksize=32, **settings)), f"two threads {group_size}")
        finally:
            torch.set_num_threads(previous)


def test_one_block_segment_updates_every_array_to_the_bit():
    """columns_cpu and columns_torch on the same block, starting mid-block: W1, Err1 and Q1 equal."""
    out, bs, n = 24, 32, 64
    W, H = random_layer(5, out, n)
    U = damped_inverse_cholesky(H, 0.01).contiguous()
    scale, zero = torch.rand(out, 4) * 0.02 + 0.01, torch.randint(0, 8, (out, 4)).float()
    group_of = torch.arange(bs) // 8
    runs = []
    for columns in (columns_torch, columns_cpu):
        W1, Err1, Q = W[:, 16:48].clone(), torch.zeros(out, bs), torch.zeros(out, n)
        columns(W1, Err1, U[16:48, 16:48], Q[:, 16:48], scale, zero, group_of, 5, 29, 7)
        runs.append((W1, Err1, Q))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    assert torch.count_nonzero(runs[0][2]) > 0 and torch.all(runs[0][2][:, :21] == 0)


STORIES_CONFIGS = [  # (group_size, OPTQ settings): stories260K's inputs are 64 or 172 wide
    (None, {}), (None, {"actorder": True}), (4, {}), (4, {"group_grid": "current"}),
    (4, {"group_grid": "current", "blocksize": 6}), (4, {"blocksize": 6}), (4, {"static_groups": True}),
    (4, {"static_groups": True, "actorder": True}), (4, {"actorder": True, "group_grid": "current"}),
]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_compiled_equals_torch_loop_on_every_stories260k_layer(stories_layers, bits):
    differing = 0
    for group_size, settings in STORIES_CONFIGS:
        grid = Grid(bits, group_size, beta=default_beta(bits, group_size))
        for i, (W, H) in enumerate(stories_layers):
            res = compare_backends(W, H, grid, OPTQ(**settings))
            differing += res["differing_codes"]
            assert res["same_grids"] and res["same_weights"], f"layer {i}, g{group_size} {settings}: {res}"
    assert differing == 0, f"{differing} codes differ"


def test_the_comparison_can_fail(monkeypatch):
    """A kernel that rounds one code to its neighbour is caught (codes, weights)."""
    W, H = random_layer(7)
    grid = Grid(3, None, beta=0.9)

    def wrong(W1, Err1, U1, Q1, scale, zero, group_of, c0, c1, maxq, threads=None):
        columns_cpu(W1, Err1, U1, Q1, scale, zero, group_of, c0, c1, maxq, threads)
        if c0 == 0:
            step = scale[3, group_of[0]]
            Q1[3, 0] += step if Q1[3, 0] + step <= scale[3, 0] * (maxq - zero[3, 0]) else -step

    monkeypatch.setattr(optq_block, "columns_cpu", wrong)
    res = compare_backends(W, H, grid, OPTQ())
    assert res["differing_codes"] >= 1 and not res["same_weights"]


def test_fallback_without_a_compiler(no_compiler, caplog):
    with pytest.raises(RuntimeError, match="optq_backend='compiled' cannot run on cpu: .*no-such-cc"):
        column_function("compiled", torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="magr.core.optq"):
        assert column_function("auto", torch.device("cpu")) is columns_torch
    assert "compiled OPTQ column loop unavailable" in caplog.text and "using the pure-torch loop" in caplog.text
    W, H = random_layer(2, out=8, n=16)
    Q, _ = OPTQ()(W, H, Grid(2))  # runs, on the torch loop
    assert torch.equal(Q, OPTQ(backend="torch")(W, H, Grid(2))[0])


def test_kernels_build_into_a_fresh_cache_and_a_shared_header_change_rebuilds(monkeypatch, tmp_path):
    import shutil

    from magr.core import cbuild

    csrc = tmp_path / "csrc"
    shutil.copytree(cbuild.CSRC, csrc)
    monkeypatch.setattr(cbuild, "CSRC", csrc)
    monkeypatch.setenv("MAGR_CACHE_DIR", str(tmp_path / "cache"))
    first = [cbuild.build(csrc / name) for name in ("optq_block.c", "cd_sweep.c")]
    assert [p.name.split("-")[0] for p in first] == ["optq_block", "cd_sweep"] and all(p.exists() for p in first)
    assert [cbuild.build(csrc / name) for name in ("optq_block.c", "cd_sweep.c")] == first  # reused
    with open(csrc / "grid.h", "a") as f:
        f.write("/* changed */\n")
    again = [cbuild.build(csrc / name) for name in ("optq_block.c", "cd_sweep.c")]
    assert all(a != b and b.exists() for a, b in zip(first, again))


def test_backend_choice_per_device():
    assert column_function("torch", torch.device("cpu")) is columns_torch
    assert column_function("auto", torch.device("cpu")) is columns_cpu
    assert column_function("auto", torch.device("cuda")) is columns_torch  # no compiled loop there: no warning
    with pytest.raises(RuntimeError, match="optq_backend='compiled' cannot run on cuda"):
        column_function("compiled", torch.device("cuda"))


def test_kernel_checks_its_arguments():
    W1, Err1, U = torch.zeros(4, 8), torch.zeros(4, 8), torch.eye(8)
    scale, zero, group_of = torch.ones(4, 1), torch.zeros(4, 1), torch.zeros(8, dtype=torch.long)
    with pytest.raises(ValueError, match="U1 must be a float32 CPU view"):
        columns_cpu(W1, Err1, U.T[:, :8].double(), torch.zeros(4, 8), scale, zero, group_of, 0, 8, 3)
    with pytest.raises(ValueError, match="columns 2..9 do not lie in a block of 8"):
        columns_cpu(W1, Err1, U, torch.zeros(4, 8), scale, zero, group_of, 2, 9, 3)
    with pytest.raises(ValueError, match="W1 must be a contiguous CPU"):
        columns_cpu(torch.zeros(8, 4).T, Err1, U, torch.zeros(4, 8), scale, zero, group_of, 0, 8, 3)


def test_optq_backend_setting():
    with pytest.raises(ValueError, match="optq_backend='fortran' is not allowed; allowed: auto, compiled, torch"):
        OPTQ(backend="fortran")
    cfg = QuantConfig.build(method="magr+optq", bits=3, optq_backend="torch", cd_backend="compiled")
    assert (cfg.quantizer.backend, cfg.refine.backend) == ("torch", "compiled")
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    assert QuantConfig.build(method="optq").quantizer == replace(OPTQ(), backend="auto")
    from magr.cli import build_parser

    args = build_parser().parse_args(["quantize", "--model", "m", "--out", "o", "--optq-backend", "torch"])
    assert args.optq_backend == "torch"


def test_benchmark_script_runs(capsys, monkeypatch):
    """benchmarks/bench_optq.py end to end on a tiny layer: both timings printed, no differing code."""
    from conftest import load_benchmark

    load_benchmark("bench_optq", monkeypatch).main(["--shapes", "tiny", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "column loop: torch" in out and "compiled" in out and "differing codes 0, same grids True" in out
