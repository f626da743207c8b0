"""Seconds per stage of the last `dvc repro`, from the modification time of each stage's newest output (dvc.lock
lists the stages and their outputs): a stage's time is its outputs' end minus the previous stage's end; the first
stage's start is the end of the last stage minus the whole `dvc repro` time (so it includes dvc's start-up).

    python scripts/stage_times.py --dvc-seconds 1451 --setup-seconds 106     # Markdown table on stdout

`make repro` appends this table to reports/pipeline_wall_time.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml


def newest_mtime(path: Path) -> float:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return max((p.stat().st_mtime for p in files if p.exists()), default=0.0)


def stage_seconds(lock: Path, dvc_seconds: float) -> list[tuple[str, float | None]]:
    """(stage, seconds) in the order the stages ended; None for a stage whose outputs are older than this `dvc repro`
    (it did not run: kept from an earlier, interrupted or partial, one), so a resumed pipeline shows no made-up times."""
    stages = yaml.safe_load(lock.read_text())["stages"]
    root = lock.parent
    ends = sorted((max(newest_mtime(root / o["path"]) for o in s["outs"]), name)
                  for name, s in stages.items() if s.get("outs"))
    start = prev = ends[-1][0] - dvc_seconds
    out = []
    for end, name in ends:
        if end < start:
            out.append((name, None))
            continue
        out.append((name, end - prev))
        prev = end
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lock", default="dvc.lock")
    ap.add_argument("--dvc-seconds", type=float, required=True, help="wall time of the whole `dvc repro`")
    ap.add_argument("--setup-seconds", type=float, default=None)
    args = ap.parse_args(argv)
    rows = ["| stage | seconds |", "|---|---:|"]
    if args.setup_seconds is not None:
        rows.append(f"| setup (scripts/setup.sh) | {args.setup_seconds:.0f} |")
    stages = stage_seconds(Path(args.lock), args.dvc_seconds)
    rows += [f"| {name} | {'-' if sec is None else f'{sec:.0f}'} |" for name, sec in stages]
    if any(sec is None for _, sec in stages):
        rows.append("\n-: the stage's outputs are older than this `dvc repro` (kept from an earlier run; a resumed "
                    "pipeline's cells: `python benchmarks/run_seconds.py runs/cells`)")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
