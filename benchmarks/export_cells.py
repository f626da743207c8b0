"""Round trip of exported checkpoints through the third-party loaders on this CPU (issue 12).

    python benchmarks/export_cells.py --profile smollm2 --out reports/export_smollm2      # W4/W3/W2 cells
    python benchmarks/export_cells.py --profile stories260k --out reports/export_stories260k  # bits x sym

For every cell: quantize it into runs/export[-stories]/<cell> unless that run folder exists (magr quantize
with the profile's settings, model saved), count its grids whose zero point is outside [0, 2^b - 1] (what
Grid(clamp_zero=True) would clamp) or 0 (what GPTQ v1 cannot hold), then for each format: export it, measure
the checkpoint's size on disk and that of its linear layers' tensors (vs 2 bytes per weight in fp16), reload
it with transformers (float16 for GPTQ, whose kernels take no float32; float32 for compressed-tensors) (GPTQ: gptqmodel's default CPU kernel, its torch kernel for stories260K
and for 4-bit per-channel grids, where the default one fails; compressed-tensors de-quantized on load), compare the codes, zero points and scales the loader unpacks with ours, and measure perplexity
(vs the run's in-memory float32 perplexity) and greedy decoding speed (tokens/s: median and range of
``--repeats`` generations of ``--new-tokens`` tokens after a 16-token prompt, one warm-up first).
Writes OUT.json and OUT.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch

from magr.pipeline.calibration_data import Calibration
from magr.evaluation.perplexity import Evaluation
from magr.deploy.export import FORMATS, Export, export_run, model_codes
from magr.core.methods import QuantConfig
from magr.pipeline.models import load_model
from magr.pipeline.persistence import load_quant_params, read_run
from magr.deploy.reload import compare_grids, load_exported, loaded_weights, reloaded_grids
from magr.runs import quantize_run

SMOLLM2_COMMON = {"iters": 14, "feature_source": "last_sample"}
PROFILES = {
    # the embedded profile's settings (params.yaml): 4 x 512 C4 calibration, 4 x 512-token perplexity windows
    "smollm2": {
        "model": "smollm2-135m", "runs": "runs/export", "true_sequential": False, "gptq_backend": None,
        "calibration": Calibration(calib="c4", nsamples=4, seqlen=512, seed=0),
        "evaluation": Evaluation(eval_sets=("wikitext2", "c4"), eval_seqlen=512, max_windows=4),
        "cells": {
            "w4-magr-optq": {"method": "magr+optq", "bits": 4}, "w4-optq": {"method": "optq", "bits": 4},
            "w3-magr-optq": {"method": "magr+optq", "bits": 3}, "w2-optq": {"method": "optq", "bits": 2},
            "w2-optq-clamp": {"method": "optq", "bits": 2, "clamp_zero": True},  # w2-optq: a zero point of 4
            "x-w4g32-rtn-sym": {"method": "rtn", "bits": 4, "group_size": 32, "sym": True},
            "w3g64-magr-optq": {"method": "magr+optq", "bits": 3, "group_size": 64},
            "x-w8-rtn-sym": {"method": "rtn", "bits": 8, "sym": True},
            "x-w2g64-rtn": {"method": "rtn", "bits": 2, "group_size": 64},
            "w3-optq": {"method": "optq", "bits": 3},
        },
        "count_only": {  # the other beta < 1 cells of params.yaml: zero points counted, not exported
            "w3-rtn": {"method": "rtn", "bits": 3}, "w3-magr-rtn": {"method": "magr+rtn", "bits": 3},
            "w2-magr-optq-cd": {"method": "magr+optq-cd", "bits": 2},
        },
    },
    # stories260K: widths 64 and 172, so per channel only (no group size of 16..1024 divides 172)
    "stories260k": {
        # gptqmodel's default 4-bit CPU kernel (torch_fused) needs widths divisible by 16: its torch kernel here
        "model": "stories260k", "runs": "runs/export-stories", "true_sequential": True, "gptq_backend": "torch",
        "calibration": Calibration(calib="tinystories", nsamples=8, seqlen=128, seed=0),
        "evaluation": Evaluation(eval_sets=("tinystories",), eval_seqlen=256, max_windows=8),
        "cells": {f"w{b}-magr-optq{'-sym' if s else ''}": {"method": "magr+optq", "bits": b, "sym": s, "iters": 20}
                  for b in (2, 3, 4, 8) for s in (False, True)},
        "count_only": {},
    },
}


def ensure_run(profile: dict, name: str, settings: dict) -> Path:
    folder = Path(profile["runs"]) / name
    if not (folder / "magr_run.json").is_file() or "config" not in read_run(folder):
        shutil.rmtree(folder, ignore_errors=True)
        settings = {**(SMOLLM2_COMMON if profile["model"] == "smollm2-135m" else {}), **settings}
        quant = QuantConfig.build(true_sequential=profile["true_sequential"], **settings)
        quantize_run(profile["model"], folder, quant, profile["calibration"], profile["evaluation"], device="cpu")
    return folder


def zero_counts(folder: Path) -> dict:
    params = load_quant_params(folder)
    maxq = next(iter(params.values())).maxq
    zeros = torch.cat([p.zero.flatten() for p in params.values()])
    return {"grids": zeros.numel(), "zero_above_max": int((zeros > maxq).sum()), "zero_is_0": int((zeros == 0).sum()),
            "beta": read_run(folder)["config"]["grid"]["beta"]}


def linear_bytes(folder: Path, layers: set[str]) -> tuple[int, int]:
    """(bytes of the quantized layers' tensors, bytes of every tensor) in the folder's weight files."""
    from magr.pipeline.shards import TensorFiles

    files = TensorFiles.of_folder(folder)
    lin = files.nbytes([key for key in files.names() if key.rsplit(".", 1)[0] in layers])
    return lin, files.nbytes()


@torch.no_grad()
def decode_speed(model, tokenizer, new_tokens: int, repeats: int) -> dict:
    prompt = tokenizer("Once upon a time, in a small village by the sea,", return_tensors="pt").input_ids[:, :16]
    gen = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens, pad_token_id=0)
    model.generate(prompt, **{**gen, "min_new_tokens": 4, "max_new_tokens": 4})  # warm-up (kernel compilation)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.generate(prompt, **gen)
        rates.append(new_tokens / (time.perf_counter() - t0))
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "repeats": repeats}


def measure(profile: dict, name: str, folder: Path, fmt: str, out_root: Path, args) -> dict:
    row = {"cell": name, "format": fmt}
    target = out_root / f"{name}-{fmt}"
    shutil.rmtree(target, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        export_run(folder, target, Export(fmt))
        row["export_s"] = time.perf_counter() - t0
    except ValueError as exc:
        return {**row, "refused": str(exc)}
    run = read_run(folder)
    model, tok = load_model(str(folder))
    params = load_quant_params(folder)
    ours = model_codes(model, params)
    n_weights = sum(lc.codes.numel() for lc in ours.values())
    lin, tensors = linear_bytes(target, set(ours))
    row.update(checkpoint_bytes=sum(p.stat().st_size for p in target.iterdir()), tensor_bytes=tensors,
               linear_bytes=lin, linear_fp16_bytes=2 * n_weights, linear_ratio=lin / (2 * n_weights),
               gptq_version=json.loads((target / "config.json").read_text())["quantization_config"].get(
                   "checkpoint_format"))
    del model
    grid = run["config"]["grid"]
    # gptqmodel's default 4-bit CPU kernel (torch_fused) fails at the first forward for per-channel grids
    # (torch's int4 matmul takes groups of 32..256 only): its torch kernel for those
    per_channel_w4 = grid["bits"] == 4 and grid["group_size"] is None
    # GPTQ kernels take float16 (or bfloat16) only; de-quantized compressed-tensors run in float32 here, as
    # float16 matmuls are ~10x slower on this CPU
    reloaded = load_exported(target, dtype=torch.float16 if fmt == "gptq" else torch.float32,
                             gptq_backend=profile["gptq_backend"] or ("torch" if per_channel_w4 else None))
    row["kernel"] = type(next(m for n, m in reloaded.named_modules() if n.endswith("q_proj"))).__name__
    row.update(compare_grids(ours, reloaded_grids(target, reloaded), loaded_weights(reloaded)))
    if args.no_eval:  # sizes and exact codes only
        return row
    evaluation = profile["evaluation"]
    if args.eval_sets:
        evaluation = Evaluation(tuple(args.eval_sets), evaluation.eval_seqlen, evaluation.eval_batch,
                                evaluation.max_windows)
    ppl = evaluation.perplexities(reloaded, tok, "cpu")
    row["reload_dtype"] = str(next(reloaded.parameters()).dtype)
    row["ppl_memory"] = {k: run["ppl"][k]["ppl"] for k in ppl}
    row["ppl_reload"] = {k: v["ppl"] for k, v in ppl.items()}
    row["ppl_rel_gap"] = {k: ppl[k]["ppl"] / run["ppl"][k]["ppl"] - 1 for k in ppl}
    row["prefill_tok_s"] = {k: v["max_windows"] * v["seqlen"] / v["seconds"] for k, v in ppl.items()}
    row["decode_tok_s"] = decode_speed(reloaded, tok, args.new_tokens, args.repeats)
    if not args.keep:
        shutil.rmtree(target)
    return row


def float_row(profile: dict, args) -> dict:
    model, tok = load_model(profile["model"], dtype=torch.float16)
    return {"cell": "float", "format": "float16", "kernel": "Linear",
            "decode_tok_s": decode_speed(model, tok, args.new_tokens, args.repeats)}


def fmt_size(n: int) -> str:
    return f"{n / 2**20:.2f}"


def markdown(result: dict) -> str:
    """The tables of OUT.md; a GPTQ checkpoint written as gptq_v2 (a zero point of 0) is marked (v2)."""
    lines = [f"## Exported checkpoints: {result['model']} round trip on this CPU", "",
             "| cell | bits | group | sym | format | kernel | checkpoint MiB | linear MiB (fp16 MiB, ratio) | codes = ours "
             "| scales = fp16(ours) | max weight diff (steps) | ppl in memory | ppl reloaded | gap | decode tok/s "
             "(median, range) |", "|" + "---|" * 15]
    for r in result["rows"]:
        g = result["grids"].get(r["cell"])
        head = f"| {r['cell']} | " + (f"{g['bits']} | {g['group_size'] or 'channel'} | {'yes' if g['sym'] else 'no'}"
                                      if g else "- | - | -") + f" | {r['format']}" \
            + (" (v2)" if r.get("gptq_version") == "gptq_v2" else "") + " |"
        if "refused" in r:
            lines.append(head + f" refused: {r['refused'][:90]}... |" + " |" * 9)
            continue
        sp = r.get("decode_tok_s")
        speed = f"{sp['median']:.1f} ({sp['min']:.1f}-{sp['max']:.1f})" if sp else "not measured"
        if r["cell"] == "float":
            lines.append(head + " Linear |" + " - |" * 8 + f" {speed} |")
            continue
        mem = ", ".join(f"{v:.3f}" for v in r.get("ppl_memory", {}).values()) or "-"
        rel = ", ".join(f"{v:.3f}" for v in r.get("ppl_reload", {}).values()) or "not measured"
        gap = ", ".join(f"{100 * g:+.3f}%" for g in r.get("ppl_rel_gap", {}).values()) or "-"
        exact = "yes" if r["codes"] and r["zero"] and r["g_idx"] else "NO"
        lines.append(head + f" {r['kernel']} | {fmt_size(r['checkpoint_bytes'])} | {fmt_size(r['linear_bytes'])} "
                     f"({fmt_size(r['linear_fp16_bytes'])}, {r['linear_ratio']:.4f}) | {exact} | "
                     f"{'yes' if r['scale_equals_fp16_of_ours'] else 'NO'} | {r['weight_max_diff_in_steps']:.4f} | "
                     f"{mem} | {rel} | {gap} | {speed} |")
    gaps = [abs(g) for r in result["rows"] if "ppl_rel_gap" in r for g in r["ppl_rel_gap"].values()]
    lines += ["", f"Largest perplexity gap (reloaded vs in memory): {100 * max(gaps):.4f}% over "
              f"{len(gaps)} (cell, format, set) pairs." if gaps else "", "",
              "Zero points outside [0, 2^b - 1] (what `--clamp-zero` changes) and equal to 0 (not storable in GPTQ v1), "
              "per cell:", "", "| cell | beta | grids | zero > 2^b - 1 | zero = 0 |", "|---|---:|---:|---:|---:|"]
    for cell, z in result["zero_counts"].items():
        lines.append(f"| {cell} | {z['beta']} | {z['grids']} | {z['zero_above_max']} | {z['zero_is_0']} |")
    lines += ["", f"Settings: {result['settings']}. Machine: {result['machine']}."]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=tuple(PROFILES), default="smollm2")
    ap.add_argument("--cells", nargs="*", default=None, help="a subset of the profile's cells")
    ap.add_argument("--formats", nargs="*", default=list(FORMATS), choices=FORMATS)
    ap.add_argument("--eval-sets", nargs="*", default=None,
                    help="perplexity sets of the reloaded models (default: the profile's; a subset saves time)")
    ap.add_argument("--no-eval", action="store_true",
                    help="no perplexity and no speed of the reloaded models: sizes and exact codes only")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the exported folders (runs/export-ckpt/<OUT name>/)")
    ap.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    ap.add_argument("--resume", action="store_true", help="keep the rows of an existing OUT.json, measure the rest")
    args = ap.parse_args()
    profile = PROFILES[args.profile]
    chosen = lambda d: {k: v for k, v in d.items() if args.cells is None or k in args.cells}  # noqa: E731
    cells = chosen(profile["cells"])
    out_root = Path("runs/export-ckpt") / Path(args.out).name
    old = json.loads(Path(args.out + ".json").read_text()) if args.resume else {"rows": [], "grids": {},
                                                                                 "zero_counts": {}}
    done = {(r["cell"], r["format"]): r for r in old["rows"]}
    rows = [done.pop(("float", "float16"), None) or float_row(profile, args)]
    grids, counts = old["grids"], old["zero_counts"]
    for name, settings in {**cells, **chosen(profile["count_only"])}.items():
        folder = ensure_run(profile, name, settings)
        grids[name] = read_run(folder)["config"]["grid"]
        counts[name] = zero_counts(folder)
        for fmt in args.formats if name in cells else ():
            rows.append(done.pop((name, fmt), None) or measure(profile, name, folder, fmt, out_root, args))
            print(json.dumps(rows[-1], default=str), flush=True)
            write(args, profile, rows + list(done.values()), grids, counts)  # after every row: --resume
    print(write(args, profile, rows + list(done.values()), grids, counts))


def write(args, profile: dict, rows: list, grids: dict, counts: dict) -> str:
    result = {"model": profile["model"], "rows": rows, "grids": grids, "zero_counts": counts,
              "settings": {"calibration": str(profile["calibration"]), "evaluation": str(profile["evaluation"]),
                           "true_sequential": profile["true_sequential"], "new_tokens": args.new_tokens,
                           "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
                           "reload_eval_sets": args.eval_sets or "the profile's"},
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                         "shared with other jobs (speeds are indicative)"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    Path(args.out + ".md").write_text(markdown(result))
    return markdown(result)


if __name__ == "__main__":
    main()
