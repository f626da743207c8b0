"""The effect of the forward dtype on the reported perplexities: the float model and a few of the default's
cells, with the forwards (calibration propagation and evaluation) in float32 and in the profile's
``forward_dtype``, on the same evaluation windows and the same calibration seeds. Writes OUT.json and OUT.md.

    python benchmarks/forward_dtype_cells.py --cells w3-rtn w3-optq w3-magr-optq --seeds 0 --out reports/forward_dtype
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from magr.core.methods import QuantConfig
from magr.evaluation.perplexity import Evaluation
from magr.pipeline.calibration_data import Calibration
from magr.pipeline.machine import machine_info
from magr.pipeline.persistence import write_json
from magr.reproduction.tables import markdown_table
from magr.runs import perplexity_run, quantize_cell

from calibration_size import cell_settings  # the cell's settings as the pipeline passes them (benchmarks/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--cells", nargs="*", default=["w3-rtn", "w3-optq", "w3-magr-optq"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--dtypes", nargs=2, default=None, metavar=("REFERENCE", "HALF"),
                    help="the two forward dtypes (default: float32 and the profile's forward_dtype)")
    ap.add_argument("--work", default="/tmp/magr_forward_dtype")
    ap.add_argument("--out", default=str(ROOT / "reports" / "forward_dtype"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    params = yaml.safe_load(Path(args.params).read_text())
    missing = [c for c in args.cells if c not in params["cells"]]
    if missing:
        raise SystemExit(f"cells {missing} are not in {args.params} (cells: {', '.join(params['cells'])})")
    dtypes = args.dtypes or ["float32", params.get("forward_dtype", "float32")]
    cal, ev = Calibration(**params["calibration"]), Evaluation(**params["evaluation"])
    dtype, model = params["prepare"]["dtype"], params["model"]
    rows, raw = [], []
    for fd in dtypes:
        t0 = time.perf_counter()
        out = perplexity_run(model, ev, dtype=dtype, device=params.get("device"), forward_dtype=fd)
        raw.append({"cell": "float", "forward_dtype": fd, "seconds": time.perf_counter() - t0,
                    "ppl": {s: [v["ppl"]] for s, v in out["ppl"].items()}})
        for name in args.cells:
            quant = QuantConfig.build(**cell_settings(params, name, {}))
            t0 = time.perf_counter()
            runs = quantize_cell(model, Path(args.work) / f"{name}-{fd}", quant, args.seeds, cal, ev,
                                 dtype=dtype, forward_dtype=fd, device=params.get("device"))
            raw.append({"cell": name, "forward_dtype": fd, "seconds": time.perf_counter() - t0,
                        "seeds": [r["calibration"]["seed"] for r in runs],
                        "ppl": {s: [r["ppl"][s]["ppl"] for r in runs] for s in ev.eval_sets}})
    ref, half = dtypes
    for r in (r for r in raw if r["forward_dtype"] == ref):
        h = next(x for x in raw if x["cell"] == r["cell"] and x["forward_dtype"] == half)
        for s in ev.eval_sets:
            a, b = r["ppl"][s], h["ppl"][s]
            rows.append({"cell": r["cell"], "set": s, "seeds": ", ".join(map(str, r.get("seeds", ["-"]))),
                         ref: ", ".join(f"{v:.2f}" for v in a), half: ", ".join(f"{v:.2f}" for v in b),
                         f"{half} / {ref}": ", ".join(f"{y / x:.3f}" for x, y in zip(a, b)),
                         f"seconds {ref}": round(r["seconds"]), f"seconds {half}": round(h["seconds"])})
    info = machine_info()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out).with_suffix(".json"), {"runs": raw, "machine": info, "params": args.params})
    head = (f"# Forward dtype: {ref} vs {half}\n\n`python benchmarks/forward_dtype_cells.py --cells {' '.join(args.cells)} "
            f"--seeds {' '.join(map(str, args.seeds))}`\n\nProfile {params.get('profile')} ({Path(args.params).name}): "
            f"every setting as there except the forward dtype; the same {ev.max_windows or 'all'} windows of "
            f"{ev.eval_seqlen} tokens per set and the same calibration tokens per seed. The math (H, MagR, OPTQ, CD) "
            f"runs in float32 on the float32 weights either way. Seconds: the whole cell (quantize + evaluate), "
            f"{info['cpu']}, torch threads {torch.get_num_threads()}.\n\n")
    Path(args.out).with_suffix(".md").write_text(head + markdown_table(pd.DataFrame(rows)) + "\n")
    print(head + markdown_table(pd.DataFrame(rows)))


if __name__ == "__main__":
    main()
