"""GPU acceptance check (issue 21): one run, one table, reports/gpu_check.md.

Made for one device call of at most 8 minutes with the device's own Python (torch, transformers, Triton
preinstalled; nothing else of requirements.txt): it imports only magr (from this tree), torch, transformers and
Triton, and gptqmodel when present. Rows (each says its shape; goals from reports/table4_gpu.md):

- cd <layer> <grid>: the Triton CD sweep (30 passes, W2, per channel and g128, RTN start, H = X^T X of 2048
  correlated random tokens) on the LLaMA-2-7B shapes q/k/v/o 4096x4096, gate/up 11008x4096, down 4096x11008,
  its time, and its codes against the CPU C kernel on the first --cd-ref-rows rows (rows are independent
  problems, so a row slice gives the same codes as the whole layer): differing codes should be rare rounding ties (<= 1e-3, as tests/test_cuda.py);
- cd per block: the Triton sweep's 30 passes over one block (4 x q/k/v/o + 2 x gate/up + down);
- magr: MagR (FISTA 48, TF32, the fused Triton prox, layers sharing an input stacked; H and Lanczos included)
  on one LLaMA-2-7B block with random weights and 2048 random tokens: seconds per block (goal <= 0.54 s) and
  its objective F against the published solver (ISTA 200, fp32, sort): rel = F_fast / F_ref - 1 (goal <= 1e-3);
- optq: OPTQ W3 per channel on the block's 7 layers, seconds per block;
- dagger: MagR + OPTQ W2 + CD 30 passes (MagR+OPTQ-dagger, per channel) on the block, seconds per block
  (goal <= 10 s);
- export: a random-initialised small Llama quantized W4 g128 by RTN, exported as GPTQ, loaded on CUDA by
  transformers (gptqmodel's CUDA kernel): max |logits - in-memory logits| relative to the logits' scale, and
  generation tokens/s against the float16 model; "skipped" without gptqmodel;
- e2e: stories260K (--stories, tokens from --tokens) quantized by MagR+OPTQ W4 per channel through magr's pipeline
  (quantize_model) on the device, and its perplexity on TinyStories validation tokens beside float32's.

Without CUDA (this project's CPU machines) the CUDA-only rows say "no CUDA" and the rest run at reduced shapes
(the block 32x smaller, as benchmarks/bench_magr.py's "tiny"; the CD rows on small slices with the Triton sweep in
Triton's CPU interpreter), in under 5 minutes:

    python scripts/gpu_check.py                               # no CUDA: reduced shapes -> reports/gpu_check_cpu.md
    make gpu-assets                                           # here: stories260K + tokens (1.4 MB) in .gpu/assets
    MAGR_COMMIT=<hash> python3 scripts/gpu_check.py --out $OUT/gpu_check.md   # on the device (README)
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CUDA = torch.cuda.is_available()
if not CUDA and "triton" not in sys.modules:  # the Triton kernels run in the interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

GOALS = {"magr": 0.54, "dagger": 10.0}  # s per LLaMA-2-7B block (reports/table4_gpu.md)
LLAMA = {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)}
PER_BLOCK = {"q/k/v/o": 4, "gate/up": 2, "down": 1}
HIDDEN, INTER, TOKENS = 4096, 11008, 2048
CPU_SCALE = 32  # reduced shapes without CUDA: the block / 32 (bench_magr.py's "tiny"), 64 tokens


class Table:
    """The rows so far; the report is rewritten after every row (a device call cut short keeps what ran)."""

    def __init__(self, deadline: float, out: Path, head: str):
        self.rows: list[tuple[str, str, str, str, str]] = []
        self.deadline, self.out, self.head, self.t0 = deadline, out, head, time.time()

    def add(self, check, shape, result, goal="", status="ok"):
        row = (check, shape, result, goal, status)
        self.rows.append(row)
        print(" | ".join(row), flush=True)
        self.write()

    def write(self, done: bool = False):
        self.out.parent.mkdir(parents=True, exist_ok=True)
        state = "finished" if done else "running (or cut short)"
        self.out.write_text(f"# GPU acceptance check (scripts/gpu_check.py)\n\n{self.head}\n\n{self.markdown()}\n"
                            f"Total {time.time() - self.t0:.0f} s, {state}. Rows: the docstring of "
                            "scripts/gpu_check.py and the README's section \"GPU acceptance check\".\n")

    def over_time(self) -> bool:
        return time.time() > self.deadline

    def markdown(self) -> str:
        head = "| check | shape | result | goal | status |\n|---|---|---|---|---|\n"
        return head + "".join(f"| {' | '.join(r)} |\n" for r in self.rows)


def sync():
    if CUDA:
        torch.cuda.synchronize()


def timed(fn, *args, **kw):
    sync()
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    sync()
    return out, time.perf_counter() - t0


def layer(out: int, n: int, tokens: int, device, seed: int = 0):
    """W (out x n) with outliers and H = X^T X of correlated random features: benchmarks/bench_cd.py's layer()."""
    g = torch.Generator().manual_seed(seed)
    rank = min(tokens, n) // 2
    X = torch.randn(tokens, rank, generator=g) @ (torch.randn(rank, n, generator=g) / rank**0.5)
    X += 0.1 * torch.randn(tokens, n, generator=g)
    W = 0.02 * torch.randn(out, n, generator=g)
    W[::16, 7] = 0.3
    return W.to(device), gram(X.to(device))


