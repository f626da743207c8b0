"""Tables 2-4 from the run folders of the pipeline, and Markdown / CSV output for the reports.

Every quantize cell of the pipeline is a folder of run folders, one per calibration seed (:mod:`magr.reproduction.cells`);
these functions gather them into the paper's tables (perplexity, zero-shot accuracy, wall time), in the paper's
row order, with the method names of :data:`magr.core.methods.PRESETS`, every value with its uncertainty.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.methods import PRESETS
from ..core.preprocessing import MagR
from .paper import PAPER_MODELS, PAPER_RUNTIME_7B_MIN, PAPER_WIKITEXT2

METHOD_ORDER = ("float", *(m.label for m in PRESETS.values()))


def setting_label(bits: int | None, group_size: int | None) -> str:
    """'W3' per channel, 'W3g64' per group, 'float' without bits."""
    if bits is None:
        return "float"
    return f"W{bits}" if group_size is None else f"W{bits}g{group_size}"


def cell_label(config: Mapping) -> str:
    """'W3g64 MagR+OPTQ': a run's setting and method name (``config``: run metadata's "config"; " alpha=A" away
    from the paper's alpha, :func:`method_name`)."""
    g = config["grid"]["group_size"]
    alpha = (config.get("preprocess") or {}).get("alpha")
    return f"{setting_label(config['grid']['bits'], g)} {method_name(config['label'], alpha, g or 'channel')}"


def paper_alpha(group_size: int | None) -> float:
    """The paper's alpha for a grid (magr's MagR default: 1e-3 per channel, 1e-4 per group)."""
    return MagR().for_group(group_size).alpha


def method_name(method: str, alpha, group) -> str:
    """A table row's method: the preset's name ("MagR+RTN"), with " alpha=A" where its MagR alpha is not the
    paper's for the grid (``group``: "channel" or the group size; ``alpha`` None / NaN: no MagR)."""
    if alpha is None or pd.isna(alpha) or alpha == paper_alpha(None if group == "channel" else int(group)):
        return method
    return f"{method} alpha={alpha:g}"


def cell_key(cell: Mapping) -> tuple[str, str]:
    """(setting, method) of a cell, e.g. ("W3", "MagR+OPTQ"), or ("W3", "MagR+OPTQ alpha=0.01") away from the
    paper's alpha (:func:`method_name`): its row in the tables and orderings."""
    keys = _cell_keys(cell)
    return keys["setting"], method_name(keys["method"], keys["alpha"], keys["group"])


def _cell_keys(cell: Mapping) -> dict:
    cfg = cell["config"]
    refine = cfg.get("refine") or {}
    return {"setting": setting_label(cfg["grid"]["bits"], cfg["grid"]["group_size"]), "method": cfg["label"],
            "alpha": (cfg.get("preprocess") or {}).get("alpha"), "bits": cfg["grid"]["bits"],
            "group": cfg["grid"]["group_size"] or "channel", "CD passes": refine.get("passes", 0)}


def perplexity_table(cells: Sequence[Mapping], float_ppl: Mapping | None = None) -> pd.DataFrame:
    """Table 2: one row per (setting, method) with the perplexity on each evaluation set.

    ``float_ppl``: the float model's ``magr ppl --json`` result ({"ppl": {set: {"ppl": ...}}}).
    """
    rows = []
    if float_ppl is not None:
        rows.append({"setting": "float", "method": "float", "alpha": None, "bits": None, "group": "-",
                     "CD passes": None, "seeds": None, **{k: v["ppl"] for k, v in float_ppl["ppl"].items()}})
    for cell in cells:
        if "ppl" not in cell:
            raise ValueError(f"cell {cell.get('name')!r} has no perplexities; run it with --eval-sets")
        row = {**_cell_keys(cell), "seeds": len(cell["runs"]) if cell["config"]["uses_calibration"] else 0}
        for k, v in cell["ppl"].items():
            row.update({k: v["ppl"], f"{k} min": v["min"], f"{k} max": v["max"], f"{k} low": v["low"],
                        f"{k} high": v["high"]})
        rows.append(row)
    out = _sorted(pd.DataFrame(rows))
    for col in ("bits", "CD passes", "seeds"):
        out[col] = out[col].astype("Int64")
    return out


