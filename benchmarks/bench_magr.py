"""Time and objective of MagR preprocessing on one transformer block: published path vs fast path.

One LLaMA-2-7B block (issue 6): q, k, v, o 4096x4096, gate, up 11008x4096, down 4096x11008, each with
features X = tokens x in drawn at random (2048 tokens), alpha = 1e-3 per channel.

- reference: the published procedure, layer by layer: X / sigma_max(X) (SVD), H = X^T X, 200 plain
  proximal-gradient steps with float32 matmuls (TF32 off) and the sort-based l1-ball projection.
- fast: :func:`magr.core.fista.magr_fista` on the stacked rows of each group of layers sharing one input (q/k/v, o,
  gate/up, down): H computed once, lambda_max by Lanczos, rows stacked, FISTA, fused Triton prox.

Objectives F(W) = 1/2 ||X (W - W_hat)^T||^2 + alpha * sum ||w_row||_inf are always computed in float64
with the exactly normalised H of the reference. Run ``python benchmarks/bench_magr.py --help``.
On the CPU the default block is scaled down 32x (``tiny``: 128 / 344, 64 tokens; ``small``: 8x).
"""
from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from magr.core import kernels
from magr.core.projection import prox_linf
from magr.core.fista import FAST_ITERS, fista_momenta, magr_fista
from magr.pipeline.persistence import write_json
from magr.core.solver import exact_objective, lambda_max_lanczos, matmul_precision

log = logging.getLogger("bench_magr")

SHAPES = {  # name: (hidden, intermediate, tokens)
    "llama2-7b": (4096, 11008, 2048),
    "small": (512, 1376, 256),
    "tiny": (128, 344, 64),
}


@dataclass
class Group:
    """Layers sharing one input X (tokens x in)."""

    name: str
    layers: dict[str, torch.Tensor]  # name -> W_hat (out x in)
    X: torch.Tensor


@dataclass
class Run:
    """One path on the whole block: seconds per group and objective per layer."""

    name: str
    seconds: dict[str, float] = field(default_factory=dict)  # group -> s (or layer -> s when per-layer)
    objective: dict[str, float] = field(default_factory=dict)  # layer -> F
    breakdown: dict[str, float] = field(default_factory=dict)  # phase -> s (whole block)
    error: str | None = None


