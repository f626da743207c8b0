"""Command line: ``magr quantize``, ``magr ppl`` and ``magr zeroshot``.

Examples::

    magr quantize --model stories260k --method magr+optq --bits 3 --calib tinystories \
        --nsamples 32 --seqlen 256 --out runs/s260k-w3 --eval tinystories
    magr ppl --model runs/s260k-w3 --data wikitext2 c4 --eval-seqlen 2048
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path


from .driver import FEATURE_SOURCES, MAGR_SOLVERS, METHODS, QuantConfig
from .models import DTYPES
from .quantizers import SUPPORTED_BITS

log = logging.getLogger("magr")


def _group_size(text: str):
    if text.lower() in ("none", "channel", "per-channel", "-1", "0"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size {text!r} is not an integer or 'channel'")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"group size {value} must be positive (or 'channel')")
    return value


def _write_json(path: str, obj) -> None:
    """Write `obj` as JSON to `path`, creating its folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="hub id, local folder, or alias: smollm2-135m (embedded GGUF), stories260k (../shared)")
    p.add_argument("--data-root", default=None,
                   help="folder with the offline data (default: $MAGR_SHARED/data or ../shared/data)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES),
                   help="parameter dtype of the loaded model (default float32; float16/bfloat16 halve the "
                        "memory of large checkpoints on a GPU)")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default 0)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _eval_args(p: argparse.ArgumentParser, flag: str) -> None:
    p.add_argument(flag, nargs="*", default=[] if flag == "--eval" else ["wikitext2"],
                   help="perplexity sets: wikitext2, c4, tinystories or a .txt/.jsonl file")
    p.add_argument("--eval-seqlen", type=int, default=2048, help="perplexity window length (default 2048)")
    p.add_argument("--eval-batch", type=int, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--bos-per-window", action="store_true",
                   help="start every window with BOS (the stories260K reference protocol)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="magr", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model block by block and save it")
    _common(q)
    q.add_argument("--method", default="magr+optq", choices=METHODS,
                   help="rtn | magr+rtn | optq | magr+optq (+ the released code's CD refinement) | "
                        "magr+optq-cd (OPTQ-dagger, --cd-passes passes)")
    q.add_argument("--bits", type=int, default=4, choices=SUPPORTED_BITS, help="weight bits (default 4)")
    q.add_argument("--group-size", type=_group_size, default=None,
                   help="inputs per quantization group, e.g. 128; 'channel' (default) for per channel")
    q.add_argument("--sym", action="store_true", help="symmetric grid (default asymmetric)")
    q.add_argument("--beta", type=float, default=None,
                   help="step shrink in (0, 1]; default 0.8/0.9/1 for 2/3/4 bits, 0.95 at g128")
    q.add_argument("--alpha", type=float, default=None,
                   help="MagR l_inf penalty relative to lambda_max(H)=1; default 1e-3 per channel, 1e-4 per group")
    q.add_argument("--iters", type=int, default=200, help="MagR proximal-gradient iterations (default 200)")
    q.add_argument("--feature-source", default="last_sample", choices=FEATURE_SOURCES,
                   help="MagR's X: the last calibration sample (released code) or all samples")
    q.add_argument("--magr-solver", default="fast", choices=MAGR_SOLVERS,
                   help="fast (default) or reference (the published procedure)")
    q.add_argument("--percdamp", type=float, default=0.01, help="OPTQ damping, fraction of mean diag(H)")
    q.add_argument("--blocksize", type=int, default=128, help="OPTQ lazy-update block size")
    q.add_argument("--act-order", action="store_true", help="OPTQ: columns by decreasing H[j, j]")
    q.add_argument("--static-groups", action="store_true", help="OPTQ: fix group grids before updates")
    q.add_argument("--no-true-sequential", action="store_true",
                   help="collect all 7 layers' inputs in one pass (default: q/k/v, o, gate/up, down in turn)")
    q.add_argument("--cd-passes", type=int, default=None,
                   help="coordinate-descent passes after OPTQ for magr+ methods (default 30 at 2 bits or "
                        "for magr+optq-cd, else 1; 0 disables)")
    q.add_argument("--calib", default="c4", help="calibration source: c4, wikitext2, tinystories or a file")
    q.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    q.add_argument("--seqlen", type=int, default=2048, help="calibration window length (default 2048)")
    q.add_argument("--out", required=True, help="output folder (save_pretrained + magr_* files)")
    q.add_argument("--checkpoint-dir", default=None,
                   help="save each finished block here and resume an interrupted run (default: OUT/.blocks)")
    q.add_argument("--save", action=argparse.BooleanOptionalAction, default=True,
                   help="write the quantized model folder (default); --no-save writes only the summary and "
                        "per-layer records (magr_summary.json, magr_layers.json) and no block checkpoints "
                        "unless --checkpoint-dir is given")
    _eval_args(q, "--eval")

    e = sub.add_parser("ppl", help="perplexity of a model (hub id, folder or alias)")
    _common(e)
    _eval_args(e, "--data")
    e.add_argument("--json", default=None, help="also write the results to this JSON file")

    z = sub.add_parser("zeroshot", help="lm-eval zero-shot accuracy (ARC-e/c, PIQA, Winogrande)")
    _common(z)
    z.add_argument("--tasks", nargs="+", default=["arc_easy", "arc_challenge", "piqa", "winogrande"])
    z.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    z.add_argument("--batch-size", type=int, default=8)
    z.add_argument("--source", default="local", choices=("local", "hub"),
                   help="local files under the data root (default) or lm-eval's built-in hub tasks")
    z.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser


