"""Compute time of a pipeline's quantize cells from the runs' own records, whatever interrupted the pipeline.

scripts/stage_times.py times the stages of the last `dvc repro` by their outputs' modification times, which only
holds for an uninterrupted run. This reads every ``runs/cells/<cell>/seed-<s>/magr_run.json`` instead: the
quantization's ``seconds`` and each perplexity set's ``seconds`` as the run measured them (time inside the
process: a stopped or paused process's wait is in them, a gap between two `make repro` calls is not), with the
recorded seconds of the blocks a run resumed from an interrupted one's checkpoints. The last
column is the cell at its fastest seed and perplexity set, every seed and set: what the cell costs without the
slow-downs a shared machine adds to some runs (an estimate, not a measurement of one run).

    python benchmarks/run_seconds.py runs/cells            # Markdown table on stdout, one row per cell and a total
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def run_quantization_seconds(run: dict) -> float:
    """The run's own ``seconds`` (its process) plus, for blocks it resumed from checkpoints, the seconds the
    interrupted process had recorded for them (their quantization, without the forwards that fed them)."""
    return run["seconds"] + sum(run["block_seconds"][i] for i in run.get("resumed_blocks") or [])


def cell_seconds(cells: Path) -> list[dict]:
    rows = []
    for cell in sorted(p for p in cells.iterdir() if p.is_dir()):
        runs = [json.loads(f.read_text()) for f in sorted(cell.glob("seed-*/magr_run.json"))]
        if not runs:
            continue
        quant = [run_quantization_seconds(r) for r in runs]
        ppl = [s["seconds"] for r in runs for s in (r.get("ppl") or {}).values()]
        rows.append({"cell": cell.name, "seeds": len(runs), "quantization s": sum(quant),
                     "per seed (min-max)": f"{min(quant):.0f}-{max(quant):.0f}", "perplexity s": sum(ppl),
                     "per set (min-max)": f"{min(ppl):.0f}-{max(ppl):.0f}" if ppl else "-",
                     "total s": sum(quant) + sum(ppl),
                     "total at the fastest seed and set s": len(runs) * min(quant) + len(ppl) * min(ppl, default=0)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cells", type=Path, help="the pipeline's runs/cells folder")
    args = p.parse_args(argv)
    rows = cell_seconds(args.cells)
    if not rows:
        raise SystemExit(f"no magr_run.json under {args.cells}/*/seed-*/")
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|---|" + "---:|" * (len(cols) - 1))
    total = {c: sum(r[c] for r in rows) if isinstance(rows[0][c], (int, float)) else "" for c in cols}
    for r in rows + [{**total, "cell": "all"}]:
        print("| " + " | ".join(f"{v:.0f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
