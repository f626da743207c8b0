"""The alpha ablation end to end (issue 22): perplexity of MagR+RTN and MagR+OPTQ over a few alphas, per bits,
over calibration seeds with their rerun intervals (Table 2's protocol, :mod:`magr.reproduction.cells`), beside the
plain RTN and OPTQ cells of the same bits.

A cell here is a Table 2 cell with one more setting, ``alpha`` (relative to lambda_max(H), paper eq. (3)); its
name says it: ``w3-magr-optq-a0.001``. The runs are :func:`magr.runs.quantize_cell`'s, so every cell's folder holds
one run folder per seed with its ``magr_run.json``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

from ..core.methods import PRESETS
from .alpha_sweep import paper_alpha, parse_alphas, parse_bits

METHODS = ("magr+rtn", "magr+optq")
"""The MagR methods swept; each has its plain counterpart (``rtn``, ``optq``) as the reference cell."""


def alpha_cells(bits, alphas, methods: Sequence[str] = METHODS, group_size: int | None = None) -> dict[str, dict]:
    """Cell name -> QuantConfig settings: every MagR method at every bits and alpha, and the plain method of each
    (alpha does not apply) once per bits."""
    bits, alphas = parse_bits(bits), parse_alphas(alphas)
    bad = [m for m in methods if m not in METHODS]
    if bad or 0 in alphas:
        raise ValueError(f"methods {list(methods)} / alphas {alphas}: allowed methods {METHODS}, alphas > 0 (alpha = 0 "
                         "is the plain method, which is always there)")
    cells = {}
    for b in bits:
        for m in methods:
            plain = m.removeprefix("magr+")
            cells[f"w{b}-{plain}"] = {"method": plain, "bits": b, "group_size": group_size}
            cells.update({f"w{b}-{m.replace('+', '-')}-a{a:g}": {"method": m, "bits": b, "group_size": group_size,
                                                                  "alpha": a} for a in alphas})
    return cells


def alpha_table(cells: Sequence[Mapping], eval_sets: Sequence[str]) -> pd.DataFrame:
    """One row per cell and set: method, bits, alpha (None for the plain methods), the mean perplexity over the
    seeds, its seed range and rerun interval (:func:`magr.reproduction.cells.spread`), and the seeds."""
    rows = []
    for cell in cells:
        cfg = cell["config"]
        pre = cfg.get("preprocess") or {}
        for s in eval_sets:
            p = cell["ppl"][s]
            rows.append({"set": s, "bits": cfg["grid"]["bits"], "method": cfg["label"], "alpha": pre.get("alpha"),
                         "ppl": p["ppl"], "min": p["min"], "max": p["max"], "rerun low": p["low"],
                         "rerun high": p["high"], "seeds": len(cell["runs"]) if cfg["uses_calibration"] else 0})
    order = {label: i for i, label in enumerate(m.label for m in PRESETS.values())}
    df = pd.DataFrame(rows).assign(m=lambda d: d["method"].map(order), a=lambda d: d["alpha"].fillna(0))
    df = df.sort_values(["set", "bits", "m", "a"], ascending=[True, False, True, True], kind="stable")
    return df.drop(columns=["m", "a"]).reset_index(drop=True)


def _per_magr_method(table: pd.DataFrame):
    """(set, bits, method), its rows over alpha and its row at the paper's alpha (maybe empty), per MagR method of
    :func:`alpha_table`, in the table's order."""
    for key, part in table[table["alpha"].notna()].groupby(["set", "bits", "method"], sort=False):
        yield key, part, part[part["alpha"] == paper_alpha(None)]


def best_alphas(table: pd.DataFrame) -> pd.DataFrame:
    """Per set, bits and MagR method: the alpha with the lowest mean perplexity, whether its rerun interval
    overlaps the paper's alpha's (then the data do not tell them apart), and the plain method's perplexity."""
    rows = []
    for (s, b, method), part, paper in _per_magr_method(table):
        best = part.loc[part["ppl"].idxmin()]
        plain = table[(table["set"] == s) & (table["bits"] == b) & (table["method"] == method.removeprefix("MagR+"))]
        overlap = (not paper.empty and best["rerun low"] <= paper["rerun high"].iloc[0]
                   and paper["rerun low"].iloc[0] <= best["rerun high"])
        rows.append({"set": s, "bits": b, "method": method, "best alpha": best["alpha"], "ppl at best": best["ppl"],
                     "ppl at paper alpha": paper["ppl"].iloc[0] if not paper.empty else None,
                     "intervals overlap": overlap if not paper.empty else None,
                     "plain method": plain["ppl"].iloc[0] if not plain.empty else None})
    return pd.DataFrame(rows)


def alpha_table_of_table2(table2: pd.DataFrame, eval_sets: Sequence[str]) -> pd.DataFrame:
    """:func:`alpha_table`'s rows from a Table 2 csv (``table2_perplexity.csv`` of a profile whose cells run the
    MagR methods at several alphas): its per-channel rows, the method without its " alpha=A" suffix (the alpha is
    its own column; None for the plain methods), per set."""
    rows = []
    for r in table2[(table2["setting"] != "float") & (table2["group"] == "channel")].to_dict("records"):
        for s in eval_sets:
            rows.append({"set": s, "bits": int(r["bits"]), "method": str(r["method"]).split(" alpha=")[0],
                         "alpha": None if pd.isna(r["alpha"]) else float(r["alpha"]), "ppl": r[s],
                         "min": r[f"{s} min"], "max": r[f"{s} max"], "rerun low": r[f"{s} low"],
                         "rerun high": r[f"{s} high"], "seeds": r["seeds"]})
    return pd.DataFrame(rows)


def against_paper_alpha(table: pd.DataFrame) -> pd.Series:
    """Per row of :func:`best_alphas` (same set, bits, method order): every other alpha against the paper's, by their
    rerun intervals: "higher" / "lower" where the intervals do not overlap, else "overlaps"."""
    out = []
    for _, part, paper in _per_magr_method(table):
        if paper.empty:
            out.append("no cell at the paper's alpha")
            continue
        low, high = paper["rerun low"].iloc[0], paper["rerun high"].iloc[0]
        words = [f"{a:g} {'higher' if lo > high else 'lower' if hi < low else 'overlaps'}"
                 for a, lo, hi in zip(part["alpha"], part["rerun low"], part["rerun high"]) if a != paper_alpha(None)]
        out.append(", ".join(words))
    return pd.Series(out, name="other alphas vs the paper's (rerun intervals)")
