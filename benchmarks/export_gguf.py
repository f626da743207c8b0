"""GGUF round trip on SmolLM2-135M: quantize (embedded profile settings), export as GGUF (magr.deploy.llamacpp,
read back and checked by the exporter), reload the GGUF with transformers' GGUF loader and compare perplexity on
the same windows. Writes OUT.json and OUT.md.

    python benchmarks/export_gguf.py --cells w4-magr-optq w4g32-magr-optq --out reports/export_gguf_smollm2
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch

from magr.core.methods import QuantConfig
from magr.deploy.export import Export
from magr.evaluation.perplexity import Evaluation
from magr.pipeline.calibration_data import Calibration
from magr.pipeline.persistence import write_json
from magr.runs import quantize_run

CELLS = {
    "w4-magr-optq": dict(method="magr+optq", bits=4),
    "w4g32-magr-optq": dict(method="magr+optq", bits=4, group_size=32),
    "w4-rtn": dict(method="rtn", bits=4),
    "w8-rtn-sym": dict(method="rtn", bits=8, sym=True),
}


def run_cell(name: str, model: str, root: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from magr.pipeline.models import load_model

    quant = QuantConfig.build(**CELLS[name], iters=14, feature_source="last_sample", true_sequential=False)
    evaluation = Evaluation(("wikitext2",), eval_seqlen=512, max_windows=4)
    out = root / name
    t0 = time.perf_counter()
    meta = quantize_run(model, out, quant, Calibration("c4", 4, 512, seed=0), evaluation, device="cpu",
                        progress=False, export=Export("gguf"))
    seconds = time.perf_counter() - t0
    info = json.loads((out / "gguf" / "magr_export.json").read_text())
    _, tokenizer = load_model(str(out))
    reloaded = AutoModelForCausalLM.from_pretrained(str(out / "gguf"), gguf_file="model.gguf",
                                                    dtype=torch.float32).eval()
    back = evaluation.perplexities(reloaded, tokenizer, torch.device("cpu"), None)["wikitext2"]["ppl"]
    ours = meta["ppl"]["wikitext2"]["ppl"]
    size = (out / "gguf" / "model.gguf").stat().st_size
    return {"cell": name, "gguf_type": info["gguf_type"], "read_back": info["read_back"], "ppl_in_memory": ours,
            "ppl_gguf_reloaded": back, "gap_percent": 100 * (back / ours - 1), "gguf_mib": size / 2 ** 20,
            "seconds": seconds}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--cells", nargs="+", default=["w4-magr-optq", "w4g32-magr-optq"], choices=tuple(CELLS))
    ap.add_argument("--out", default="reports/export_gguf_smollm2")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    root = Path(tempfile.mkdtemp(prefix="gguf-"))
    rows = []
    try:
        for name in args.cells:
            rows.append(run_cell(name, args.model, root))
            write_json(f"{args.out}.json", {"model": args.model, "threads": torch.get_num_threads(), "cells": rows})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    lines = [f"# GGUF export of {args.model}: read-back exactness and perplexity", "",
             "WikiText-2, first 4 windows of 512 tokens; calibration 4 x 512 C4, seed 0; MagR 14 FISTA iterations; "
             "reloaded with transformers' GGUF loader (de-quantized to float32). Command: "
             f"`python benchmarks/export_gguf.py --cells {' '.join(args.cells)} --out {args.out}`", "",
             "| cell | GGUF type | max \\|reader - ours\\| (in scales) | ppl in memory -> GGUF reloaded (gap) | file MiB |",
             "|---|---|---|---|---|"]
    for r in rows:
        rb = r["read_back"]
        lines.append(f"| {r['cell']} | {r['gguf_type']} | {rb['max_abs_diff']:.3g} ({rb['max_diff_in_scales']:.4f}) | "
                     f"{r['ppl_in_memory']:.3f} -> {r['ppl_gguf_reloaded']:.3f} ({r['gap_percent']:+.3f} %) | "
                     f"{r['gguf_mib']:.2f} |")
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
