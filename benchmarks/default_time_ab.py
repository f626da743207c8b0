"""Issue 22's cuts of the default pipeline's time, before and after, on the same machine: each part runs in a fresh
process with magr from ``--old`` (a checkout of the commit before, e.g. ``git worktree add /tmp/old 9ed6516``) and
from this tree, alternating, and the results are compared bit for bit.

    python benchmarks/default_time_ab.py --old /tmp/old --model runs/model [--parts fig1 table1 gemma spg] [--threads 1]

Parts: ``fig1`` / ``table1``: the notebooks' computation on the prepared SmolLM2 folder with params.yaml's
calibration (magnitudes.magr_weight_samples, rank.feature_rank_table); ``gemma``: load_model("gemma3-270m") with
an empty tokenizer cache (the GGUF parsed once instead of three times); ``spg``: SPG 20 (bf16) on five
SmolLM2-shaped problems of tests/magr_problems.py, per channel and per group (the prox's Newton steps on the
shrinking candidate set). Prints seconds per run and whether the outputs are identical.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r'''
import os, pickle, sys, time, torch
part, model_dir, out = sys.argv[1], sys.argv[2], sys.argv[3]
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
import magr
t0 = time.perf_counter()
if part in ("fig1", "table1"):
    import yaml
    from magr import Calibration, MagR
    from magr.pipeline.models import parse_layers
    from magr.reproduction import magnitudes, notebook, rank
    p = yaml.safe_load(open(os.path.join(sys.argv[4], "params.yaml")))
    c, a = p["calibration"], p["analysis"]
    model, _, calib = notebook.model_and_calibration(model_dir, Calibration(c["calib"], c["nsamples"], c["seqlen"],
                                                     c["seed"], c["sampler"]), "float32", None)
    t0 = time.perf_counter()
    if part == "fig1":
        cfg = MagR(alpha=None, iters=a["fig1_iters"], solver="ista", feature_source="last_sample").for_group(None)
        picked = parse_layers(a["fig1_layers"], len(model.model.layers))
        res = [(s["w_after"], s["objective"]) for s in
               magnitudes.magr_weight_samples(model, calib, picked, cfg, device="cpu", progress=False)]
    else:
        picked = parse_layers(a["spectra_layers"], len(model.model.layers))
        table, spectra = rank.feature_rank_table(model, calib, rel_tol=a["rel_tol"], device="cpu", spectra=picked,
                                                 progress=False)
        res = (table.to_dict("list"), {str(k): v for k, v in spectra.items()})
elif part == "gemma":
    from magr.pipeline.models import load_model
    model, tok = load_model("gemma3-270m")
    res = ([v.clone() for v in model.state_dict().values()], tok("Hello world")["input_ids"])
else:
    sys.path.insert(0, os.path.join(sys.argv[4], "tests"))
    from magr_problems import problem
    from magr.core.spg import magr_spg
    res = []
    for seed, (o, n, t, heavy) in enumerate([(576, 576, 512, True), (1536, 576, 512, True), (576, 1536, 512, True),
                                             (960, 576, 512, False), (300, 192, 64, True)]):
        W, X = problem(seed, o, n, t, heavy=heavy, massive=True)
        for gs in (None, 64):
            res.append(magr_spg(W, X.T @ X, 1e-3 if gs is None else 1e-4, 20, gs, precision="bf16", features=X))
seconds = time.perf_counter() - t0
pickle.dump({"seconds": seconds, "res": res, "magr": magr.__file__}, open(out, "wb"))
'''


def same(a, b) -> bool:
    import numpy as np
    import torch

    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def run(part: str, tree: Path, model: str, threads: int, work: Path) -> dict:
    out = work / f"{part}-{tree.name}.pkl"
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(threads))
    if part == "gemma":  # an empty tokenizer cache (the GGUF itself from the usual cache folder)
        cache = Path(tempfile.mkdtemp(dir=work))
        (cache / "models").symlink_to(Path(os.environ.get("MAGR_CACHE_DIR", Path.home() / ".cache/magr")) / "models")
        env["MAGR_CACHE_DIR"] = str(cache)
    subprocess.run([sys.executable, "-c", CHILD, part, str(Path(model).resolve()), str(out), str(tree)], env=env,
                   check=True, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # cwd: not a tree
    result = pickle.loads(out.read_bytes())
    assert Path(result["magr"]).resolve().is_relative_to(tree.resolve()), result["magr"]
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True, help="a checkout of the commit to compare with")
    p.add_argument("--model", default="runs/model", help="the prepared SmolLM2 folder (fig1, table1)")
    p.add_argument("--parts", nargs="+", default=["fig1", "table1", "gemma", "spg"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="old / new pairs per part, alternating")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts:
            for _ in range(args.repeats):
                old, new = (run(part, tree, args.model, args.threads, Path(tmp)) for tree in (Path(args.old), ROOT))
                rows.append({"part": part, "old (s)": round(old["seconds"], 1), "new (s)": round(new["seconds"], 1),
                             "identical": same(old["res"], new["res"])})
                print(json.dumps(rows[-1]), flush=True)
    print("\n| part | old (s) | new (s) | identical |\n|---|---:|---:|---|")
    for r in rows:
        print(f"| {r['part']} | {r['old (s)']} | {r['new (s)']} | {r['identical']} |")
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
