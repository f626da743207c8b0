"""Pipeline cells: one method at one setting, quantized once per calibration seed.

A cell folder holds one run folder per seed, ``seed-<s>/`` (:func:`magr.runs.quantize_cell`), or is itself a run
folder. A cell's perplexity on a set is reported as the mean over its seeds with the seed range
[min, max] as its uncertainty; a method that reads no calibration data (RTN) has one run, exact for every
seed. Orderings between methods are checked seed by seed: runs with the same seed share their calibration
windows, so "A < B" holds for a cell pair when it holds for every common seed.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .persistence import RUN_FILE, read_run


def spread(values: Sequence[float]) -> dict:
    """{"ppl": mean, "min", "max", "values"} of one cell's values over its seeds."""
    v = [float(x) for x in values]
    return {"ppl": float(np.mean(v)), "min": min(v), "max": max(v), "values": v}


def _seed_dirs(folder: Path) -> list[Path]:
    dirs = [p.parent for p in folder.glob(f"seed-*/{RUN_FILE}")]
    return sorted(dirs, key=lambda d: int(re.sub(r"\D", "", d.name) or 0))


def load_cell(folder) -> dict:
    """The first seed's run metadata plus "runs" (every seed's), "seeds", and "ppl" as {set: :func:`spread`}."""
    folder = Path(folder)
    dirs = _seed_dirs(folder) or ([folder] if (folder / RUN_FILE).is_file() else [])
    if not dirs:
        raise FileNotFoundError(f"no {RUN_FILE} in {folder} or its seed-*/ folders: run its quantize stage "
                                "(dvc repro, or magr quantize --out {folder}) first")
    runs = [read_run(d) for d in dirs]
    cell = {**runs[0], "name": folder.name, "runs": runs, "seeds": [r["calibration"]["seed"] for r in runs]}
    if all("ppl" in r for r in runs):
        cell["ppl"] = {s: spread([r["ppl"][s]["ppl"] for r in runs]) for s in runs[0]["ppl"]}
    return cell


def load_cells(results_dir, names: Sequence[str] | None = None) -> list[dict]:
    """Every cell folder under ``results_dir``, or the named ones in that order."""
    root = Path(results_dir)
    if names is None:
        names = sorted({p.relative_to(root).parts[0] for p in root.glob(f"**/{RUN_FILE}")})
    return [load_cell(root / n) for n in names]


def per_seed(cell: Mapping, eval_set: str) -> dict[int, float]:
    """seed -> perplexity on ``eval_set``; a calibration-independent cell's one value stands for every seed."""
    values = {r["calibration"]["seed"]: r["ppl"][eval_set]["ppl"] for r in cell["runs"]}
    return values if cell["config"].get("uses_calibration", True) else {None: next(iter(values.values()))}


def holds(better: Mapping, worse: Mapping, eval_set: str) -> tuple[int, int]:
    """(seeds where ``better`` has the lower perplexity, seeds compared), pairing runs by calibration seed."""
    b, w = per_seed(better, eval_set), per_seed(worse, eval_set)
    seeds = sorted(set(b) & set(w)) if None not in b and None not in w else list(b if None in w else w)
    pairs = [(b.get(s, b.get(None)), w.get(s, w.get(None))) for s in seeds]
    return sum(x < y for x, y in pairs), len(pairs)


def ordering_table(cells: Sequence[Mapping], chains: Sequence[Sequence[str]], settings: Sequence[str],
                   eval_sets: Sequence[str], label_of) -> pd.DataFrame:
    """For each setting, set and chain of methods (best first, e.g. MagR+OPTQ, OPTQ, RTN), how many seeds show
    every adjacent pair in that order; ``label_of(cell)`` gives (setting, method)."""
    by_key = {label_of(c): c for c in cells}
    rows = []
    for setting in settings:
        for chain in chains:
            if not all((setting, m) in by_key for m in chain):
                continue
            for s in eval_sets:
                counts = [holds(by_key[(setting, a)], by_key[(setting, b)], s) for a, b in zip(chain, chain[1:])]
                rows.append({"setting": setting, "ordering": " < ".join(chain), "set": s,
                             "seeds where it holds": " / ".join(f"{k} of {n}" for k, n in counts),
                             "holds in every seed": all(k == n for k, n in counts)})
    return pd.DataFrame(rows)