def gram(X):
    from magr.core.solver import matmul_precision

    with matmul_precision("fp32"):
        return X.T @ X


# --- CD sweep ----------------------------------------------------------------------------------------

def warm_cd(device, group_size) -> None:
    """Compile the Triton sweep (keep and refit) before anything is timed: a small layer, one pass."""
    if not CUDA:
        return
    from magr.core.quantizers import Grid, rtn
    from magr.core.refinement import CD, cd_refine_compiled

    W, H = layer(32, 256, 256, device)
    grid = Grid(2, group_size)
    Q, p = rtn(W, grid)
    cd_refine_compiled(Q, W, H, p, 1, CD.damp, CD.eps, grid if group_size else None, "triton")
    sync()


def check_cd(table: Table, args, device) -> None:
    from magr.core.cd_check import codes
    from magr.core.cd_sweep import Unavailable
    from magr.core.quantizers import Grid, default_beta, rtn
    from magr.core.refinement import CD, cd_refine_compiled

    cd = CD()
    block_s: dict[str, float] = {}
    shapes = LLAMA if CUDA else {k: (max(20, o // 300), min(n // CPU_SCALE, 160)) for k, (o, n) in LLAMA.items()}
    shapes = {k: v for k, v in shapes.items() if k in args.cd_layers.split(",")}
    tokens = TOKENS if CUDA else 64
    passes = args.cd_passes
    for group_size in (None, 128 if CUDA else 32):
        gname = "per channel" if group_size is None else f"g{group_size}"
        grid = Grid(2, group_size, beta=default_beta(2, group_size))
        warm_cd(device, group_size)
        for name, (out, n) in shapes.items():
            label = f"cd {name} W2 {gname}"
            shape = f"{out}x{n}, {passes} passes"
            if table.over_time():
                table.add(label, shape, "not run: time budget spent", "", "skipped")
                continue
            W, H = layer(out, n, tokens, device)
            Q0, p = rtn(W, grid)
            refit = grid if group_size else None
            try:
                (Qt, pt), t_tri = timed(cd_refine_compiled, Q0, W, H, p, passes, cd.damp, cd.eps, refit, "triton")
            except Unavailable as exc:
                table.add(label, shape, f"Triton sweep unavailable: {exc}", "", "FAILED")
                continue
            rows = min(out, args.cd_ref_rows)
            sl = slice(0, rows)
            p_cpu = dataclasses.replace(p, scale=p.scale[sl], zero=p.zero[sl]).cpu()
            try:
                Qc, pc = cd_refine_compiled(Q0[sl].cpu(), W[sl].cpu(), H.cpu(), p_cpu, passes, cd.damp, cd.eps,
                                            refit, "c")
            except Unavailable as exc:
                table.add(label, shape, f"Triton {t_tri:.2f} s; C kernel unavailable: {exc}", "", "partial")
                continue
            pt_rows = dataclasses.replace(pt, scale=pt.scale[sl], zero=pt.zero[sl]).cpu()
            codes_c = codes(Qc, pc)
            differ = int((codes(Qt[sl].cpu(), pt_rows) != codes_c).sum())
            moved = int((codes_c != codes(Q0[sl].cpu(), p_cpu)).sum())
            where = "CUDA" if CUDA else "interpreter"
            frac = differ / (rows * n)
            table.add(label, shape, f"Triton ({where}) {t_tri:.2f} s; vs C kernel on {rows} rows: {differ} of "
                      f"{rows * n} codes differ ({moved} moved by CD)", "differing <= 1e-3 (ties)",
                      "ok" if frac <= 1e-3 else "CHECK")
            if group_size is None:
                block_s[name] = t_tri
    if CUDA and len(block_s) == len(LLAMA):
        total = sum(PER_BLOCK[k] * v for k, v in block_s.items())
        table.add("cd per block", "LLaMA-2-7B block, W2 per channel, 30 passes", f"{total:.2f} s / block "
                  f"({', '.join(f'{PER_BLOCK[k]} x {k} {v:.2f} s' for k, v in block_s.items())})", "", "ok")
    elif not CUDA:
        table.add("cd per block", "LLaMA-2-7B block", "no CUDA (the interpreter's times mean nothing)", "", "no CUDA")


# --- one block: MagR, OPTQ, dagger -------------------------------------------------------------------

def make_block(device):
    """benchmarks/bench_magr.py's make_block (seed 0, Gaussian features): the same weights and features."""
    hidden, inter, tokens = (HIDDEN, INTER, TOKENS) if CUDA else (HIDDEN // CPU_SCALE, 344, 64)
    g = torch.Generator().manual_seed(0)

    def feats(n):
        return torch.randn(tokens, n, generator=g).to(device)

    def weight(o, i):
        return (0.02 * torch.randn(o, i, generator=g)).to(device)

    block = [("qkv", {n: weight(hidden, hidden) for n in ("q_proj", "k_proj", "v_proj")}, feats(hidden)),
             ("o", {"o_proj": weight(hidden, hidden)}, feats(hidden)),
             ("gate_up", {n: weight(inter, hidden) for n in ("gate_proj", "up_proj")}, feats(hidden)),
             ("down", {"down_proj": weight(hidden, inter)}, feats(inter))]
    return block, f"{'LLaMA-2-7B' if CUDA else 'reduced (1/32)'} block: hidden {hidden}, intermediate {inter}, " \
                  f"{tokens} tokens"


def check_block(table: Table, args, device) -> None:
    from magr.core import kernels
    from magr.core.fista import FAST_ITERS, magr_fista
    from magr.core.optq import OPTQ
    from magr.core.quantizers import Grid, default_beta
    from magr.core.refinement import CD
    from magr.core.solver import exact_objective, lambda_max, magr_ista, matmul_precision

    block, desc = make_block(device)
    alpha = 1e-3
    prox = kernels.resolve_backend("auto", device)
    # warm-up: Triton compilation, cuBLAS handles
    for _, layers, X in block:
        W0 = next(iter(layers.values()))[:64]
        magr_fista(W0, gram(X), alpha, 2)
    if table.over_time():
        table.add("magr", desc, "not run: time budget spent", "", "skipped")
        return
    fast_s, F_fast, outs = 0.0, {}, {}
    for gname, layers, X in block:
        names = list(layers)
        rows = [layers[n].shape[0] for n in names]

        def run(X=X, names=names, rows=rows, layers=layers):
            return magr_fista(torch.cat([layers[n] for n in names]), gram(X), alpha, FAST_ITERS, rows=rows)
        out, s = timed(run)
        fast_s += s
        outs.update(zip(names, torch.split(out, rows)))
    ref_s, F_ref = 0.0, {}
    for gname, layers, X in block:
        H = gram(X)
        Hn = (H.double() / lambda_max(H.double(), "lanczos"))
        for n, W in layers.items():
            with matmul_precision("fp32"):
                ref, s = timed(magr_ista, W, H, alpha, args.ref_iters, projection="sort")
            ref_s += s
            F_ref[n] = exact_objective(ref, W, Hn, alpha)
            F_fast[n] = exact_objective(outs[n], W, Hn, alpha)
    rel = sum(F_fast.values()) / sum(F_ref.values()) - 1
    worst = max(F_fast[n] / F_ref[n] - 1 for n in F_ref)
    goal = f"<= {GOALS['magr']} s, rel <= 1e-3" if CUDA else "rel <= 1e-3"
    ok = rel <= 1e-3 and worst <= 1e-3 and (not CUDA or fast_s <= GOALS["magr"])
    table.add("magr", desc, f"FISTA {FAST_ITERS}, tf32, {prox} prox: {fast_s:.3f} s / block; reference ISTA "
              f"{args.ref_iters} {ref_s:.2f} s; F rel {rel:+.2e} (worst layer {worst:+.2e})", goal,
              "ok" if ok else "CHECK")
    if table.over_time():
        table.add("optq", desc, "not run: time budget spent", "", "skipped")
        return
    optq_s = 0.0
    for _, layers, X in block:
        H = gram(X)
        for W in layers.values():
            optq_s += timed(OPTQ(), W, H, Grid(3, None))[1]
    table.add("optq", desc, f"OPTQ W3 per channel: {optq_s:.2f} s / block", "", "ok")
    if table.over_time():
        table.add("dagger", desc, "not run: time budget spent", "", "skipped")
        return
    grid2 = Grid(2, None, beta=default_beta(2, None))
    warm_cd(device, None)
    dag_s, cd_s = 0.0, 0.0
    for _, layers, X in block:
        H = gram(X)
        names = list(layers)
        rows = [layers[n].shape[0] for n in names]
        Wm, s = timed(lambda: magr_fista(torch.cat([layers[n] for n in names]), H, alpha, FAST_ITERS, rows=rows))
        dag_s += s
        for n, Wn in zip(names, torch.split(Wm, rows)):
            (Q, p), s1 = timed(OPTQ(), Wn.contiguous(), H, grid2)
            (Q, p), s2 = timed(CD(passes=args.cd_passes), Q, layers[n], H, p, grid2)
            dag_s += s1 + s2
            cd_s += s2
    goal = f"<= {GOALS['dagger']} s" if CUDA else ""
    table.add("dagger", desc, f"MagR + OPTQ W2 + CD {args.cd_passes} passes: {dag_s:.2f} s / block (CD {cd_s:.2f} s)",
              goal, "ok" if not CUDA or dag_s <= GOALS["dagger"] else "CHECK")


# --- export on CUDA ----------------------------------------------------------------------------------

def check_export(table: Table, args, device) -> None:
    shape = "random Llama: hidden 1024, intermediate 2816, 2 layers, W4 g128 GPTQ"
    if not CUDA:
        table.add("export", shape, "no CUDA", "", "no CUDA")
        return
    try:
        import gptqmodel  # noqa: F401
    except ImportError:
        table.add("export", shape, "skipped: gptqmodel is not installed in this Python", "", "skipped")
        return
    import tempfile

    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from magr.core.quantizers import Grid, rtn
    from magr.deploy.export import Export, export_model

    try:
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=8,
                          num_key_value_heads=8, vocab_size=4096, max_position_embeddings=512)
        model = LlamaForCausalLM(cfg).eval()
        grid = Grid(4, 128, fp16_scale=True)
        params = {}
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                Q, p = rtn(mod.weight.data, grid)
                mod.weight.data.copy_(Q)
                params[name] = p
        with tempfile.TemporaryDirectory() as tmp:
            folder = export_model(model, None, params, grid, Path(tmp) / "w4", Export(format="gptq"))
            qmodel = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float16, device_map="cuda").eval()
            ref = model.half().to(device)
            ids = torch.randint(0, cfg.vocab_size, (1, 128), generator=torch.Generator().manual_seed(1)).to(device)
            with torch.no_grad():
                a, b = qmodel(ids).logits.float(), ref(ids).logits.float()
            err = float((a - b).abs().max() / b.abs().max())
            kernel = sorted({type(m).__name__ for m in qmodel.modules() if "Quant" in type(m).__name__})

            def speed(m):
                m.generate(ids[:, :16], max_new_tokens=8, min_new_tokens=8, do_sample=False)
                (_, s) = timed(m.generate, ids[:, :16], max_new_tokens=128, min_new_tokens=128, do_sample=False)
                return 128 / s
            tq, tf = speed(qmodel), speed(ref)
        table.add("export", shape, f"{', '.join(kernel)}: logits max rel diff {err:.2e}; {tq:.0f} tokens/s vs "
                  f"float16 {tf:.0f} tokens/s", "rel diff <= 1e-2", "ok" if err <= 1e-2 else "CHECK")
    except Exception as exc:  # report and go on
        table.add("export", shape, f"{type(exc).__name__}: {str(exc)[:200]}", "", "FAILED")


# --- end to end on stories260K -----------------------------------------------------------------------

def prepare_assets(out: Path) -> None:
    """Copy stories260K (1 MB) and tokenize TinyStories validation (needs sentencepiece and MAGR_SHARED)."""
    from magr.pipeline.sources import shared_root
    from magr.pipeline.tokenizer import SentencePieceTokenizer

    src = Path(shared_root()) / "models" / "stories260K"
    dst = out / "stories260K"
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy2(src / f, dst / f)
    tok = SentencePieceTokenizer(src / "tokenizer.model")
    text = (Path(shared_root()) / "data" / "tinystories" / "validation.txt").read_text()[:400_000]
    ids = torch.tensor(tok.encode(text, add_special_tokens=False), dtype=torch.int16)
    torch.save(ids, out / "tinystories_tokens.pt")
    print(f"wrote {dst} and {out / 'tinystories_tokens.pt'} ({len(ids)} tokens)")


def check_e2e(table: Table, args, device) -> None:
    from transformers import LlamaForCausalLM

    from magr.core.methods import QuantConfig
    from magr.evaluation.perplexity import perplexity
    from magr.pipeline.blocks import quantize_model

    stories = Path(args.stories) if args.stories else None
    tokens = Path(args.tokens) if args.tokens else None
    if stories is None or not stories.is_dir() or tokens is None or not tokens.is_file():
        table.add("e2e", "stories260K", f"model or tokens missing ({args.stories}, {args.tokens}); run "
                  "--prepare-assets", "", "skipped")
        return
    ids = torch.load(tokens).long()
    seqlen, ncal = 256, 16
    calib = ids[: ncal * seqlen].view(ncal, seqlen)
    evaluation = ids[ncal * seqlen:][: args.eval_tokens or (32768 if CUDA else 8192)]
    model = LlamaForCausalLM.from_pretrained(str(stories), dtype=torch.float32).eval()
    ppl_fp = perplexity(model, evaluation, seqlen=seqlen, device=device, progress=False)
    cfg = QuantConfig.build(method="magr+optq", bits=4)
    _, s = timed(quantize_model, model, calib, cfg, device=str(device), progress=False)
    ppl_q = perplexity(model, evaluation, seqlen=seqlen, device=device, progress=False)
    ok = ppl_q == ppl_q and ppl_q < 1.5 * ppl_fp
    table.add("e2e", f"stories260K, MagR+OPTQ W4 per channel, calib {ncal}x{seqlen}, eval {len(evaluation)} tokens",
              f"quantize {s:.1f} s on {device.type}; perplexity {ppl_q:.3f} (float32 {ppl_fp:.3f})",
              "ppl < 1.5 x float32", "ok" if ok else "CHECK")


# --- main --------------------------------------------------------------------------------------------

def describe() -> tuple[str, dict]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"torch": torch.__version__}
    for mod in ("triton", "transformers", "gptqmodel"):  # without importing them (gptqmodel pulls in much)
        try:
            versions[mod] = version(mod)
        except PackageNotFoundError:
            versions[mod] = "absent"
    if CUDA:
        p = torch.cuda.get_device_properties(0)
        dev = f"{p.name} ({p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB)"
    else:
        dev = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores (no CUDA; reduced shapes)"
    return dev, versions


def commit(arg: str | None) -> str:
    if arg:
        return arg
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True).stdout.strip()
            return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except OSError:
        pass
    return os.environ.get("MAGR_COMMIT", "unknown")


