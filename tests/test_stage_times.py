"""scripts/stage_times.py: a stage's seconds from its outputs' times; none for a stage this dvc repro did not run."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import yaml


def _stage_times():
    path = Path(__file__).resolve().parents[1] / "scripts" / "stage_times.py"
    spec = importlib.util.spec_from_file_location("stage_times", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stages_of_an_earlier_run_get_no_seconds(tmp_path):
    """A resumed pipeline: 'prepare' ended an hour before this 100 s `dvc repro`, which ran 'a' then 'b'."""
    stages = {name: {"cmd": "x", "outs": [{"path": name}]} for name in ("prepare", "a", "b")}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"stages": stages}))
    t = 1_000_000.0
    for name, end in (("prepare", t - 3600), ("a", t - 40), ("b", t)):
        (tmp_path / name).write_text("x")
        os.utime(tmp_path / name, (end, end))
    got = dict(_stage_times().stage_seconds(tmp_path / "dvc.lock", dvc_seconds=100))
    assert got == {"prepare": None, "a": 60.0, "b": 40.0}