def make_block(shape: str, device: torch.device, seed: int, features: str) -> list[Group]:
    """Random weights (N(0, 0.02^2)) and random features; 'heavy' scales feature channels log-normally."""
    hidden, inter, tokens = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)

    def feats(n):
        X = torch.randn(tokens, n, generator=g)
        if features == "heavy":
            X = X * torch.exp(torch.randn(n, generator=g))
        return X.to(device)

    def weight(o, i):
        return (0.02 * torch.randn(o, i, generator=g)).to(device)

    return [
        Group("qkv", {n: weight(hidden, hidden) for n in ("q_proj", "k_proj", "v_proj")}, feats(hidden)),
        Group("o", {"o_proj": weight(hidden, hidden)}, feats(hidden)),
        Group("gate_up", {n: weight(inter, hidden) for n in ("gate_proj", "up_proj")}, feats(hidden)),
        Group("down", {"down_proj": weight(hidden, inter)}, feats(inter)),
    ]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Stopwatch:
    """Accumulates device time per phase: CUDA events on the GPU (no syncs), perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.pending: list[tuple[str, object, object]] = []
        self.totals: dict[str, float] = {}

    def start(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def stop(self, phase, begin):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.pending.append((phase, begin, e))
        else:
            self.totals[phase] = self.totals.get(phase, 0.0) + time.perf_counter() - begin

    def result(self):
        if self.cuda:
            torch.cuda.synchronize()
            for phase, b, e in self.pending:
                self.totals[phase] = self.totals.get(phase, 0.0) + b.elapsed_time(e) / 1e3
            self.pending.clear()
        return dict(self.totals)


def normalised_H(X: torch.Tensor) -> torch.Tensor:
    """H = (X / sigma_max(X))^T (X / sigma_max(X)) in exact float32 (the published normalisation)."""
    with matmul_precision("fp32"):
        Xn = X / torch.linalg.svdvals(X)[0]
        return Xn.T @ Xn


def reference_layer(W_hat, X, alpha, iters, watch: Stopwatch, group_size=None):
    """The published procedure on one layer: SVD normalisation, H, ``iters`` ISTA steps with sorting."""
    t = watch.start()
    H = normalised_H(X)
    watch.stop("setup (SVD, H)", t)
    W = W_hat.clone()
    with matmul_precision("fp32"):
        for _ in range(iters):
            t = watch.start()
            G = (W - W_hat) @ H
            watch.stop("gradient matmuls", t)
            t = watch.start()
            W = prox_linf(W - G, alpha, group_size, method="sort")
            watch.stop("projections", t)
    return W


def run_reference(block, alpha, iters, device, H_exact, group_size) -> Run:
    run = Run(f"reference (ISTA {iters}, fp32, sort)")
    watch = Stopwatch(device)
    for grp in block:
        for name, W_hat in grp.layers.items():
            sync(device)
            t0 = time.perf_counter()
            W = reference_layer(W_hat, grp.X, alpha, iters, watch, group_size)
            sync(device)
            run.seconds[name] = time.perf_counter() - t0
            run.objective[name] = exact_objective(W, W_hat, H_exact[grp.name], alpha, group_size)
            log.info("reference %s: %.3f s, F = %.8g", name, run.seconds[name], run.objective[name])
            del W
    run.breakdown = watch.result()
    return run


def gram(X):
    with matmul_precision("fp32"):
        return X.T @ X


def fast_group(weights, H, alpha, iters=FAST_ITERS, group_size=None, **fista_args):
    """magr_fista on the rows of ``weights`` stacked (layers sharing H), split back per layer."""
    rows = [w.shape[0] for w in weights]
    out = magr_fista(torch.cat(weights, dim=0), H, alpha, iters, group_size, rows=rows, **fista_args)
    return list(torch.split(out, rows, dim=0))


def run_fast(block, alpha, device, H_exact, group_size, label, grouped=True, repeats=3, **options) -> Run:
    """Times fast_group per group (H = X^T X included); median of ``repeats`` runs."""
    run = Run(label)
    try:
        times: dict[str, list[float]] = {}
        for rep in range(repeats):
            for grp in block:
                units = [list(grp.layers)] if grouped else [[n] for n in grp.layers]
                for unit in units:
                    key = grp.name if grouped else unit[0]
                    sync(device)
                    t0 = time.perf_counter()
                    H = gram(grp.X)
                    outs = fast_group([grp.layers[n] for n in unit], H, alpha,
                                                 group_size=group_size, **options)
                    sync(device)
                    times.setdefault(key, []).append(time.perf_counter() - t0)
                    if rep == repeats - 1:
                        for n, W in zip(unit, outs):
                            run.objective[n] = exact_objective(W, grp.layers[n], H_exact[grp.name], alpha,
                                                               group_size)
                    del outs, H
        run.seconds = {k: statistics.median(v) for k, v in times.items()}
    except Exception as exc:  # report and go on with the other variants
        log.exception("fast path %s failed", label)
        run.error = f"{type(exc).__name__}: {exc}"
    return run


def fast_breakdown(block, alpha, device, iters, precision, kernel, group_size) -> dict[str, float]:
    """Component times of the fast path on the whole block: H + Lanczos, iters matmuls, iters prox steps."""
    watch = Stopwatch(device)
    mm_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for grp in block:
        t = watch.start()
        H = gram(grp.X)
        lam = lambda_max_lanczos(H)
        Hm = (H / lam).to(mm_dtype)
        watch.stop("setup (H, Lanczos)", t)
        W_hat = torch.cat(list(grp.layers.values()), dim=0)
        W = W_hat.clone()
        P = (1e-3 * torch.randn_like(W_hat)).to(mm_dtype)
        G = torch.empty_like(P)
        with matmul_precision(precision):
            t = watch.start()
            for _ in range(iters):
                torch.matmul(P, Hm, out=G)
            watch.stop(f"gradient matmuls ({precision})", t)
        t = watch.start()
        for m in fista_momenta(iters):
            kernels.prox_step_(W_hat, W, P, G, alpha, m, group_size, backend=kernel)
        watch.stop(f"prox steps ({kernel})", t)
        del W_hat, W, P, G, H, Hm
    return watch.result()


def trace_fast(block, alpha, device, H_exact, ref: Run, max_iters, precision, group_size, start=16):
    """Exact objective of every FISTA iterate k >= start; first k where F_k <= (1 + 1e-3) F_ref per layer."""
    first: dict[str, int | None] = {}
    curves: dict[str, list[float]] = {}
    for grp in block:
        names = list(grp.layers)
        rows = [grp.layers[n].shape[0] for n in names]
        W_hat_all = torch.cat([grp.layers[n] for n in names], dim=0)

        def cb(k, Wk):
            if k < start:
                return
            for n, Wp, Wh in zip(names, torch.split(Wk, rows), torch.split(W_hat_all, rows)):
                F = exact_objective(Wp, Wh, H_exact[grp.name], alpha, group_size)
                curves.setdefault(n, []).append(F)
                if first.get(n) is None and F <= ref.objective[n] * (1 + 1e-3):
                    first[n] = k

        fast_group([grp.layers[n] for n in names], gram(grp.X), alpha, iters=max_iters,
                              precision=precision, group_size=group_size, callback=cb)
    return first, curves


def describe_device(device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB)"
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def print_table(block, ref: Run | None, runs: list[Run], n_blocks: int):
    layer_names = [n for g in block for n in g.layers]
    shapes = {n: tuple(w.shape) for g in block for n, w in g.layers.items()}
    print()
    print("Per layer (seconds; F = final objective, float64; rel = F_fast / F_ref - 1)")
    for run in [r for r in [ref] + runs if r is not None]:
        print(f"  [{run.name}]" + (f"  FAILED: {run.error}" if run.error else ""))
        if run.error:
            continue
        for grp in block:
            for n in grp.layers:
                t = run.seconds.get(n)
                ts = f"{t:8.3f} s" if t is not None else "   (group)"
                F = run.objective.get(n, float("nan"))
                rel = ""
                if ref is not None and run is not ref and n in ref.objective:
                    r = F / ref.objective[n] - 1
                    rel = f"  rel {r:+.3e} {'ok' if r <= 1e-3 else 'WORSE'}"
                print(f"    {n:10s} {str(shapes[n]):14s} {ts}  F = {F:.8e}{rel}")
            if grp.name in run.seconds:
                print(f"    group {grp.name:8s} ({', '.join(grp.layers)}): {run.seconds[grp.name]:.4f} s")
    print()
    print(f"Per block ({len(layer_names)} layers; x{n_blocks} blocks)")
    for run in [r for r in [ref] + runs if r is not None]:
        if run.error:
            print(f"  {run.name:55s} FAILED")
            continue
        total = sum(run.seconds.values())
        F = sum(run.objective.values())
        rel = ""
        if ref is not None and run is not ref:
            Fr = sum(ref.objective.values())
            worst = max(run.objective[n] / ref.objective[n] - 1 for n in layer_names)
            rel = f"  rel {F / Fr - 1:+.3e} (worst layer {worst:+.3e})"
        print(f"  {run.name:55s} {total:8.3f} s/block  {total * n_blocks / 60:7.2f} min/{n_blocks}  "
              f"F = {F:.8e}{rel}")
        if run.breakdown:
            print("      breakdown: " + ", ".join(f"{k} {v:.3f} s" for k, v in run.breakdown.items()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="block shape (default: llama2-7b on CUDA, tiny on the CPU)")
    ap.add_argument("--alpha", type=float, default=1e-3)
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--ref-iters", type=int, default=200)
    ap.add_argument("--iters", type=int, default=FAST_ITERS, help="FISTA iterations of the fast path")
    ap.add_argument("--features", choices=("gaussian", "heavy"), default="gaussian")
    ap.add_argument("--variants", default="default,bf16,per-layer,ista,torch-prox",
                    help="comma list of: default, bf16, fp32, per-layer, ista, ista-tf32, torch-prox")
    ap.add_argument("--trace", type=int, default=0, help="trace the exact objective of FISTA up to this k")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--blocks", type=int, default=32, help="blocks in the model, for the total")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write all numbers to this file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    shape = args.shape or ("llama2-7b" if device.type == "cuda" else "tiny")
    print(f"device: {describe_device(device)}; torch {torch.__version__}; "
          f"triton {'yes' if kernels.HAVE_TRITON else 'no'} (prox backend auto -> "
          f"{kernels.resolve_backend('auto', device)})")
    print(f"block: {shape} {SHAPES[shape]} (hidden, intermediate, tokens); features {args.features}; "
          f"alpha {args.alpha}; group_size {args.group_size}; reference {args.ref_iters} ISTA iterations; "
          f"fast {args.iters} FISTA iterations")

    block = make_block(shape, device, args.seed, args.features)
    H_exact = {g.name: normalised_H(g.X).double() for g in block}
    gs = args.group_size

    # warm-up: cuBLAS/cuSOLVER handles, Triton compilation for every segment length
    kernel = "auto"
    for grp in block:
        W0 = next(iter(grp.layers.values()))
        reference_layer(W0[:64], grp.X, args.alpha, 2, Stopwatch(device), gs)
        try:
            for precision in ("tf32", "bf16", "fp32"):
                fast_group([W0[:64]], gram(grp.X), args.alpha, iters=2, group_size=gs,
                                      precision=precision, kernel=kernel)
        except Exception as exc:
            log.exception("fast path warm-up failed")
            print(f"WARNING: fast path with kernel {kernel!r} failed ({type(exc).__name__}: {exc}); "
                  "falling back to the torch prox for all variants")
            kernel = "torch"
    sync(device)

    ref = None
    if not args.no_reference:
        ref = run_reference(block, args.alpha, args.ref_iters, device, H_exact, gs)

    K = args.iters
    kb = kernels.resolve_backend(kernel, device)  # the prox backend the fast variants use
    variants = {
        "default": dict(label=f"fast: FISTA {K}, tf32, {kb} prox, grouped", iters=K, precision="tf32"),
        "bf16": dict(label=f"fast: FISTA {K}, bf16, {kb} prox, grouped", iters=K, precision="bf16"),
        "fp32": dict(label=f"fast: FISTA {K}, fp32, {kb} prox, grouped", iters=K, precision="fp32"),
        "per-layer": dict(label=f"fast: FISTA {K}, tf32, {kb} prox, per layer", iters=K, precision="tf32",
                          grouped=False),
        "ista": dict(label=f"fast ISTA {args.ref_iters}: fp32, sort-free {kb} prox, grouped",
                     iters=args.ref_iters, precision="fp32", accel="none"),
        "ista-tf32": dict(label=f"fast ISTA {args.ref_iters}: tf32, sort-free {kb} prox, grouped",
                          iters=args.ref_iters, precision="tf32", accel="none"),
        "torch-prox": dict(label=f"fast: FISTA {K}, tf32, torch prox, grouped", iters=K, precision="tf32",
                           kernel="torch"),
    }
    runs = []
    for v in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if v not in variants:
            raise SystemExit(f"unknown variant {v!r}; allowed: {', '.join(variants)}")
        opts = dict(variants[v])
        opts.setdefault("kernel", kernel)
        label = opts.pop("label")
        grouped = opts.pop("grouped", True)
        repeats = 1 if opts.get("accel") == "none" else args.repeats  # 200 iterations: long enough
        run = run_fast(block, args.alpha, device, H_exact, gs, label, grouped=grouped, repeats=repeats,
                       **opts)
        if v in ("default", "bf16") and run.error is None:
            run.breakdown = fast_breakdown(block, args.alpha, device, K, opts["precision"],
                                           kernels.resolve_backend(opts["kernel"], device), gs)
        runs.append(run)
        log.info("%s: %.3f s/block", label, sum(run.seconds.values()))

    print_table(block, ref, runs, args.blocks)

    result = {"device": describe_device(device), "shape": shape, "args": vars(args),
              "reference": asdict(ref) if ref else None, "fast": [asdict(r) for r in runs]}
    if args.trace and ref is not None:
        start = min(16, args.trace)
        for precision in ("tf32", "bf16"):
            first, curves = trace_fast(block, args.alpha, device, H_exact, ref, args.trace, precision, gs,
                                       start=start)
            firsts = [first.get(n) for n in ref.objective]
            needs = "not reached" if None in firsts else max(firsts)
            print(f"\nFISTA ({precision}) iterations to reach F <= 1.001 * F_ref(ISTA {args.ref_iters}), per layer: "
                  + ", ".join(f"{n} {first.get(n) or f'>{args.trace}'}" for n in ref.objective)
                  + f"; block needs {needs} (of {args.trace} traced)")
            for n, c in curves.items():
                ks = sorted({start, 16, 24, 32, 40, 48, 64, 80, 96, 128, start + len(c) - 1})
                marks = {k: c[k - start] for k in ks if start <= k < start + len(c)}
                print(f"    {n:10s} F_k/F_ref: " + " ".join(f"k{k}:{v / ref.objective[n]:.4f}"
                                                         for k, v in marks.items()))
            result[f"trace_{precision}"] = {"first": first, "curves": curves}
    if args.json:
        write_json(args.json, result)  # strict JSON (NaN -> null), atomic


if __name__ == "__main__":
    main()
