"""Every profile (params.yaml and profiles/*.yaml) builds valid configs before any work: its cells are valid
QuantConfig settings, its calibration and evaluation valid dataclasses, the zero-shot seed is the first seed."""
from __future__ import annotations

import re
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
    if params["alpha_sweep"].get("models") or params["alpha_perplexity"].get("models"):
        # the alpha@ / alpha_perplexity@ stages pass quant's MagR settings to the notebooks (dvc.yaml): set once
        missing = {"solver", "iters", "precision", "feature_source"} - set(params["quant"])
        assert not missing, f"quant must set {sorted(missing)}: the alpha stages read them"
    assert not {"solver", "iters", "precision", "feature_source"} & set(params["alpha_sweep"]), \
        "MagR settings live in quant only"


def _lookup(params: dict, dotted: str):
    node = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def _missing(template, scope: dict) -> list[str]:
    refs = re.findall(r"\$\{([^}]+)\}", yaml.safe_dump(template))
    out = []
    for ref in refs:
        try:
            _lookup(scope, ref)
        except KeyError:
            out.append(ref)
    return out


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_profile_has_every_key_dvc_yaml_reads(path):
    """Every ${...} of dvc.yaml resolves in the profile (DVC refuses the whole pipeline otherwise), for the plain
    stages and for the foreach stages that have items in this profile (their ${item.*} against every item)."""
    params = yaml.safe_load(path.read_text())
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    missing = []
    for name, stage in stages.items():
        if "foreach" not in stage:
            missing += [f"{name}: {ref}" for ref in _missing(stage, params)]
            continue
        items = _lookup(params, stage["foreach"][2:-1])
        for key, item in (items.items() if isinstance(items, dict) else enumerate(items)):
            missing += [f"{name}@{key}: {ref}" for ref in _missing(stage["do"], {**params, "item": item, "key": key})]
    assert not missing, f"{path.name} lacks keys that dvc.yaml reads: {missing}"