def with_ranges(table: pd.DataFrame, eval_sets: Sequence[str], fmt: str = ".2f") -> pd.DataFrame:
    """The table for reading: each set's column as "mean [min, max]" over the seeds (one value where the
    cell has one run) and a column "<set> rerun" with the rerun interval "low-high"; the numeric columns
    dropped; seeds 0 reads "calibration-free"."""
    def f(x):
        return f"{x:.3g}" if abs(x) >= 1e4 else format(x, fmt)

    def text(mean, lo, hi):
        if pd.isna(mean):
            return "-"
        return f(mean) if pd.isna(lo) or lo == hi else f"{f(mean)} [{f(lo)}, {f(hi)}]"

    out = table.copy()
    nan = pd.Series([np.nan] * len(out), index=out.index)
    for s in eval_sets:
        lo, hi, low, high = (out.get(f"{s} {k}", nan) for k in ("min", "max", "low", "high"))
        out[s] = [text(m, a, b) for m, a, b in zip(out[s], lo, hi)]
        out.insert(out.columns.get_loc(s) + 1, f"{s} rerun", ["-" if pd.isna(a) or a == b else f"{f(a)}-{f(b)}"
                                                             for a, b in zip(low, high)])
        out = out.drop(columns=[c for c in (f"{s} min", f"{s} max", f"{s} low", f"{s} high") if c in out])
    out["seeds"] = ["-" if pd.isna(n) else ("calibration-free" if n == 0 else str(n)) for n in out["seeds"]]
    if "alpha" in out:
        out["alpha"] = ["-" if pd.isna(a) else f"{a:g}" for a in out["alpha"]]
    return out


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    """Rows in the paper's order: float, per channel by decreasing bits, then per group; methods in order, each
    by increasing MagR alpha."""
    if df.empty:
        return df
    key = pd.DataFrame({"g": df["group"].map(lambda g: 0 if g in ("channel", "-") else 1),
                        "b": -pd.to_numeric(df["bits"]).fillna(np.inf),
                        "m": df["method"].map(METHOD_ORDER.index),
                        "a": pd.to_numeric(df["alpha"]) if "alpha" in df else 0.0})
    return df.loc[key.sort_values(["g", "b", "m", "a"], kind="stable").index].reset_index(drop=True)


def with_paper(table: pd.DataFrame) -> pd.DataFrame:
    """Add the paper's LLaMA-2 WikiText-2 perplexities of the same (setting, method) at the paper's alpha, where
    published."""
    out = table.copy()
    alphas = out["alpha"] if "alpha" in out else [None] * len(out)
    names = [m if a in (None, "-") or pd.isna(a) else method_name(m, float(a), g)
             for m, a, g in zip(out["method"], alphas, out["group"])]
    for j, model in enumerate(PAPER_MODELS):
        out[f"paper {model} WikiText-2"] = [PAPER_WIKITEXT2.get((s, m), (None,) * 3)[j]
                                            for s, m in zip(out["setting"], names)]
    return out


def runtime_table(cells: Sequence[Mapping]) -> pd.DataFrame:
    """Table 4: wall time of each cell, in total and per block, split into MagR, the quantizer (RTN or
    OPTQ), the coordinate-descent refinement and the rest (calibration forward passes, statistics)."""
    rows = []
    for cell in cells:
        recs = cell.get("records", [])
        blocks = cell.get("block_seconds") or []
        magr = sum(r.get("seconds_magr", 0.0) for r in recs)
        quant = sum(r.get("seconds_quant", 0.0) for r in recs)
        refine = sum(r.get("seconds_refine", 0.0) for r in recs)
        total = cell.get("seconds", math.nan)
        rows.append({**_cell_keys(cell), "total (s)": total,
                     "per block (s, mean)": float(np.mean(blocks)) if blocks else math.nan,
                     "per block (s, max)": float(np.max(blocks)) if blocks else math.nan,
                     "MagR (s)": magr, "quantizer (s)": quant, "CD (s)": refine,
                     "forward + stats (s)": total - magr - quant - refine,
                     "blocks": len(blocks)})
    df = _sorted(pd.DataFrame(rows))
    if df.empty:
        return df
    df["paper LLaMA-2-7B A100 (min)"] = [PAPER_RUNTIME_7B_MIN.get(m) if g == "channel" else None
                                         for g, m in zip(df["group"], df["method"])]
    return df


def zeroshot_table(results: Mapping[str, Mapping]) -> pd.DataFrame:
    """Table 3: accuracy (%) per task with its standard error (lm-eval's acc_stderr, "<task> se") and the mean,
    one row per model; ``results``: label -> the ``magr zeroshot --json`` output ({task: {"acc", "acc_stderr",
    "n"}})."""
    def order(label: str) -> tuple:
        method = label.split(" ", 1)[-1]
        return (label != "float", METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), label)

    rows = []
    for label in sorted(results, key=order):
        res = {t: r for t, r in results[label].items() if isinstance(r, Mapping) and "acc" in r}
        row = {"model": label}
        for task, r in res.items():
            row[task] = 100 * r["acc"]
            row[f"{task} se"] = 100 * r["acc_stderr"] if r.get("acc_stderr") is not None else math.nan
        row["mean"] = float(np.mean([100 * r["acc"] for r in res.values()])) if res else math.nan
        row["items per task"] = max((r.get("n") or 0) for r in res.values()) if res else 0
        rows.append(row)
    df = pd.DataFrame(rows)
    if "items per task" in df:
        df["items per task"] = df["items per task"].astype("Int64")
    return df


