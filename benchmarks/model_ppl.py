"""A model's float perplexity with and without a BOS at the start of every window, beside its family's window
protocol (magr.pipeline.families): the evidence for the protocol, and the float baseline of a model outside the
default profile. Writes OUT.json and OUT.md (command, commit, machine, seconds).

    python benchmarks/model_ppl.py --model gemma3-270m --out reports/gemma3_270m_float_ppl
    python benchmarks/model_ppl.py --model gemma3-270m --eval-seqlen 256 --max-windows 4 --out /tmp/gemma_4x256
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
import yaml

from magr.evaluation.perplexity import Evaluation
from magr.pipeline.families import window_protocol
from magr.pipeline.machine import machine_info
from magr.pipeline.models import DTYPES, hide_unused_imports, load_model
from magr.pipeline.persistence import write_json
from magr.pipeline.sources import FLOAT_BASELINES
from magr.reproduction.tables import markdown_table

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"), help="evaluation and forward dtype from here")
    ap.add_argument("--eval-seqlen", type=int, default=None, help="window length (default: the profile's)")
    ap.add_argument("--max-windows", type=int, default=None, help="windows per set (default: the profile's)")
    ap.add_argument("--out", default=str(ROOT / "reports" / "gemma3_270m_float_ppl"))
    args = ap.parse_args(argv)
    hide_unused_imports()
    logging.basicConfig(level=logging.WARNING)
    params = yaml.safe_load(Path(args.params).read_text())
    ev = Evaluation(**params["evaluation"])
    ev = replace(ev, eval_seqlen=args.eval_seqlen or ev.eval_seqlen, max_windows=args.max_windows or ev.max_windows)
    forward = params.get("forward_dtype", "float32")
    protocol = window_protocol(args.model)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    load_seconds = time.perf_counter() - t0
    rows, raw = [], []
    for bos in (False, True):
        t0 = time.perf_counter()
        ppl = replace(ev, bos_per_window=bos).perplexities(model, tokenizer, params.get("device"),
                                                           forward_dtype=DTYPES[forward])
        raw.append({"bos_per_window": bos, "ppl": ppl, "seconds": time.perf_counter() - t0})
        for name, r in ppl.items():
            rows.append({"set": name, "BOS per window": "yes" if bos else "no",
                         "the family's protocol": "yes" if bos == protocol.eval_bos else "",
                         "windows": f"{r['windows']} x {r['seqlen']}", "perplexity": r["ppl"],
                         "seconds": r["seconds"]})
    info = machine_info()
    command = "python benchmarks/model_ppl.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), {"model": args.model, "runs": raw, "load_seconds": load_seconds,
                                          "forward_dtype": forward, "machine": info, "commit": commit(),
                                          "command": command, "window_protocol": protocol.to_dict()})
    baseline = f" ({FLOAT_BASELINES[args.model]})" if args.model in FLOAT_BASELINES else ""
    head = (f"# {args.model}: float perplexity with and without a BOS per window\n\n`{command}` at commit {commit()}; "
            f"{info['cpu']}, {info['cores']} cores, torch threads {torch.get_num_threads()}, forwards in {forward}; "
            f"loading the model took {load_seconds:.0f} s.\n\n"
            f"Model: {args.model}{baseline}. Family {protocol.family}: its protocol "
            f"(magr.pipeline.families) starts every window with BOS: {protocol.eval_bos} ({protocol.reason}). "
            f"Windows: the first {ev.max_windows or 'all'} non-overlapping windows of {ev.eval_seqlen} tokens of "
            f"each set (with BOS: BOS + {ev.eval_seqlen - 1} tokens of text each).\n\n")
    table = markdown_table(pd.DataFrame(rows))
    out.with_suffix(".md").write_text(head + table + "\n")
    print(head + table)


if __name__ == "__main__":
    main()
