"""Perplexity of every (method, bits) cell on one model, with wall times: the pipeline's acceptance grid.

    # stories260K, TinyStories calibration and evaluation (512-token windows, BOS per window)
    python benchmarks/method_grid.py --model stories260k --calib tinystories --nsamples 64 --seqlen 512 \
        --eval tinystories --eval-split heldout --eval-seqlen 512 --bos-per-window --bits 4 3 2 \
        --out reports/grid_stories260k
    # SmolLM2-135M on the CPU
    python benchmarks/method_grid.py --model smollm2-135m --calib c4 --nsamples 32 --seqlen 512 \
        --eval wikitext2 c4 --eval-seqlen 2048 --bits 4 3 --methods rtn optq magr+optq --out reports/grid_smollm2

Each cell starts from a fresh copy of the float model; writes OUT.json and OUT.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import time
from pathlib import Path

import torch

from magr.pipeline.calibration_data import get_calibration
from magr.pipeline.data import get_eval_tokens
from magr.core.methods import PRESETS, QuantConfig
from magr.pipeline.blocks import quantize_model
from magr.evaluation.perplexity import perplexity
from magr.pipeline.models import load_model
from magr.pipeline.persistence import write_json


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="stories260k")
    ap.add_argument("--calib", default="tinystories")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval", nargs="+", default=["tinystories"])
    ap.add_argument("--eval-split", default=None, help="split for every eval set (default: the set's own)")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--bos-per-window", action="store_true")
    ap.add_argument("--bits", nargs="+", type=int, default=[4, 3, 2])
    ap.add_argument("--methods", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None, help="MagR solver iterations (default: the solver's)")
    ap.add_argument("--solver", default="fista", choices=("fista", "ista"))
    ap.add_argument("--no-float", action="store_true", help="skip the float baseline row")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (model, quantization and evaluation)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    model, tok = load_model(args.model, device=args.device)
    calib = get_calibration(args.calib, tok, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    evals = {}
    for name in args.eval:
        kw = {"split": args.eval_split} if args.eval_split else {}
        evals[name] = get_eval_tokens(name, tok, **kw)
    bos = tok.bos_token_id if args.bos_per_window else None

    def ppls(m):
        return {n: perplexity(m, t, seqlen=args.eval_seqlen, max_windows=args.max_windows, bos_id=bos,
                              progress=False) for n, t in evals.items()}

    def write():
        meta = {k: v for k, v in vars(args).items() if k != "out"}
        meta.update(machine=(torch.cuda.get_device_name() if args.device == "cuda"
                             else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"), torch=torch.__version__)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out.with_suffix(".json"), {"meta": meta, "rows": rows})  # strict JSON (NaN -> null), atomic
        names = list(evals)
        lines = [f"# {args.model}: perplexity by method and bits", "",
                 f"Calibration: {args.nsamples} x {args.seqlen} tokens of {args.calib} (seed {args.seed}); "
                 f"evaluation: {', '.join(names)} in {args.eval_seqlen}-token windows"
                 f"{' (BOS per window)' if args.bos_per_window else ''}"
                 f"{f', first {args.max_windows} windows' if args.max_windows else ''}"
                 f"{f', split {args.eval_split}' if args.eval_split else ''}; per channel"
                 f"{f', group {args.group_size}' if args.group_size else ''};"
                 f" MagR solver {args.solver} ({args.iters or 'default'} iterations); "
                 f"{meta['machine']}.", "",
                 "| method | bits | " + " | ".join(f"{n} ppl" for n in names) + " | quantize s | eval s |",
                 "|---|---|" + "---|" * len(names) + "---|---|"]
        for r in rows:
            lines.append(f"| {r['method']} | {r['bits']} | " + " | ".join(f"{r['ppl'][n]:.3f}" for n in names)
                         + f" | {r['quant_s']:.1f} | {r['eval_s']:.1f} |")
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        return lines

    rows = []
    t0 = time.perf_counter()
    if not args.no_float:
        rows.append({"method": "float", "bits": 16, "ppl": ppls(model), "quant_s": 0.0,
                     "eval_s": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), flush=True)
    for bits in args.bits:
        for method in args.methods:
            m = copy.deepcopy(model)
            cfg = QuantConfig.build(method=method, bits=bits, group_size=args.group_size, iters=args.iters,
                                    solver=args.solver)
            t1 = time.perf_counter()
            res = quantize_model(m, calib, cfg, device=args.device, progress=False)
            t2 = time.perf_counter()
            row = {"method": method, "bits": bits, "ppl": ppls(m), "quant_s": t2 - t1,
                   "eval_s": time.perf_counter() - t2, "config": res.config.to_dict()}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "config"}), flush=True)
            write()  # keep what is done if the run is interrupted
            del m
    lines = write()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
