"""Zero-shot accuracy (lm-eval, local ARC-e/c, PIQA, Winogrande) of the float model or one quantized cell.

    python benchmarks/zeroshot_cells.py --method float --out reports/zeroshot_smollm2_float.json
    python benchmarks/zeroshot_cells.py --method rtn --bits 3 --out reports/zeroshot_smollm2_w3_rtn.json
    python benchmarks/zeroshot_cells.py --method magr+optq --bits 3 --out reports/zeroshot_smollm2_w3_magr_optq.json

Quantizes in memory (no re-save) with C4 calibration, then scores the full sets (or --limit items).
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from magr.pipeline.calibration_data import get_calibration
from magr.core.methods import PRESETS, QuantConfig
from magr.pipeline.models import load_model
from magr.pipeline.persistence import write_json
from magr.pipeline.blocks import quantize_model
from magr.evaluation.zeroshot import TASKS, evaluate_zeroshot, results_table


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="float", choices=("float", *PRESETS), help="float or a method preset")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model, tok = load_model(args.model)
    meta = {k: v for k, v in vars(args).items() if k != "out"}
    meta.update(machine=f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads")
    if args.method != "float":
        calib = get_calibration(args.calib, tok, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
        res = quantize_model(model, calib, QuantConfig.build(method=args.method, bits=args.bits), device="cpu")
        meta.update(config=res.config.to_dict(), quantize_s=res.seconds)
    t0 = time.perf_counter()
    results = evaluate_zeroshot(model, tok, tasks=args.tasks, limit=args.limit, batch_size=args.batch_size, device="cpu")
    meta["zeroshot_s"] = time.perf_counter() - t0
    write_json(args.out, {"meta": meta, "results": results})  # strict JSON (NaN -> null), atomic
    print(results_table(results))
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
