"""Table 3 on the full sets: merge the JSON files of benchmarks/zeroshot_cells.py into one Markdown/CSV table.

    python benchmarks/zeroshot_table.py reports/zeroshot_full/*.json --note-file reports/zeroshot_full/NOTE.md \
        --out reports/table3_zeroshot_full

Each input holds {"meta": {...}, "results": {task: {acc, acc_stderr, acc_norm, n, seconds, ...}}}; several
files for the same model (e.g. ARC and PIQA/Winogrande run separately) are merged, a task measured twice is an
error. Accuracies in %, +- one standard error (lm-eval's acc_stderr).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from magr.reproduction.tables import METHOD_ORDER, cell_label, describe_config, markdown_table
from magr.evaluation.zeroshot import CHANCE, TASKS, format_acc


def merge(paths) -> dict[str, dict]:
    """label -> {"meta": [meta of each file], "results": {task: result}}, float first, then the paper's order."""
    cells: dict[str, dict] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        if "meta" not in data or "results" not in data:
            raise ValueError(f"{path}: not a zeroshot_cells.py output (needs 'meta' and 'results')")
        label = "float" if data["meta"]["method"] == "float" else cell_label(data["meta"]["config"])
        cell = cells.setdefault(label, {"meta": [], "results": {}})
        for task, r in data["results"].items():
            if task in cell["results"]:
                raise ValueError(f"{path}: {task} of {label} is already in another file")
            cell["results"][task] = r
        cell["meta"].append({**data["meta"], "file": Path(path).name})
    return dict(sorted(cells.items(), key=lambda kv: METHOD_ORDER.index(kv[0].split(" ", 1)[-1])))


def long_frame(cells: dict[str, dict]) -> pd.DataFrame:
    """One row per (model, task) with the lm-eval figures as measured (fractions, seconds)."""
    return pd.DataFrame([{"model": label, "task": task, **{k: r.get(k) for k in
                          ("n", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "seconds")}}
                         for label, cell in cells.items() for task, r in cell["results"].items()])


def markdown(cells: dict[str, dict]) -> str:
    """acc +- se per task, the mean over the four tasks, acc_norm where lm-eval defines it, eval minutes."""
    normed = [t for t in TASKS if t != "winogrande"]  # winogrande: partial scoring, no acc_norm
    rows = []
    for label, cell in cells.items():
        res = cell["results"]
        mean = sum(res[t]["acc"] for t in TASKS) / len(TASKS) if all(t in res for t in TASKS) else None
        rows.append([label, *[format_acc(res[t]["acc"], res[t]["acc_stderr"]) if t in res else "-" for t in TASKS],
                     format_acc(mean, None),
                     *[format_acc(res[t]["acc_norm"], res[t]["acc_norm_stderr"]) if t in res else "-" for t in normed],
                     f"{sum(r['seconds'] for r in res.values()) / 60:.1f}"])
    rows.append(["chance", *[format_acc(CHANCE[t], None) for t in TASKS],
                 format_acc(sum(CHANCE[t] for t in TASKS) / len(TASKS), None),
                 *[format_acc(CHANCE[t], None) for t in normed], "-"])
    header = ["model", *[f"{t} acc" for t in TASKS], "mean acc", *[f"{t} acc_norm" for t in normed], "eval (min)"]
    return markdown_table(pd.DataFrame(rows, columns=header))


def settings(cells: dict[str, dict]) -> str:
    lines = []
    for label, cell in cells.items():
        for m in cell["meta"]:
            quant = "" if m["method"] == "float" else (
                f"; quantized in memory with {m['nsamples']} x {m['seqlen']} {m['calib']} calibration tokens "
                f"({describe_config(m['config'])}; {m['quantize_s']:.0f} s)")
            ns = ", ".join(f"{t} {cell['results'][t]['n']}" for t in m["tasks"])
            lines.append(f"- {label} ({m['file']}: {ns} items): model {m['model']}{quant}; batch size "
                         f"{m['batch_size']}, {m['machine']}, limit {m['limit']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="zeroshot_cells.py JSON files")
    ap.add_argument("--out", required=True, help="output stem: writes STEM.md and STEM.csv")
    ap.add_argument("--note-file", default=None, help="a Markdown file added under the table (e.g. what else ran)")
    args = ap.parse_args(argv)
    cells = merge(sorted(args.inputs))
    models = sorted({m["model"] for cell in cells.values() for m in cell["meta"]})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    long_frame(cells).to_csv(out.with_suffix(".csv"), index=False)
    text = "\n".join([
        "## Table 3 on the full sets: zero-shot accuracy (%)", "", markdown(cells), "",
        f"**Different model**: {', '.join(models)} (paper: LLaMA-2). lm-evaluation-harness multiple-choice "
        "log-likelihood scoring, zero-shot, on the local copies of the hub sets (items per task in the settings "
        "below); ± one standard error. eval (min): lm-eval time of the tasks in the row on this CPU.",
        *(["", Path(args.note_file).read_text().strip()] if args.note_file else []),
        "", "Settings and files:", "", settings(cells), "",
        "Reproduce: `python benchmarks/zeroshot_cells.py --method {float|rtn|magr+optq} --bits 3 --out ...`, then "
        "`python benchmarks/zeroshot_table.py reports/zeroshot_full/*.json --note-file reports/zeroshot_full/NOTE.md "
        "--out reports/table3_zeroshot_full`.",
    ])
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
