"""Every profile (params.yaml and profiles/*.yaml) builds valid configs before any work: its cells are valid
QuantConfig settings, its calibration and evaluation valid dataclasses, the zero-shot seed is the first seed."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from magr.pipeline.calibration_data import Calibration
from magr.evaluation.perplexity import Evaluation
from magr.core.methods import QuantConfig

ROOT = Path(__file__).resolve().parents[1]
PROFILES = [ROOT / "params.yaml", *sorted((ROOT / "profiles").glob("*.yaml"))]


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_profile_builds(path):
    params = yaml.safe_load(path.read_text())
    cal = Calibration(**params["calibration"])
    Evaluation(**params["evaluation"])
    seeds = params["spread"]["seeds"]
    assert seeds and seeds[0] == cal.seed, "calibration.seed must be the first of spread.seeds (zero-shot models)"
    for cell in params["cells"].values():
        settings = {**params.get("quant", {}), **{k: v for k, v in cell.items() if k != "save"}}
        QuantConfig.build(**settings)
    assert set(params["zeroshot"]["cells"]) <= {n for n, c in params["cells"].items() if c.get("save")}
