"""dvc.yaml cannot go stale: every stage that runs library code depends on the whole `magr` package.

A stage runs library code when its command calls the `magr` CLI, or runs a notebook or a script that
imports magr. Such a stage must list the package folder `magr` among its dependencies, so that editing any
module (magr/core/projection.py, say) makes `dvc status` report the stage and `dvc repro` rerun it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports_magr(path: Path) -> bool:
    text = path.read_text()
    if path.suffix == ".ipynb":
        text = "\n".join("".join(c["source"]) for c in json.loads(text)["cells"] if c["cell_type"] == "code")
    return re.search(r"^\s*(from magr\b|import magr\b)", text, re.M) is not None


def _runs_library_code(cmd: str) -> bool:
    if re.search(r"(^|&&|;)\s*magr\s", cmd):
        return True
    files = [ROOT / f for f in re.findall(r"(\S+\.(?:ipynb|py))\b", cmd)]
    return any(f.is_file() and _imports_magr(f) for f in files)


@pytest.fixture(scope="module")
def stages():
    dvc = pytest.importorskip("dvc.repo")
    repo = dvc.Repo(str(ROOT))
    try:
        return [(s.addressing, s.cmd, {Path(d.def_path).as_posix() for d in s.deps}) for s in repo.index.stages]
    finally:
        repo.close()


def test_every_stage_running_library_code_depends_on_the_package(stages):
    checked = [name for name, cmd, _ in stages if _runs_library_code(cmd)]
    assert len(checked) >= 8  # prepare, float, quantize@..., zero-shot, notebooks, report
    missing = [name for name, cmd, deps in stages if _runs_library_code(cmd) and "magr" not in deps]
    assert not missing, f"stages running magr code without the dependency `magr`: {missing}"


def test_the_analysis_and_quantize_stages_are_among_them(stages):
    names = {name for name, cmd, deps in stages if "magr" in deps}
    assert {"fig1", "table1", "report"} <= names
    assert any(n.startswith("quantize@") for n in names)
    assert all("magr" in deps for name, _, deps in stages if name.startswith("quantize@"))


def test_the_detector_sees_library_code():
    assert _runs_library_code("mkdir -p x && magr ppl --model m")
    assert _runs_library_code("papermill --log-level WARNING notebooks/fig1_weight_magnitudes.ipynb out.ipynb")
    assert _runs_library_code("python scripts/build_report.py --params params.yaml")
    assert not _runs_library_code("echo magr-free")


def test_the_report_stage_depends_on_every_table_the_report_reads(stages):
    """scripts/build_report.py's sections name the Markdown tables it pastes; each must be a dependency of the
    report stage, or a new or edited table would leave REPORT.md stale."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_report", ROOT / "scripts" / "build_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    read = {f"reports/{md}" for _, md, _, _ in module.SECTIONS + module.EXTRA_SECTIONS}
    deps = next(deps for name, _, deps in stages if name == "report")
    assert read - deps == set(), f"report stage misses {sorted(read - deps)}"


def test_the_report_stage_depends_on_the_alpha_sweep_folders(stages):
    """The section "alpha and scale" reads reports/alpha/<model>/, the outputs of the alpha@<model> stages."""
    deps = next(deps for name, _, deps in stages if name == "report")
    assert "reports/alpha" in deps
    alpha = [name for name, _, deps in stages if name.startswith("alpha@")]
    assert alpha and all("magr" in deps for name, _, deps in stages if name in alpha)
