"""Print the memory a streamed run needs for LLaMA-2-7B / 13B / 70B under the paper's protocol (README "Models
larger than memory"), computed from the models' shapes by :func:`magr.pipeline.memory.memory_table`.

    python scripts/memory_plan.py                       # float16, 128 x 2048 calibration, 256 x 2048 windows
    python scripts/memory_plan.py --nsamples 16 --seqlen 512 --bytes 4 --method optq
"""
from __future__ import annotations

import argparse
import sys

from magr.pipeline.memory import WORKING_SET, memory_table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=256, help="perplexity windows (C4: 256 x 2048 tokens)")
    p.add_argument("--bytes", type=int, default=2, help="bytes per weight and activation (2: float16)")
    p.add_argument("--method", default="magr+optq", choices=list(WORKING_SET),
                   help="the method whose working set the device needs (default: the paper's MagR+OPTQ)")
    args = p.parse_args(argv)
    print(memory_table(nsamples=args.nsamples, seqlen=args.seqlen, dtype_bytes=args.bytes, forward_bytes=args.bytes,
                       eval_windows=args.windows, eval_seqlen=args.seqlen, method=args.method))
    return 0


if __name__ == "__main__":
    sys.exit(main())