# requirements of magr that the device's Python lacks: the script must not need them
NOT_ON_DEVICE = ("datasets", "sentencepiece", "pandas", "gguf", "lm_eval", "matplotlib", "seaborn", "dvc")


def foreign_modules() -> list[str]:
    return sorted({m.split(".")[0] for m in sys.modules} & set(NOT_ON_DEVICE))


# the cheap checks first: a device call cut short still has them
CHECKS = {"e2e": check_e2e, "export": check_export, "block": check_block, "cd": check_cd}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    assets = ROOT / ".gpu" / "assets"
    ap.add_argument("--stories", default=str(assets / "stories260K"), help="stories260K folder (config, safetensors)")
    ap.add_argument("--tokens", default=str(assets / "tinystories_tokens.pt"), help="TinyStories tokens (.pt)")
    ap.add_argument("--prepare-assets", default=None, metavar="DIR", help="write the e2e assets to DIR and stop")
    ap.add_argument("--checks", default=",".join(CHECKS), help="comma list of: " + ", ".join(CHECKS))
    ap.add_argument("--cd-passes", type=int, default=30)
    ap.add_argument("--cd-layers", default=",".join(LLAMA), help="comma list of: " + ", ".join(LLAMA))
    ap.add_argument("--cd-ref-rows", type=int, default=512, help="rows of each CD layer the C kernel recomputes")
    ap.add_argument("--ref-iters", type=int, default=200, help="ISTA iterations of the reference MagR solver")
    ap.add_argument("--eval-tokens", type=int, default=None, help="evaluation tokens (default CUDA 32768, CPU 8192)")
    ap.add_argument("--budget-s", type=float, default=420, help="start no new row after this many seconds")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--out", default=None, help="report (default reports/gpu_check.md, without CUDA "
                                                "reports/gpu_check_cpu.md)")
    args = ap.parse_args(argv)
    if args.prepare_assets:
        prepare_assets(Path(args.prepare_assets))
        return 0
    t0 = time.time()
    device = torch.device("cuda" if CUDA else "cpu")
    dev, versions = describe()
    head = (f"device: {dev}; " + ", ".join(f"{k} {v}" for k, v in versions.items())
            + f"; commit {commit(args.commit)}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(head, flush=True)
    out = Path(args.out) if args.out else ROOT / "reports" / ("gpu_check.md" if CUDA else "gpu_check_cpu.md")
    table = Table(t0 + args.budget_s, out, head)
    for name in [c.strip() for c in args.checks.split(",") if c.strip()]:
        try:
            CHECKS[name](table, args, device)
        except Exception as exc:  # one failed check must not hide the others
            table.add(name, "", f"{type(exc).__name__}: {str(exc)[:300]}", "", "FAILED")
    total = time.time() - t0
    print(f"\n{head}\n\n{table.markdown()}\ntotal {total:.0f} s; modules the device lacks that were imported: "
          f"{', '.join(foreign_modules()) or 'none'}", flush=True)
    table.write(done=True)
    return 1 if any(r[4] == "FAILED" for r in table.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
