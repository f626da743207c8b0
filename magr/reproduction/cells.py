"""Pipeline cells: one method at one setting, quantized once per calibration seed.

A cell folder holds one run folder per seed, ``seed-<s>/`` (:func:`magr.runs.quantize_cell`), or is itself a run
folder. A cell's perplexity on a set is reported as the mean over its seeds with the seed range [min, max]
and the rerun interval (:func:`rerun_interval`, what the reproduction check uses); a method that reads no
calibration data (RTN) has one run, exact for every seed. Orderings between methods are checked seed by seed
(runs with the same seed share their calibration windows) and stated only when they hold in every seed and a
rerun's paired mean log ratio stays above 0 (:func:`ordering`).
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..pipeline.persistence import RUN_FILE, read_run


# Student t quantiles t_{0.975, df}, df = 1..30 (beyond: the normal 1.96)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    return T975[df - 1] if df <= len(T975) else 1.96


def rerun_half_width(logs: Sequence[float]) -> float:
    """Half-width of the 95 % prediction interval of a rerun's mean of n values on the log scale:
    t_{0.975, n-1} s sqrt(2 / n) (s: the sample standard deviation of the n values; the rerun's n values are
    new draws: other float-sum orders perturb a cell as much as other calibration windows do)."""
    n = len(logs)
    return t975(n - 1) * float(np.std(logs, ddof=1)) * math.sqrt(2 / n) if n > 1 else 0.0


def rerun_interval(values: Sequence[float]) -> tuple[float, float]:
    """[low, high] where a rerun's mean perplexity over the same number of seeds lies with 95 % probability:
    exp(mean log ppl +- :func:`rerun_half_width`), centred on the geometric mean (perplexity is exp of a mean
    log-likelihood, so its seed-to-seed changes are relative)."""
    logs = np.log(np.asarray(values, dtype=float))
    h = rerun_half_width(logs)
    return float(np.exp(logs.mean() - h)), float(np.exp(logs.mean() + h))


def spread(values: Sequence[float]) -> dict:
    """{"ppl": mean, "min", "max", "low", "high" (:func:`rerun_interval`), "values"} over a cell's seeds."""
    v = [float(x) for x in values]
    low, high = rerun_interval(v)
    return {"ppl": float(np.mean(v)), "min": min(v), "max": max(v), "low": low, "high": high, "values": v}


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


def _pairs(better: Mapping, worse: Mapping, eval_set: str) -> list[tuple[float, float]]:
    """(better's, worse's) perplexity per common calibration seed (a calibration-free cell's one value pairs with
    every seed of the other)."""
    b, w = per_seed(better, eval_set), per_seed(worse, eval_set)
    seeds = sorted(set(b) & set(w)) if None not in b and None not in w else list(b if None in w else w)
    return [(b.get(s, b.get(None)), w.get(s, w.get(None))) for s in seeds]


def ordering(pairs: Sequence[tuple[float, float]]) -> dict:
    """For (better, worse) perplexities paired by seed: the seeds where better is lower, the mean log ratio
    log(worse / better) and its rerun lower bound (mean - :func:`rerun_half_width`), and "stated": it holds in
    every seed and the lower bound is above 0 (a rerun with other float-sum orders keeps it with 95 %
    probability)."""
    k, d = sum(x < y for x, y in pairs), [math.log(y / x) for x, y in pairs]
    mean = float(np.mean(d))
    lower = mean - rerun_half_width(d)
    stated = k == len(pairs) and lower > 0
    return {"seeds where it holds": f"{k} of {len(pairs)}", "holds in every seed": k == len(pairs),
            "mean log ratio": mean, "rerun lower bound": lower, "stated": stated,
            "why not stated": "" if stated else why_not_stated(k, len(pairs), mean, lower)}


def why_not_stated(k: int, n: int, mean: float, lower: float) -> str:
    """The numbers that keep an ordering out of the report: reversed on average, not in every seed, or a mean
    difference smaller than a rerun's spread (``mean``: mean log(worse / better); ``lower``: its rerun bound)."""
    pct = 100 * math.expm1(mean)
    if mean <= 0:
        return f"reversed on average: the second is {-100 * math.expm1(mean):.1f} % lower (holds in {k} of {n} seeds)"
    if k < n:
        return f"holds in {k} of {n} seeds only (on average the second is {pct:.1f} % higher)"
    return (f"holds in every seed (on average the second is {pct:.1f} % higher), but within a rerun's spread "
            f"(rerun lower bound {lower:.3f} <= 0)")


def ordering_table(cells: Sequence[Mapping], pairs: Sequence[tuple[str, str]], settings: Sequence[str],
                   eval_sets: Sequence[str], label_of) -> pd.DataFrame:
    """:func:`ordering` for each setting, set and pair of methods (better first, e.g. MagR+OPTQ, OPTQ), runs
    paired by calibration seed. ``label_of(cell)`` gives (setting, method)."""
    by_key = {label_of(c): c for c in cells}
    return pd.DataFrame([{"setting": setting, "ordering": f"{a} < {b}", "set": s,
                          **ordering(_pairs(by_key[(setting, a)], by_key[(setting, b)], s))}
                         for setting in settings for a, b in pairs
                         if (setting, a) in by_key and (setting, b) in by_key for s in eval_sets])
