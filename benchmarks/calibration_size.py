"""Why the CPU default's Table 2 orders OPTQ behind RTN: the same cells with more calibration tokens.

Takes the default profile (params.yaml: calibration, evaluation, common quant settings and the cells) and reruns
chosen cells with ``nsamples`` windows (and optionally MagR's X = every window, ``feature_source: all``), once
per seed, on the same evaluation windows; writes OUT.json and OUT.md with the perplexity per seed, beside the
default's own values read from runs/cells (when the pipeline has run).

    python benchmarks/calibration_size.py --cells w4-optq w3-optq w3-magr-optq --nsamples 32 --seeds 0 1 \
        --extra w3-magr-rtn:feature_source=all --out reports/calibration_size
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from magr.pipeline.calibration_data import Calibration
from magr.reproduction.cells import load_cells
from magr.evaluation.perplexity import Evaluation
from magr.core.methods import QuantConfig
from magr.pipeline.persistence import write_json
from magr.runs import quantize_cell
from magr.reproduction.tables import markdown_table

ROOT = Path(__file__).resolve().parents[1]


def cell_settings(params: dict, name: str, overrides: dict) -> dict:
    """The settings of cell ``name`` as the pipeline passes them: the common ``quant`` keys, then the cell's."""
    cell = {k: v for k, v in params["cells"][name].items() if k != "save"}
    return {**params.get("quant", {}), **cell, **overrides}


def parse_extra(text: str) -> tuple[str, dict]:
    """'w3-magr-rtn:feature_source=all' -> ('w3-magr-rtn', {'feature_source': 'all'})."""
    name, _, rest = text.partition(":")
    pairs = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
    return name, {k: yaml.safe_load(v) for k, v in pairs.items()}


def pipeline_cells(results_dir: Path) -> dict:
    """{name: cell} of the pipeline's own runs (runs/cells, :func:`magr.reproduction.cells.load_cells`), when they exist."""
    return {c["name"]: c for c in load_cells(results_dir)} if results_dir.is_dir() else {}


def summary(values) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.2f} [{min(values):.2f}, {max(values):.2f}]" if len(values) > 1 else f"{mean:.2f}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--cells", nargs="*", default=["w4-optq", "w3-optq", "w3-magr-optq"])
    ap.add_argument("--extra", nargs="*", default=[], help="cell:key=value,... (settings that differ from the cell's)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--runs", default=str(ROOT / "runs" / "cells"), help="the pipeline's cells, for the default column")
    ap.add_argument("--work", default="/tmp/magr_calibration_size")
    ap.add_argument("--out", default=str(ROOT / "reports" / "calibration_size"))
    ap.add_argument("--from-json", action="store_true", help="only render OUT.md from an earlier OUT.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    params = yaml.safe_load(Path(args.params).read_text())
    todo = [(n, {}) for n in args.cells] + [parse_extra(e) for e in args.extra]
    for name, _ in todo:
        if name not in params["cells"]:
            raise SystemExit(f"cell {name!r} is not in {args.params} (cells: {', '.join(params['cells'])})")
    base = Calibration(**params["calibration"])
    cal = Calibration(**{**params["calibration"], "nsamples": args.nsamples})
    ev = Evaluation(**params["evaluation"])
    if args.from_json:
        raw = json.loads(Path(args.out).with_suffix(".json").read_text())["runs"]
    else:
        raw = [measure(params, name, overrides, cal, ev, args) for name, overrides in todo]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(args.out).with_suffix(".json"), {"runs": raw, "machine": platform.processor()
                                                         or platform.machine(), "threads": torch.get_num_threads(),
                                                         "torch": torch.__version__})
    cells = pipeline_cells(Path(args.runs))
    rtn = {c["config"]["grid"]["bits"]: {s: v["ppl"] for s, v in c["ppl"].items()} for c in cells.values()
           if c["config"]["method"] == "rtn" and c["config"]["grid"]["group_size"] is None}
    table = render(raw, params, cells, rtn, base, cal, ev)
    head = (f"# The default's cells rerun with {args.nsamples} x {cal.seqlen} calibration tokens and the settings in "
            f"'changed'\n\n"
            f"`python benchmarks/calibration_size.py --cells {' '.join(args.cells)} --nsamples {args.nsamples} "
            f"--seeds {' '.join(map(str, args.seeds))}"
            + (f" --extra {' '.join(args.extra)}" if args.extra else "") + "`\n\n"
            f"Every other setting as in {Path(args.params).name} (profile {params.get('profile')}): the same "
            f"{ev.max_windows or 'all'} evaluation windows of {ev.eval_seqlen} tokens per set; values: mean over the "
            f"seeds [min, max]; 'below RTN' compares every seed with the calibration-free RTN cell of the same bits "
            f"(RTN: " + ", ".join(f"W{b} {v[s]:.2f} ({s})" for b, v in sorted(rtn.items()) for s in v) + ").\n\n")
    Path(args.out).with_suffix(".md").write_text(head + markdown_table(table) + "\n")
    print(head + markdown_table(table))


def measure(params, name, overrides, cal, ev, args) -> dict:
    """Cell ``name`` with ``overrides`` and calibration ``cal``, once per seed: its perplexities and seconds."""
    quant = QuantConfig.build(**cell_settings(params, name, overrides))
    tag = name + "".join(f"-{k}-{v}" for k, v in overrides.items())
    t0 = time.perf_counter()
    runs = quantize_cell(params["model"], Path(args.work) / f"{tag}-n{cal.nsamples}", quant, args.seeds, cal, ev,
                         device=params.get("device"))
    return {"cell": name, "overrides": overrides, "label": quant.label, "nsamples": cal.nsamples,
            "seeds": args.seeds, "ppl": {s: [r["ppl"][s]["ppl"] for r in runs] for s in ev.eval_sets},
            "seconds": time.perf_counter() - t0}


def render(raw, params, cells, rtn, base, cal, ev) -> pd.DataFrame:
    """One row per (cell, set): the pipeline's values of the cell (``cells``), the rerun's, and how many seeds
    are below the calibration-free RTN cell of the same bits (``rtn``: bits -> {set: ppl})."""
    def below(values, ref):
        return f"{sum(v < ref for v in values)} of {len(values)}" if ref else "-"

    rows = []
    for r in raw:
        bits = QuantConfig.build(**cell_settings(params, r["cell"], r["overrides"])).grid.bits
        for s in ev.eval_sets:
            row = {"cell": r["cell"], "changed": ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "-",
                   "method": r["label"], "set": s}
            ref = rtn.get(bits, {}).get(s)
            if r["cell"] in cells:
                default = cells[r["cell"]]["ppl"][s]["values"]
                row[f"default: {base.nsamples} x {base.seqlen}"] = summary(default)
                row["below RTN (default)"] = below(default, ref)
            row[f"{r['nsamples']} x {cal.seqlen}"] = summary(r["ppl"][s])
            row[f"below RTN ({r['nsamples']} x {cal.seqlen})"] = below(r["ppl"][s], ref)
            rows.append(row)
    return pd.DataFrame(rows)

if __name__ == "__main__":
    main()
