"""README's `dvc exp run -S ...` commands run as printed: every override applies to params.yaml with dvc's own
parser (the code `dvc exp run` and `dvc exp run --queue` run on -S; sweeps split as dvc splits them), and every
cell setting a user may sweep is a setting `magr quantize` accepts."""
from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from magr.core.methods import QuantConfig, setting_names

pytest.importorskip("dvc")
from dvc.utils.hydra import apply_overrides, get_hydra_sweeps  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def readme_overrides() -> list[str]:
    """The value of every -S in a `dvc exp run` line of README.md's code blocks."""
    out = []
    for line in (ROOT / "README.md").read_text().splitlines():
        line = line.split("#")[0] if not line.lstrip().startswith("#") else ""
        if "dvc exp run" not in line or "..." in line:
            continue
        words = shlex.split(line[line.index("dvc exp run"):])
        out += [words[i + 1] for i, w in enumerate(words) if w in ("-S", "--set-param")]
    return out


def apply(tmp_path, override: str) -> list[dict]:
    """params.yaml after each experiment of ``override`` (one per swept value), as dvc writes it."""
    results = []
    for sweep in get_hydra_sweeps({"params.yaml": [override]}):
        copy = tmp_path / "params.yaml"
        shutil.copy(ROOT / "params.yaml", copy)
        apply_overrides(copy, sweep["params.yaml"])  # dvc.exceptions.InvalidArgumentError if it cannot
        results.append(yaml.safe_load(copy.read_text()))
    return results


def test_readme_has_the_sweep_recipes():
    found = readme_overrides()
    assert any("alpha=" in o for o in found) and any("beta=" in o for o in found), found


@pytest.mark.parametrize("override", readme_overrides())
def test_readme_override_applies_to_params_yaml(override, tmp_path):
    key, _, values = override.lstrip("+~").partition("=")
    results = apply(tmp_path, override)
    assert len(results) == len(values.split(","))
    for params, value in zip(results, values.split(",")):
        node = params
        for part in key.split("."):
            node = node[part]
        assert node == yaml.safe_load(value)
        for cell in params["cells"].values():  # still a valid run for every cell
            QuantConfig.build(**{**params.get("quant", {}), **{k: v for k, v in cell.items() if k != "save"}})


@pytest.mark.parametrize("name", sorted(setting_names()))
def test_every_setting_sweeps_in_a_cell_and_in_quant(name, tmp_path):
    """`++` adds a key a cell lacks and replaces one it has: the form the README prints works for every setting."""
    cell = "w3-magr-optq"
    (params,) = apply(tmp_path, f"++cells.{cell}.{name}=7")
    assert params["cells"][cell][name] == 7
    (params,) = apply(tmp_path, f"++quant.{name}=7")
    assert params["quant"][name] == 7
    (params,) = apply(tmp_path, f"++cells.{cell}.bits=4")  # a key the cell has
    assert params["cells"][cell]["bits"] == 4