def with_errors(table: pd.DataFrame, columns: Sequence[str], fmt: str = ".1f") -> pd.DataFrame:
    """The table for reading: each column as "value ± se" from its "<column> se" companion, which is dropped."""
    out = table.copy()
    for c in columns:
        se = out.pop(f"{c} se") if f"{c} se" in out else pd.Series([np.nan] * len(out))
        out[c] = ["-" if pd.isna(v) else (format(v, fmt) if pd.isna(e) else f"{v:{fmt}} ± {e:{fmt}}")
                  for v, e in zip(out[c], se)]
    return out


def zeroshot_differences(results: Mapping[str, Mapping], a: str, b: str, z: float = 2.0) -> pd.DataFrame:
    """Per task, accuracy of model ``a`` minus model ``b`` (points) with the standard error of the difference,
    sqrt(se_a^2 + se_b^2) (conservative for the same items), and whether |difference| > z standard errors."""
    rows = []
    for task, ra in results[a].items():
        rb = results[b].get(task)
        if not (isinstance(ra, Mapping) and isinstance(rb, Mapping) and "acc" in ra and "acc" in rb):
            continue
        diff = 100 * (ra["acc"] - rb["acc"])
        se = 100 * math.sqrt((ra.get("acc_stderr") or 0) ** 2 + (rb.get("acc_stderr") or 0) ** 2)
        rows.append({"task": task, "difference (points)": diff, "se of the difference": se,
                     f"larger than {z:g} se": abs(diff) > z * se})
    return pd.DataFrame(rows)


def markdown_table(df: pd.DataFrame, floatfmt: str = ".2f", index: bool = False) -> str:
    """A GitHub Markdown table of ``df`` (NaN/None shown as '-'; a non-zero number that ``floatfmt`` would round
    to zero, such as MagR's alpha 0.001 at ".1f", and one of 1e4 or more in three significant digits)."""
    def fmt(v):
        if v is None or (not isinstance(v, str) and pd.isna(v)):
            return "-"
        if isinstance(v, (float, np.floating)):
            text = format(v, floatfmt)
            if abs(v) >= 1e4 or (v != 0 and float(text) == 0):
                return f"{v:.3g}"
            return text
        return str(v)

    def esc(text) -> str:
        return str(text).replace("|", "\\|")

    frame = df.reset_index() if index else df
    cols = [esc(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |",
             "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(frame[c]) else "---" for c in frame.columns) + "|"]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(esc(fmt(v)) for v in row.tolist()) + " |")
    return "\n".join(lines)


def write_table(df: pd.DataFrame, stem: str | Path, title: str = "", notes: str = "",
                floatfmt: str = ".2f", index: bool = False, view: pd.DataFrame | None = None) -> tuple[Path, Path]:
    """Write ``df`` as ``stem.csv`` and ``stem.md`` (title, table - or ``view``, a formatted copy -, notes)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv, md = stem.with_suffix(".csv"), stem.with_suffix(".md")
    df.to_csv(csv, index=index)
    shown = markdown_table(df if view is None else view, floatfmt, index)
    parts = [f"## {title}\n" if title else "", shown, f"\n{notes}" if notes else ""]
    md.write_text("\n".join(p for p in parts if p) + "\n")
    return csv, md


def describe_config(config: Mapping) -> str:
    """A run's settings in words, from run metadata's "config" (:meth:`magr.core.methods.QuantConfig.to_dict`)."""
    g = config["grid"]
    parts = [config["label"], f"{g['bits']} bits", "per channel" if g["group_size"] is None else f"g{g['group_size']}",
             f"beta {g['beta']}" + (", symmetric" if g["sym"] else "")]
    if config.get("preprocess"):
        m = config["preprocess"]
        parts.append(f"MagR alpha {m['alpha']:g}, {m['iters']} {m['solver'].upper()} iterations, X = {m['feature_source']}")
    q = config["quantizer"]
    if q["name"] == "optq":
        parts.append(f"OPTQ damp {q['percdamp']}, block {q['blocksize']}"
                     + (", act-order" if q["actorder"] else "") + (", static groups" if q["static_groups"] else ""))
    if config.get("refine"):
        n = config['refine']['passes']
        parts.append(f"{n} CD pass{'' if n == 1 else 'es'}")
    parts.append("true-sequential" if config["true_sequential"] else "one statistics pass per block")
    return ", ".join(parts)
