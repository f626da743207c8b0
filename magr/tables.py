"""Tables 2-4 from the run folders of the pipeline, and Markdown / CSV output for the reports.

Every quantize cell of the pipeline is a run folder (:mod:`magr.persistence`); these functions gather
them into the paper's tables (perplexity, zero-shot accuracy, wall time), in the paper's row order, with
the method names of :data:`magr.methods.PRESETS`.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .methods import PRESETS
from .paper import PAPER_MODELS, PAPER_RUNTIME_7B_MIN, PAPER_WIKITEXT2
from .persistence import RUN_FILE, read_run

METHOD_ORDER = ("float", *(m.label for m in PRESETS.values()))


def setting_label(bits: int | None, group_size: int | None) -> str:
    """'W3' per channel, 'W3g64' per group, 'float' without bits."""
    if bits is None:
        return "float"
    return f"W{bits}" if group_size is None else f"W{bits}g{group_size}"


def load_cells(results_dir: str | Path, names: Sequence[str] | None = None) -> list[dict]:
    """All run folders under ``results_dir`` (one folder per cell), or the named ones in that order."""
    root = Path(results_dir)
    if names is None:
        names = sorted(p.parent.name for p in root.glob(f"*/{RUN_FILE}"))
    return [read_run(root / n) for n in names]


def cell_label(config: Mapping) -> str:
    """'W3g64 MagR+OPTQ': a run's setting and method name (``config``: run metadata's "config")."""
    return f"{setting_label(config['grid']['bits'], config['grid']['group_size'])} {config['label']}"


def _cell_keys(cell: Mapping) -> dict:
    cfg = cell["config"]
    refine = cfg.get("refine") or {}
    return {"setting": setting_label(cfg["grid"]["bits"], cfg["grid"]["group_size"]), "method": cfg["label"],
            "bits": cfg["grid"]["bits"], "group": cfg["grid"]["group_size"] or "channel",
            "CD passes": refine.get("passes", 0)}


def perplexity_table(cells: Sequence[Mapping], float_ppl: Mapping | None = None) -> pd.DataFrame:
    """Table 2: one row per (setting, method) with the perplexity on each evaluation set.

    ``float_ppl``: the float model's ``magr ppl --json`` result ({"ppl": {set: {"ppl": ...}}}).
    """
    rows = []
    if float_ppl is not None:
        rows.append({"setting": "float", "method": "float", "bits": None, "group": "-", "CD passes": None,
                     **{k: v["ppl"] for k, v in float_ppl["ppl"].items()}})
    for cell in cells:
        if "ppl" not in cell:
            raise ValueError(f"cell {cell.get('name')!r} has no perplexities; run it with --eval-sets")
        rows.append({**_cell_keys(cell), **{k: v["ppl"] for k, v in cell["ppl"].items()}})
    out = _sorted(pd.DataFrame(rows))
    out["bits"] = out["bits"].astype("Int64")
    return out


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    """Rows in the paper's order: float, per channel by decreasing bits, then per group; methods in order."""
    if df.empty:
        return df
    key = pd.DataFrame({"g": df["group"].map(lambda g: 0 if g in ("channel", "-") else 1),
                        "b": -pd.to_numeric(df["bits"]).fillna(np.inf),
                        "m": df["method"].map(METHOD_ORDER.index)})
    return df.loc[key.sort_values(["g", "b", "m"], kind="stable").index].reset_index(drop=True)


def with_paper(table: pd.DataFrame) -> pd.DataFrame:
    """Add the paper's LLaMA-2 WikiText-2 perplexities of the same (setting, method), where published."""
    out = table.copy()
    for j, model in enumerate(PAPER_MODELS):
        out[f"paper {model} WikiText-2"] = [
            PAPER_WIKITEXT2.get((s, m), (None,) * 3)[j] for s, m in zip(out["setting"], out["method"])]
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
    """Table 3: accuracy (%) per task and the mean, one row per model; ``results``: label -> the
    ``magr zeroshot --json`` output ({task: {"acc": ..., "n": ...}})."""
    def order(label: str) -> tuple:
        method = label.split(" ", 1)[-1]
        return (label != "float", METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), label)

    rows = []
    for label in sorted(results, key=order):
        res = results[label]
        row = {"model": label}
        for task, r in res.items():
            if isinstance(r, Mapping) and "acc" in r:
                row[task] = 100 * r["acc"]
        accs = [v for k, v in row.items() if k != "model"]
        row["mean"] = float(np.mean(accs)) if accs else math.nan
        row["items per task"] = max((r.get("n") or 0) for r in res.values() if isinstance(r, Mapping)) \
            if res else 0
        rows.append(row)
    df = pd.DataFrame(rows)
    if "items per task" in df:
        df["items per task"] = df["items per task"].astype("Int64")
    return df


def markdown_table(df: pd.DataFrame, floatfmt: str = ".2f", index: bool = False) -> str:
    """A GitHub Markdown table of ``df`` (NaN/None shown as '-')."""
    def fmt(v):
        if v is None or (not isinstance(v, str) and pd.isna(v)):
            return "-"
        if isinstance(v, (float, np.floating)):
            if abs(v) >= 1e4:
                return f"{v:.3g}"
            return format(v, floatfmt)
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
                floatfmt: str = ".2f", index: bool = False) -> tuple[Path, Path]:
    """Write ``df`` as ``stem.csv`` and ``stem.md`` (title, table, notes); return both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv, md = stem.with_suffix(".csv"), stem.with_suffix(".md")
    df.to_csv(csv, index=index)
    parts = [f"## {title}\n" if title else "", markdown_table(df, floatfmt, index), f"\n{notes}" if notes else ""]
    md.write_text("\n".join(p for p in parts if p) + "\n")
    return csv, md


def describe_config(config: Mapping) -> str:
    """A run's settings in words, from run metadata's "config" (:meth:`magr.methods.QuantConfig.to_dict`)."""
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
