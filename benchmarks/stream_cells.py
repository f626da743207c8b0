"""Streamed vs in-memory runs of params.yaml's cells on a prepared model folder (README "Models larger than memory").

    python benchmarks/stream_cells.py equality --model /path/to/prepared/smollm2 --out /tmp/stream-eq
    python benchmarks/stream_cells.py speed --model /path/to/prepared/smollm2 --out /tmp/stream-speed --pairs 3

``equality``: rtn, optq, magr+optq and magr+optq-cd at W3, per channel and per group (``--group-size``), each
run with ``--load full`` and ``--load stream`` (params.yaml's calibration, evaluation and common settings, seed
0; ``--nsamples`` / ``--max-windows`` may shrink them): are the saved weights and grids bit-identical and the
perplexities equal? ``speed``: the W3 MagR+OPTQ cell (params.yaml's settings, seed 0) as ``magr quantize``
processes, full and streamed interleaved (A B A B ...: the machine is shared, so neighbouring runs see the same
load), wall time of each process, ratio per pair and its spread. Each command prints a Markdown table and writes
it with the raw numbers as JSON to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("rtn", "optq", "magr+optq", "magr+optq-cd")


def flags(settings: dict) -> list[str]:
    """CLI flags of settings as dvc.yaml passes them (``save: false`` -> ``--no-save``, lists spread)."""
    out = []
    for key, value in settings.items():
        if isinstance(value, bool):
            out.append(f"--{key}" if value else f"--no-{key.replace('_', '-')}")
        elif isinstance(value, list):
            out += [f"--{key}", *map(str, value)]
        else:
            out += [f"--{key}", str(value)]
    return out


def cell_flags(params: dict, cell: dict, overrides: dict) -> list[str]:
    """The flags of one quantize stage of params.yaml (dtype, forward dtype, calibration, evaluation, quant, cell)."""
    settings = {"dtype": params["prepare"]["dtype"], "forward_dtype": params["forward_dtype"], "device": "cpu",
                **params["calibration"], **params["evaluation"], **params["quant"], **cell, **overrides}
    return flags(settings)


def quantize(model: str, out: Path, args: list[str], load: str, threads: int) -> float:
    """Wall seconds of one ``magr quantize`` process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "magr", "quantize", "--model", model, "--out", str(out), *args,
                    "--load", load], check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from magr.pipeline.shards import TensorFiles

    files = TensorFiles.of_folder(folder)
    return files.read(files.names())


def same_run(a: Path, b: Path) -> dict:
    """Bit-identity of the weights and grids of two run folders, equality of their perplexities."""
    from safetensors.torch import load_file

    out = {}
    for what, read in (("weights", folder_tensors), ("grids", lambda f: load_file(str(f / "magr_qparams.safetensors")))):
        ta, tb = read(a), read(b)
        out[f"{what}_identical"] = ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
        out[f"{what}_tensors"] = len(ta)
    ppl = [{k: v["ppl"] for k, v in json.loads((f / "magr_run.json").read_text())["ppl"].items()} for f in (a, b)]
    out.update(ppl_full=ppl[0], ppl_stream=ppl[1], ppl_equal=ppl[0] == ppl[1])
    return out


def ppl(values: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in values.items())


def equality(args, params: dict) -> tuple[str, list]:
    header = ("| method | grid | weights bit-identical | grids bit-identical | perplexity full | perplexity streamed "
              "| equal |")
    rows, lines = [], [header, "|---|---|---|---|---|---|---|"]
    overrides = {k: v for k, v in (("nsamples", args.nsamples), ("max_windows", args.max_windows)) if v is not None}
    for group in [None, args.group_size][1 if args.groups_only else 0:]:
        for method in args.methods:
            cell = {"method": method, "bits": 3, **({"group_size": group} if group else {})}
            name = f"{method}-{'g' + str(group) if group else 'channel'}"
            cli = cell_flags(params, cell, overrides)
            runs = {load: args.out / name / load for load in ("full", "stream")}
            seconds = {load: quantize(args.model, out, cli, load, args.threads) for load, out in runs.items()}
            r = {"cell": name, "seconds": seconds, **same_run(runs["full"], runs["stream"])}
            rows.append(r)
            lines.append(f"| {method} | {'g' + str(group) if group else 'per channel'} | {r['weights_identical']} "
                         f"({r['weights_tensors']}) | {r['grids_identical']} | {ppl(r['ppl_full'])} | "
                         f"{ppl(r['ppl_stream'])} | {r['ppl_equal']} |")
            print(lines[-1], flush=True)
    return "\n".join(lines), rows


def speed(args, params: dict) -> tuple[str, list]:
    cell = {k: v for k, v in params["cells"]["w3-magr-optq"].items() if k != "save"}
    cli = cell_flags(params, {**cell, "seed": 0}, {})
    rows, lines = [], ["| pair | full (s) | streamed (s) | streamed / full |", "|---|---|---|---|"]
    for i in range(args.pairs):
        order = ("full", "stream") if i % 2 == 0 else ("stream", "full")  # alternate which goes first
        t = {load: quantize(args.model, args.out / f"{load}-{i}", cli, load, args.threads) for load in order}
        rows.append({"pair": i, "order": order, **t, "ratio": t["stream"] / t["full"]})
        lines.append(f"| {i} ({order[0]} first) | {t['full']:.1f} | {t['stream']:.1f} | {t['stream'] / t['full']:.3f} |")
        print(lines[-1], flush=True)
    ratios = [r["ratio"] for r in rows]
    total = sum(r["stream"] for r in rows) / sum(r["full"] for r in rows)
    lines.append(f"\nratio of the sums {total:.3f}; per pair: median {statistics.median(ratios):.3f}, "
                 f"range [{min(ratios):.3f}, {max(ratios):.3f}] ({len(ratios)} pairs, {args.threads} thread(s))")
    return "\n".join(lines), rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("equality", "speed"))
    p.add_argument("--model", required=True, help="a prepared model folder (scripts/prepare_model.py)")
    p.add_argument("--out", required=True, type=Path, help="a folder for the runs and the results")
    p.add_argument("--params", default=str(ROOT / "params.yaml"))
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--pairs", type=int, default=3, help="speed: full / streamed pairs")
    p.add_argument("--group-size", type=int, default=64, help="equality: the per-group cells' group size")
    p.add_argument("--groups-only", action="store_true", help="equality: only the per-group cells")
    p.add_argument("--methods", nargs="+", default=list(METHODS), help="equality: the methods (default: all four)")
    p.add_argument("--nsamples", type=int, default=None, help="equality: fewer calibration windows than params.yaml")
    p.add_argument("--max-windows", type=int, default=None, help="equality: fewer evaluation windows")
    args = p.parse_args(argv)
    params = yaml.safe_load(Path(args.params).read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    table, rows = (equality if args.what == "equality" else speed)(args, params)
    print(table)
    (args.out / f"{args.what}.md").write_text(table + "\n")
    (args.out / f"{args.what}.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