def _perplexities(model, tokenizer, args, sets) -> dict:
    from .data import get_eval_tokens
    from .evaluation import perplexity

    out = {}
    for name in sets:
        t0 = time.perf_counter()
        tokens = get_eval_tokens(name, tokenizer, data_root=args.data_root)
        bos = tokenizer.bos_token_id if args.bos_per_window else None
        ppl = perplexity(model, tokens, seqlen=args.eval_seqlen, batch_size=args.eval_batch,
                         device=args.device, max_windows=args.max_windows, bos_id=bos)
        out[name] = {"ppl": ppl, "seconds": time.perf_counter() - t0, "seqlen": args.eval_seqlen,
                     "max_windows": args.max_windows, "bos_per_window": args.bos_per_window}
        log.info("%s perplexity: %.4f", name, ppl)
    return out


def _check_data(sets, data_root) -> None:
    from .data import resolve_source

    for name in sets:
        resolve_source(name, data_root)


def cmd_quantize(args) -> dict:
    from .data import get_calibration
    from .driver import RECORDS_FILE, SUMMARY_FILE, check_config_for_model, quantize_model, save_quantized
    from .models import load_model

    cfg = QuantConfig(
        method=args.method, bits=args.bits, group_size=args.group_size, sym=args.sym, beta=args.beta,
        alpha=args.alpha, iters=args.iters, feature_source=args.feature_source,
        magr_solver=args.magr_solver, percdamp=args.percdamp, blocksize=args.blocksize,
        actorder=args.act_order, static_groups=args.static_groups,
        true_sequential=not args.no_true_sequential, cd_passes=args.cd_passes, device=args.device,
    ).resolved()
    if args.nsamples <= 0 or args.seqlen <= 0:
        raise ValueError(f"--nsamples ({args.nsamples}) and --seqlen ({args.seqlen}) must be positive")
    _check_data([args.calib, *args.eval], args.data_root)  # fail before any long work
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype])
    check_config_for_model(model, cfg)
    calib = get_calibration(args.calib, tokenizer, nsamples=args.nsamples, seqlen=args.seqlen,
                            seed=args.seed, data_root=args.data_root)
    ckpt = args.checkpoint_dir or (str(Path(args.out) / ".blocks") if args.save else None)
    result = quantize_model(model, calib, cfg, checkpoint_dir=ckpt)
    if args.save:
        save_quantized(model, tokenizer, result, args.out, source=args.model)
    else:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        _write_json(Path(args.out) / RECORDS_FILE, result.records)
    summary = {"model": args.model, "dtype": args.dtype, "config": asdict(cfg), "calib": args.calib, "nsamples": args.nsamples,
               "seqlen": args.seqlen, "seed": args.seed, "seconds": result.seconds,
               "block_seconds": result.block_seconds, "saved": args.save}
    if args.eval:
        summary["ppl"] = _perplexities(model, tokenizer, args, args.eval)
    _write_json(Path(args.out) / SUMMARY_FILE, summary)
    return summary


def cmd_ppl(args) -> dict:
    from .models import load_model

    _check_data(args.data, args.data_root)
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype])
    out = {"model": args.model, "ppl": _perplexities(model, tokenizer, args, args.data)}
    if args.json:
        _write_json(args.json, out)
    return out


def cmd_zeroshot(args) -> dict:
    from .models import load_model
    from .zeroshot import evaluate_zeroshot

    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype])
    # --data-root is the offline data folder of every command; the zero-shot sets are its zeroshot/ subfolder
    zs_root = Path(args.data_root) / "zeroshot" if args.data_root else None
    out = evaluate_zeroshot(model, tokenizer, tasks=args.tasks, limit=args.limit, batch_size=args.batch_size,
                            device=args.device, source=args.source, data_root=zs_root)
    if args.json:
        _write_json(args.json, out)
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    commands = {"quantize": cmd_quantize, "ppl": cmd_ppl, "zeroshot": cmd_zeroshot}
    try:
        out = commands[args.command](args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"magr {args.command}: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
