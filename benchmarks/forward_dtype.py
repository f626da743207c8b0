"""Speed and numbers of half-precision model forwards on this CPU (issue 19: the forward dtype).

For each dtype: the seconds of one forward of the whole model over ``--tokens`` tokens (median of
``--repeats``, after a warm-up) with the parameters cast by :func:`magr.pipeline.models.forward_cast`, as the
pipeline runs them, and the logits' relative difference to float32. Run it once as it is and once with
``ONEDNN_MAX_CPU_ISA=AVX512_CORE`` (oneDNN without its bfloat16 instructions) to see what a CPU without native
bfloat16 pays:

    python benchmarks/forward_dtype.py --model smollm2-135m --threads 1
    ONEDNN_MAX_CPU_ISA=AVX512_CORE python benchmarks/forward_dtype.py --model smollm2-135m --threads 1
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from magr.pipeline.machine import cpu_flags, machine_info
from magr.pipeline.models import DTYPES, forward_cast, load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"], choices=tuple(DTYPES))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    ids = torch.randint(10, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    info = machine_info()
    flags = sorted(f for f in cpu_flags() if "bf16" in f or "fp16" in f or f.startswith("amx"))
    print(f"# {args.model}, {args.tokens} tokens, {args.threads} thread(s); {info['cpu']}; flags {flags}; "
          f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '(unset)')}; torch {torch.__version__}")
    print("| dtype | s per forward (median) | min | max | vs float32 | logits rel. diff |")
    print("|---|---|---|---|---|---|")
    ref, base = None, None
    with torch.no_grad():
        for name in args.dtypes:
            with forward_cast(model, DTYPES[name]):
                model(ids)  # warm-up
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    logits = model(ids).logits.float()
                    times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            if ref is None:
                ref, base = logits, med
            diff = float((logits - ref).norm() / ref.norm())
            print(f"| {name} | {med:.3f} | {min(times):.3f} | {max(times):.3f} | {base / med:.2f}x | {diff:.4f} |")


if __name__ == "__main__":
    main()
