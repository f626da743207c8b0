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


def _script(name: str):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kept_profile_reports_are_the_outputs_dvc_lock_names(tmp_path):
    """keep_profile_reports copies what the profile's stages wrote under reports/ (from dvc.lock) and the wall
    time, not the default's files left in reports/; an output dvc.lock names but the tree lacks is an error."""
    keep = _script("keep_profile_reports")
    lock = {"schema": "2.0", "stages": {
        "quantize@w3-rtn": {"cmd": "magr quantize", "outs": [{"path": "runs/cells/w3-rtn"}]},
        "alpha@gemma3-270m": {"cmd": "papermill", "outs": [{"path": "reports/notebooks/alpha_sweep_gemma3-270m.ipynb"},
                                                          {"path": "reports/alpha/gemma3-270m"}]},
        "report": {"cmd": "python scripts/build_report.py", "outs": [{"path": "reports/REPORT.md"}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    for rel in ("reports/notebooks/alpha_sweep_gemma3-270m.ipynb", "reports/alpha/gemma3-270m/alpha_sweep.csv",
                "reports/REPORT.md", "reports/pipeline_wall_time.md", "reports/alpha/smollm2-135m/alpha_sweep.csv"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    assert keep.report_outputs(tmp_path) == ["reports/REPORT.md", "reports/alpha/gemma3-270m",
                                             "reports/notebooks/alpha_sweep_gemma3-270m.ipynb",
                                             "reports/pipeline_wall_time.md"]
    (tmp_path / "reports/REPORT.md").unlink()
    with pytest.raises(FileNotFoundError, match="reports/REPORT.md"):
        keep.report_outputs(tmp_path)


def test_kept_profile_report_is_rebuilt_from_the_profile_outputs_alone(tmp_path):
    """The kept REPORT.md and metrics.json come from the copied outputs only: a file of the default left in the
    clone's reports/ (its Table 2 csv: values; its forward-dtype note: a section) is in neither, the profile's
    Table 2 is in both, and the README names the clone's commit."""
    import json
    import shutil
    import subprocess

    from magr.reproduction.reported import report_values

    keep = _script("keep_profile_reports")
    clone, dest = tmp_path / "clone", tmp_path / "kept"
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["profile"] = "p"
    (clone / "profiles").mkdir(parents=True)
    for name in ("params.yaml", "profiles/p.yaml"):
        (clone / name).write_text(yaml.safe_dump(params))
    lock = {"stages": {"tables": {"cmd": "x", "outs": [{"path": "reports/table2_perplexity.md"},
                                                       {"path": "reports/table2_perplexity.csv"}]}}}
    (clone / "dvc.lock").write_text(yaml.safe_dump(lock))
    (clone / "reports/alpha_perplexity").mkdir(parents=True)
    for rel in ("table2_perplexity.md", "table2_perplexity.csv", "forward_dtype.md"):
        shutil.copy(ROOT / "reports" / rel, clone / "reports" / rel)
    left = next((ROOT / "reports/alpha_perplexity").glob("*/alpha_perplexity.csv"))  # the default's, left behind
    (clone / "reports/alpha_perplexity" / left.parent.name).mkdir()
    shutil.copy(left, clone / "reports/alpha_perplexity" / left.parent.name / left.name)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(clone)]
    subprocess.run(["git", "init", "-q", str(clone)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "profile"], check=True)
    (clone / "reports/table2_perplexity.md").write_text("# Table 2\n\nan output, changed by the run\n")
    assert keep.main(["--root", str(clone), "--dest", str(dest), "--threads", "1"]) == 0
    kept = dest / "p"
    metrics = json.loads((kept / "metrics.json").read_text())
    assert metrics and set(metrics) == set(report_values(kept))
    assert not any(k.startswith("alpha ppl") for k in metrics), "the default's leftover values were kept"
    assert set(metrics) <= set(json.loads((ROOT / "reports/metrics.json").read_text()))
    report = (kept / "REPORT.md").read_text()
    assert "## Table 2: perplexity" in report and "Forward dtype" not in report
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert f"- commit: {head}\n" in (kept / "README.md").read_text(), "a changed output is not a changed commit"
    (clone / "profiles/q.yaml").write_text("")
    subprocess.run([*git, "add", "profiles/q.yaml"], check=True)
    keep.main(["--root", str(clone), "--dest", str(dest), "--threads", "1"])
    assert f"- commit: {head} (with uncommitted changes)\n" in (kept / "README.md").read_text()


def test_check_reproduction_refuses_a_profile_params_yaml_does_not_run():
    check = _script("check_reproduction")
    running = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())["profile"]
    assert check.metrics_path(None) == "reports/metrics.json"
    assert check.metrics_path(running) == f"reports/profiles/{running}/metrics.json"
    other = next(p.stem for p in PROFILES[1:] if p.stem != running)  # PROFILES[0] is params.yaml
    with pytest.raises(SystemExit, match=f"params.yaml is profile '{running}'"):
        check.metrics_path(other)


def test_report_shows_each_kept_profile_with_its_best_alpha(tmp_path):
    """A profile folder under reports/profiles (its Table 2 csv with MagR cells at several alphas): the report's
    profiles part names it, its README lines, the best alpha per set, bits and method, and its Table 2."""
    import pandas as pd

    report = _script("build_report")
    root = Path(__file__).resolve().parents[1]
    table2 = pd.read_csv(root / "reports/table2_perplexity.csv")
    w3 = table2[(table2["setting"] == "W3") & (table2["method"] == "MagR+OPTQ")].iloc[0].to_dict()
    better = {**w3, "method": "MagR+OPTQ alpha=0.01", "alpha": 0.01}
    for s in ("wikitext2", "c4"):  # lower than the paper's alpha's interval on both sets: no overlap
        scale = w3[f"{s} low"] / w3[s] / 2
        better.update({k: w3[k] * scale for k in (s, f"{s} min", f"{s} max", f"{s} low", f"{s} high")})
    folder = tmp_path / "reports/profiles/demo"
    folder.mkdir(parents=True)
    pd.concat([table2, pd.DataFrame([better])]).to_csv(folder / "table2_perplexity.csv", index=False)
    (folder / "table2_perplexity.md").write_text("## Table 2\n\n| a |\n|---|\n| 1 |\n")
    (folder / "README.md").write_text("# Profile `demo`\n\n- command: `make repro`\n- commit: abc\n\nother text\n")
    parts = "\n".join(report.profiles_section(tmp_path / "reports"))
    assert "#### Profile demo" in parts and "- commit: abc" in parts and "other text" not in parts
    rows = [ln for ln in parts.splitlines() if ln.startswith("| wikitext2 | 3 | MagR+OPTQ |")]
    plain = table2[(table2["setting"] == "W3") & (table2["method"] == "OPTQ")]["wikitext2"].iloc[0]
    assert len(rows) == 1 and "| 0.01 |" in rows[0] and rows[0].rstrip(" |").endswith(f"False | {plain:.4g} | 0.01 lower")
    assert report.profiles_section(tmp_path / "none") == []
