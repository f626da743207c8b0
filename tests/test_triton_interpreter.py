"""Every Triton kernel (CD sweep, fused prox step, FISTA with it) against its CPU reference, in Triton's
interpreter on the CPU (TRITON_INTERPRET=1): the cases and their shapes are in tests/triton_cases.py.

The cases run in one subprocess (TRITON_INTERPRET must be set before Triton is imported; this process may
already have imported it compiled), about 25 s of CPU; each test below checks one case's figures.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import triton_cases

pytest.importorskip("triton")

HERE = Path(__file__).parent
TIE_ULPS = 256  # as tests/test_cd_sweep.py
FLOAT32_ULPS = 16  # prox / FISTA: within a few float32 roundings of the magnitude of the weights


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(HERE / "triton_cases.py")], cwd=HERE, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {r["case"]: r for r in rows}


def case(results, name):
    r = results.get(name)
    assert r is not None, f"case {name} did not report"
    assert "error" not in r, r["error"]
    return r


@pytest.mark.parametrize("name", list(triton_cases.CD_CASES))
def test_triton_cd_sweep_equals_the_c_kernel_and_the_torch_loop(results, name):
    r = case(results, name)
    assert r["changed_by_cd"] > 0  # the sweep did something
    assert r["differing_vs_c"] == 0 and r["values_equal_c"] and r["scales_equal_c"]
    assert all(t["ulps"] <= TIE_ULPS for t in r["ties_vs_torch"]), r["ties_vs_torch"]
    assert r["differing_vs_torch"] <= r["entries"] * 1e-2


@pytest.mark.parametrize("name", list(triton_cases.PROX_CASES))
def test_triton_prox_step_equals_the_torch_step(results, name):
    r = case(results, name)
    bf16 = name.endswith("bf16")
    for step in r["steps"]:
        assert step["w_ulps"] <= FLOAT32_ULPS, step
        assert step["ref_ulps"] <= FLOAT32_ULPS, step  # and the exact (sort, float64) prox
        assert step["p_rel"] <= (2.0**-7 if bf16 else FLOAT32_ULPS * 2.0**-24), step  # bf16: one rounding step
    assert any(s["clipped"] for s in r["steps"] if s["t"] == 1e-3)


@pytest.mark.parametrize("name", list(triton_cases.FISTA_CASES))
def test_fista_with_the_triton_prox_equals_the_torch_prox(results, name):
    r = case(results, name)
    assert r["iters"] == triton_cases.FISTA_CASES[name][-1] and r["moved"] > 1e-4
    assert max(r["iterate_ulps"]) <= FLOAT32_ULPS, r["iterate_ulps"]
    assert r["objective_rel"] <= 1e-5 and r["objective_decreased"]


def test_every_case_ran(results):
    """Every case of tests/triton_cases.py reported (their seconds are printed by the subprocess, not asserted:
    speed is a benchmark's business, not a test's)."""
    assert set(results) == set(triton_cases.CASES)
