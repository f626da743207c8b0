"""MagR solvers on every layer of SmolLM2-135M (issue 19): objective and seconds per layer group.

    python benchmarks/smollm2_features.py --out /tmp/smollm2_H.pt          # once: weights + last-window X
    python benchmarks/bench_magr_layers.py --features /tmp/smollm2_H.pt --out results.json
    python benchmarks/bench_magr_layers.py --render results.json --md reports/magr_solver.md   # the report's table

For all 30 blocks x {qkv, o, gateup, down} per channel (alpha 1e-3) and for the blocks of ``--g64-blocks``
per group of 64 (alpha 1e-4), runs the reference (the released procedure: :func:`magr.core.solver.magr_ista`, 200
iterations, sort projection, exact lambda) and each variant on the stacked rows of the group, and reports
F_variant / F_ista200 per LAYER (q, k, v, ... separately; F in float64 with H / lambda_max(H) exact), its worst
and mean over all layers, and the whole-model seconds per variant (one thread; fast variants timed
``--repeats`` times back to back, group by group; the reference once, or its F and seconds read from
``--ref-cache`` when an earlier run wrote them).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from magr.core.fista import _row_objectives, magr_fista
from magr.core.solver import lambda_max, magr_ista
from magr.core.spg import magr_spg

GROUPS = ("qkv", "o", "gateup", "down")


def ista200(W, H, X, alpha, gs):
    return magr_ista(W, H, alpha, 200, gs, projection="sort", lambda_method="eigh")


def fista(iters, precision="fp32"):
    return lambda W, H, X, alpha, gs: magr_fista(W, H, alpha, iters, gs, precision=precision)


def spg(iters, precision="bf16", lowrank=True, **kw):
    return lambda W, H, X, alpha, gs: magr_spg(W, H, alpha, iters, gs, precision=precision,
                                               features=X if lowrank else None, **kw)


VARIANTS = {
    "fista14": fista(14), "fista48": fista(48), "fista14-bf16": fista(14, "bf16"),
    **{f"spg{k}-bf16-lr": spg(k) for k in (6, 8, 10, 12, 16, 18, 20, 24)},  # bf16 operands, (D X^T) X for down
    **{f"spg{k}-bf16": spg(k, "bf16", False) for k in (8, 12, 16)},  # bf16 operands, D H everywhere
    **{f"spg{k}-fp32": spg(k, "fp32", False) for k in (8, 12, 16)},
    # without backtracking (a rejected row retries with step 1) and with a larger largest step
    **{f"spg{k}-bf16-lr-nobt": spg(k, backtrack=0.0, step_max=1e3) for k in (8, 10, 12, 16)},
}


def render(results: dict, source: str) -> str:
    """reports/magr_solver.md: per variant and setting, the worst and mean F / F_ista200 over the layers measured,
    the layers above 1 and the seconds (one thread, relative to FISTA 14 in the same run)."""
    lines = ["# MagR's solver against the released 200 ISTA iterations (SmolLM2-135M)", "",
             "`python benchmarks/bench_magr_layers.py --render benchmarks/results/smollm2-magr-layers-all30.json "
             "benchmarks/results/smollm2-magr-layers.json --md reports/magr_solver.md`", "",
             f"From {source} (measured by "
             "`benchmarks/smollm2_features.py` + `bench_magr_layers.py`, commands in benchmarks/NOTES.md; "
             f"{results['machine']}, {results['threads']} thread, torch {results['torch']}).", "",
             "F = paper eq. (3) per layer (float64, H / lambda_max(H) exact; X = the last 512-token C4 window of the "
             "float model), per output row summed over the layer; ratio < 1: lower (better) than the released "
             "procedure (`magr_ista`, 200 iterations, sort projection). Rows of the layers sharing an input are "
             "solved stacked, as the pipeline does. Per channel alpha 1e-3, per group of 64 alpha 1e-4. Seconds: "
             "summed over the blocks measured, each repeat in one run; 'vs FISTA 14' is the ratio to FISTA 14 in "
             "the same repeat. The default profile runs `spg20-bf16-lr` (solver spg, 20 iterations, precision "
             "bf16, the factored gradient (D X^T) X for down_proj).", "",
             "| setting | variant | blocks | layers | worst F / F_ista200 | mean | layers above 1 | seconds | vs FISTA 14 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, v in results["summary"].items():
        tag, name = key.split("/", 1)
        n = sum(1 for r in results["layers"] if r["setting"] == tag)
        secs = " / ".join(f"{x:.1f}" for x in v["seconds"])
        rel = " / ".join(f"{x:.2f}" for x in v["seconds_vs_fista14"]) or "-"
        if name == "ista200":
            lines.append(f"| {tag} | ista200 (reference) | {len(v['blocks'])} | {n} | 1 | 1 | - | {secs} (mixed threads, "
                         "loaded machine: not comparable) | - |")
            continue
        lines.append(f"| {tag} | {name} | {len(v['blocks'])} | {n} | {v['worst_ratio']:.4f} | {v['mean_ratio']:.4f} | "
                     f"{v['layers_above_1']} | {secs} | {rel} |")
    blocks = sorted({r["block"] for r in results["layers"] if r["setting"] == "channel"})
    g64 = sorted({r["block"] for r in results["layers"] if r["setting"] != "channel"})
    lines += ["", f"Blocks measured per channel: {', '.join(map(str, blocks))} (of 0-29; every layer shape of the "
              "model)" + (f"; per group of 64: {', '.join(map(str, g64))}" if g64 else "") + "."]
    above = [f"{n} {r['setting']} block {r['block']} {r['layer']} {r['ratio'][n]:.4f}"
             for r in results["layers"] for n in r["ratio"] if r["ratio"][n] > 1 and "fista14" not in n]
    if above:
        lines += ["", "Layers above the reference (FISTA 14 aside): " + "; ".join(above) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", default="/tmp/smollm2_H.pt")
    ap.add_argument("--out", help="JSON output path")
    ap.add_argument("--render", nargs="+", default=None, help="only write --md from these earlier JSON outputs")
    ap.add_argument("--md", default=None, help="Markdown table (with --render)")
    ap.add_argument("--variants", default="fista14,fista48,spg10-bf16-lr,spg12-bf16-lr,spg16-bf16-lr,spg12-bf16,spg12-fp32")
    ap.add_argument("--blocks", default="all", help="per-channel blocks: 'all' or comma list")
    ap.add_argument("--g64-blocks", default="0,15,29", help="blocks also run per group of 64 ('' for none)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ref-cache", default=None, help="JSON file of the reference's per-layer F (read if present, "
                                                      "else written): the reference is deterministic and slow")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ref-threads", type=int, default=None, help="threads for the (slow) reference only")
    args = ap.parse_args(argv)
    if args.render:
        parts = []
        for i, path in enumerate(args.render):
            with open(path) as f:
                part = render(json.load(f), path)
            parts.append(part if i == 0 else part.split("\n", 4)[4])  # one title and command
        text = "\n".join(parts)
        if args.md:
            with open(args.md, "w") as f:
                f.write(text)
        print(text)
        return
    if not args.out:
        ap.error("--out is required (or --render JSON)")
    torch.set_num_threads(args.threads)
    names = [n for n in args.variants.split(",") if n]
    data = torch.load(args.features)
    blocks = data["blocks"]
    chan = range(len(blocks)) if args.blocks == "all" else [int(b) for b in args.blocks.split(",")]
    g64 = [int(b) for b in args.g64_blocks.split(",")] if args.g64_blocks else []
    settings = [(None, 1e-3, chan), (64, 1e-4, g64)]
    cache = {}
    if args.ref_cache and os.path.exists(args.ref_cache):
        with open(args.ref_cache) as f:
            cache = json.load(f)
    rows_out = []  # one per layer
    seconds = {}  # (setting, variant) -> list of per-repeat totals
    for gs, alpha, blist in settings:
        tag = "channel" if gs is None else f"g{gs}"
        for n in ["ista200"] + names:
            seconds[(tag, n)] = [0.0] * (1 if n == "ista200" else args.repeats)
        for b in blist:
            for g in GROUPS:
                ws = blocks[b][g]["weights"]
                W = torch.cat(list(ws.values()))
                X = blocks[b][g]["X"]
                H = X.T @ X
                Hn = H.double() / lambda_max(H.double())
                split = [w.shape[0] for w in ws.values()]
                F = {}
                key = f"{tag}/{b}/{g}"
                if key in cache:
                    F["ista200"] = cache[key]["F"]
                    seconds[(tag, "ista200")][0] += cache[key]["seconds"]
                for rep in range(args.repeats):
                    for n in (["ista200"] if rep == 0 and key not in cache else []) + names:
                        fn = ista200 if n == "ista200" else VARIANTS[n]
                        torch.set_num_threads(args.ref_threads or args.threads if n == "ista200" else args.threads)
                        t = time.perf_counter()
                        out = fn(W, H, X, alpha, gs)
                        dt = time.perf_counter() - t
                        seconds[(tag, n)][rep] += dt
                        if n == "ista200":
                            ista_seconds = dt
                        if rep == 0:
                            F[n] = [float(x.sum()) for x in torch.split(_row_objectives(out, W, Hn, alpha, gs), split)]
                if key not in cache:
                    cache[key] = {"F": F["ista200"], "seconds": ista_seconds}
                    if args.ref_cache:
                        with open(args.ref_cache, "w") as f:
                            json.dump(cache, f)
                for i, lname in enumerate(ws):
                    row = {"setting": tag, "block": b, "group": g, "layer": lname, "F_ista200": F["ista200"][i],
                           "ratio": {n: F[n][i] / F["ista200"][i] for n in names}}
                    rows_out.append(row)
                print(f"{tag} block {b:2d} {g:6s} " + " ".join(
                    f"{n}={max(F[n][i] / F['ista200'][i] for i in range(len(split))):.4f}" for n in names), flush=True)
    summary = {}
    print(f"\n{'setting':8s} {'variant':16s} {'seconds (repeats)':>26s} {'vs fista14':>10s} {'worst F/F_ista200':>18s} {'mean':>8s} layers>1")
    for gs, alpha, blist in settings:
        tag = "channel" if gs is None else f"g{gs}"
        if not blist:
            continue
        for n in ["ista200"] + names:
            s = seconds[(tag, n)]
            rats = [r["ratio"][n] for r in rows_out if r["setting"] == tag] if n != "ista200" else [1.0]
            rel = ([a / b for a, b in zip(s, seconds[(tag, "fista14")])] if "fista14" in names and n != "ista200"
                   else [])
            summary[f"{tag}/{n}"] = {"seconds": s, "seconds_vs_fista14": rel, "worst_ratio": max(rats),
                                     "mean_ratio": statistics.mean(rats), "layers_above_1": sum(r > 1 for r in rats),
                                     "blocks": list(blist)}
            print(f"{tag:8s} {n:16s} {' / '.join(f'{x:.2f}' for x in s):>26s} "
                  f"{' / '.join(f'{x:.2f}' for x in rel):>10s} {max(rats):18.4f} {statistics.mean(rats):8.4f} "
                  f"{sum(r > 1 for r in rats)}")
    with open(args.out, "w") as f:
        json.dump({"features": args.features, "threads": args.threads, "ref_threads": args.ref_threads or args.threads, "torch": torch.__version__,
                   "machine": platform.processor() or platform.machine(), "summary": summary, "layers": rows_out},
                  f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
