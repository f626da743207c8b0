"""Table-4 analogue: per-block wall time of RTN, OPTQ, MagR+OPTQ and MagR+OPTQ-dagger.

A randomly initialised model with the LLaMA-2-7B configuration (hidden 4096, intermediate 11008, 32 heads)
but only ``--layers`` decoder blocks, in fp16, is quantized with 128 x 2048 random-token calibration (the
paper's size). Per-block times are measured and extrapolated to 32 blocks (labelled as such). Random
weights and tokens make the timings representative (the work does not depend on the values) but the
errors meaningless, so only times are reported.

    python benchmarks/table4_runtime.py --layers 2 --out reports/table4_gpu      # on a GPU
    python benchmarks/table4_runtime.py --tiny                                   # CPU smoke run
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from magr.core.methods import QuantConfig
from magr.reproduction.paper import PAPER_RUNTIME_7B_MIN
from magr.pipeline.persistence import write_json
from magr.pipeline.blocks import quantize_model

METHODS = [  # (label, method, bits, cd passes)
    ("RTN (W3)", "rtn", 3, None),
    ("OPTQ (W3)", "optq", 3, None),
    ("MagR+OPTQ (W3)", "magr+optq", 3, None),
    ("MagR+OPTQ-dagger (W2, 30 CD passes)", "magr+optq-cd", 2, 30),
]


def build_model(layers: int, tiny: bool, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=172, num_attention_heads=4, num_key_value_heads=4,
                          num_hidden_layers=layers, vocab_size=512, max_position_embeddings=2048)
    else:  # LLaMA-2-7B
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                          num_key_value_heads=32, num_hidden_layers=layers, vocab_size=32000,
                          max_position_embeddings=4096, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2, help="decoder blocks to build and time (default 2)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--methods", nargs="*", default=None, help="subset of method labels' method names")
    ap.add_argument("--solver", default="fista", choices=("fista", "ista"), help="MagR solver")
    ap.add_argument("--tiny", action="store_true", help="tiny CPU smoke configuration")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    if args.tiny:
        args.nsamples, args.seqlen = min(args.nsamples, 4), min(args.seqlen, 64)
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    print(f"device: {device} ({name}); torch {torch.__version__}; dtype {dtype}; blocks {args.layers}; "
          f"calibration {args.nsamples} x {args.seqlen} random tokens; MagR solver {args.solver}")
    rows = []
    for label, method, bits, passes in METHODS:
        if args.methods and method not in args.methods:
            continue
        model = build_model(args.layers, args.tiny, dtype, device)
        vocab = model.config.vocab_size
        calib = torch.randint(0, vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
        cfg = QuantConfig.build(method=method, bits=bits, cd_passes=passes, solver=args.solver)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = quantize_model(model, calib, cfg, device=device, progress=False)
        total = time.perf_counter() - t0
        blocks = res.block_seconds
        per_layer = {}
        for r in res.records:
            per_layer.setdefault(r["layer"], []).append(r["seconds"])
        row = {"method": label, "block_seconds": blocks, "mean_block_s": sum(blocks) / len(blocks),
               "total_s": total, "extrapolated_32_blocks_min": 32 * sum(blocks) / len(blocks) / 60,
               "magr_s_per_block": sum(r["seconds_magr"] for r in res.records) / len(blocks),
               "quant_s_per_block": sum(r["seconds_quant"] for r in res.records) / len(blocks),
               "cd_s_per_block": sum(r["seconds_refine"] for r in res.records) / len(blocks),
               "per_layer_mean_s": {k: sum(v) / len(v) for k, v in per_layer.items()}}
        row["other_s_per_block"] = row["mean_block_s"] - row["magr_s_per_block"] - row["quant_s_per_block"] - row["cd_s_per_block"]
        row["cd_over_quantizer"] = row["cd_s_per_block"] / row["quant_s_per_block"] if row["quant_s_per_block"] else None
        rows.append(row)
        print(f"{label:40s} blocks {', '.join(f'{b:.1f}' for b in blocks)} s; mean {row['mean_block_s']:.2f} s/block "
              f"(MagR {row['magr_s_per_block']:.2f}, quantizer {row['quant_s_per_block']:.2f}, "
              f"CD {row['cd_s_per_block']:.2f}, other {row['other_s_per_block']:.2f}); "
              f"x32 blocks = {row['extrapolated_32_blocks_min']:.1f} min (extrapolated)", flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    meta = {"device": name, "torch": torch.__version__, "dtype": str(dtype), "blocks_measured": args.layers,
            "calibration": f"{args.nsamples} x {args.seqlen} random tokens", "magr_solver": args.solver,
            "model": "random-init LLaMA-2-7B configuration" if not args.tiny else "tiny smoke config"}
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out.with_suffix(".json"), {"meta": meta, "rows": rows})  # strict JSON (NaN -> null), atomic
        lines = [f"# Table 4 analogue: runtime on {name}", "",
                 f"Model: {meta['model']}, {meta['dtype']}, {args.layers} blocks measured; calibration {meta['calibration']}; "
                 f"MagR solver: {args.solver}. 32-block figures are **extrapolated** (mean block time x 32), "
                 "embedding/capture time excluded.", "",
                 "Per block: MagR, the quantizer (RTN / OPTQ), coordinate descent (CD) and the rest (forward passes, "
                 "statistics); CD / quantizer is the ratio of their times.", "",
                 "| method | mean s / block | MagR s / block | quantizer s / block | CD s / block | other s / block | "
                 "CD / quantizer | 32 blocks (extrapolated) |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            ratio = f"{r['cd_over_quantizer']:.2f}" if r["cd_over_quantizer"] and r["cd_s_per_block"] else "-"
            lines.append(f"| {r['method']} | {r['mean_block_s']:.2f} | {r['magr_s_per_block']:.2f} | "
                         f"{r['quant_s_per_block']:.2f} | {r['cd_s_per_block']:.2f} | {r['other_s_per_block']:.2f} | "
                         f"{ratio} | {r['extrapolated_32_blocks_min']:.1f} min |")
        lines += ["", "Paper (LLaMA-2-7B, one A100, 32 blocks, Table 4): "
                  + ", ".join(f"{m} {v} min" for m, v in PAPER_RUNTIME_7B_MIN.items()) + "."]
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
