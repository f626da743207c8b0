"""Acceptance 2 of issue 20: `magr quantize` of a model larger than this machine's memory, streamed, end to end
(quantization, perplexity on a few windows, the packed GPTQ export) under a resident-memory limit, beside the
estimate from the model's shapes; and the same command with a full load (``--load full``, or main's code through
``--pythonpath``), which the limit stops.

    python benchmarks/make_big_model.py --shapes llama2-7b --dtype float32 --out /work/bigmodel   # 27 GB
    python benchmarks/big_model_memory.py --model /work/bigmodel --runs /work/bigruns --logs LOGS \
        --limit-gib 16 --methods rtn optq [--full-pythonpath /path/to/main]

Each run goes through benchmarks/peak_rss.py (RSS of the process tree sampled every 0.05 s, SIGKILL above the
limit); its log, RSS timeline and summary go to ``--logs``; the last line printed is a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
GIB = 2**30


def protocol(args) -> list[str]:
    return ["--dtype", "float32", "--device", "cpu", "--bits", "4", "--calib", "c4", "--nsamples", str(args.nsamples),
            "--seqlen", str(args.seqlen), "--eval-sets", "wikitext2", "--eval-seqlen", str(args.seqlen),
            "--max-windows", str(args.windows), "--save-format", "gptq"]


def estimate(args, model: str, method: str) -> float:
    """GiB the streamed run of ``method`` should peak at (magr.pipeline.memory, this protocol, float32 on the CPU)."""
    from magr.pipeline.memory import Shapes, streaming_memory
    from magr.pipeline.models import load_config

    m = streaming_memory(Shapes.of(load_config(model)), nsamples=args.nsamples, seqlen=args.seqlen, dtype_bytes=4,
                         forward_bytes=4, eval_windows=args.windows, eval_seqlen=args.seqlen, method=method)
    return m["cpu"] / GIB


def measured(args, name: str, method: str, load: str, pythonpath: str) -> dict:
    out = Path(args.runs) / name
    shutil.rmtree(out, ignore_errors=True)
    logs = Path(args.logs)
    cli = protocol(args)
    if not load:  # main: its preflight alone would refuse to save (checkpoints + a second full copy exceed the
        cli = cli[: cli.index("--save-format")] + ["--no-save"]  # disk), so it runs without saving: less to do
    command = [sys.executable, "-m", "magr", "quantize", "--model", args.model, "--method", method, *cli,
               "--out", str(out)] + (["--load", load] if load else [])
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": str(args.threads)}
    with open(logs / f"{name}.log", "w") as log:
        done = subprocess.run([sys.executable, str(HERE / "peak_rss.py"), "--limit-gib", str(args.limit_gib),
                               "--log", str(logs / f"{name}.rss.jsonl"), "--", *command],
                              env=env, stdout=subprocess.PIPE, stderr=log, text=True, check=False,
                              cwd=pythonpath)  # `python -m` puts the working folder first on sys.path
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    (logs / f"{name}.summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    run_file = out / "magr_run.json"
    if run_file.is_file():
        run = json.loads(run_file.read_text())
        summary.update(ppl=run["ppl"]["wikitext2"]["ppl"], quantize_s=run["seconds"],
                       gptq=(out / "gptq" / "model.safetensors.index.json").is_file())
    print(json.dumps({"run": name, **summary}), flush=True)
    if not args.keep and out.exists():
        shutil.rmtree(out)
    return {"run": name, **summary}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--runs", required=True, help="a folder for the run folders (removed after each run)")
    p.add_argument("--logs", required=True)
    p.add_argument("--limit-gib", type=float, default=16.0)
    p.add_argument("--methods", nargs="*", default=["rtn", "optq"], help="the streamed runs")
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--windows", type=int, default=4, help="perplexity windows (of --seqlen tokens)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--full", action="store_true", help="also run the first method with --load full")
    p.add_argument("--full-pythonpath", default=None, help="also run the first method with the code at this path "
                                                           "(main before streaming: it has no --load)")
    p.add_argument("--full-method", default=None, help="the method of the full-load runs (default: the first)")
    p.add_argument("--keep", action="store_true", help="keep the run folders")
    args = p.parse_args(argv)
    Path(args.logs).mkdir(parents=True, exist_ok=True)
    here = str(HERE.parent)
    full = args.full_method or args.methods[0]
    est = ", ".join(f"{m} {estimate(args, args.model, m):.2f}" for m in dict.fromkeys([full, *args.methods]))
    rows = []  # the full loads first: they fail within minutes
    if args.full_pythonpath:
        rows.append(measured(args, f"main-{full}", full, "", args.full_pythonpath))
    if args.full:
        rows.append(measured(args, f"full-{full}", full, "full", here))
    rows += [measured(args, f"stream-{m}", m, "stream", here) for m in args.methods]
    lines = [f"estimate (magr.pipeline.memory, streamed, this protocol): {est} GiB + the Python / torch runtime",
             "| run | exit | wall s | peak RSS GiB | limit GiB | killed at the limit | ppl wikitext2 | GPTQ export |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['returncode']} | {r['wall_s']} | {r['peak_rss_gib']} | {r['limit_gib']} | "
                     f"{r['killed_at_limit']} | {r.get('ppl', '-')} | {r.get('gptq', '-')} |")
    table = "\n".join(lines)
    (Path(args.logs) / "big_model_memory.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
