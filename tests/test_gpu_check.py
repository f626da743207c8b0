"""scripts/gpu_check.py's CPU part end to end (small settings): CUDA-only rows say "no CUDA", the Triton CD
sweep (in the interpreter) gives the C kernel's codes, the block rows and the stories260K cell run, and the
script imports nothing the device's Python lacks."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def run(*args, env=None):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_gpu_check_runs_its_cpu_part(tmp_path):
    pytest.importorskip("triton")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself without CUDA
    prep = run("--prepare-assets", str(tmp_path / "assets"), env=env)
    assert prep.returncode == 0, prep.stderr[-3000:]
    assert (tmp_path / "assets" / "stories260K" / "model.safetensors").is_file()
    out = run("--cd-layers", "q/k/v/o", "--cd-passes", "3", "--ref-iters", "20", "--eval-tokens", "1024",
              "--stories", str(tmp_path / "assets" / "stories260K"),
              "--tokens", str(tmp_path / "assets" / "tinystories_tokens.pt"), "--commit", "test",
              "--out", str(tmp_path / "gpu_check.md"), env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in report.splitlines() if line.startswith("| ")}
    assert "no CUDA" in rows["export"] and "no CUDA" in rows["cd per block"]
    for grid in ("per channel", "g32"):
        row = rows[f"cd q/k/v/o W2 {grid}"]
        assert "Triton (interpreter)" in row and " 0 of " in row and row.endswith("| ok |"), row
    for name in ("magr", "optq", "dagger", "e2e"):
        assert rows[name].endswith("| ok |"), rows[name]
    assert "commit test" in report and "torch" in report
    assert "modules the device lacks that were imported: none" in out.stdout
