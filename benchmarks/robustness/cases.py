"""Rerun every case of issue 14 against the magr at CODE: python cases.py CODE WORK [case ...]."""
import json, os, shutil, signal, subprocess, sys, time, hashlib
from pathlib import Path
CODE, WORK = Path(sys.argv[1]), Path(sys.argv[2])
only = sys.argv[3:]
M = Path("/tmp/robust/models")
PY = "/work/main/.venv/bin/python"
ENV = {**os.environ, "PYTHONPATH": str(CODE), "MAGR_SHARED": "/work/shared", "OMP_NUM_THREADS": "1",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
SMALL = ["--calib", "tinystories", "--nsamples", "4", "--seqlen", "64", "--iters", "10", "--bits", "3"]

def magr(*args, timeout=900):
    p = subprocess.run([PY, "-m", "magr", *map(str, args)], env=ENV, capture_output=True, text=True, timeout=timeout)
    return p

def tail(p, n=2):
    import re
    err = p.stderr or ""
    hits = re.findall(r"(magr\.checkpoints WARNING [^\n]*|magr \w+: [^\n]*|\w*Error: [^\n]*|KeyboardInterrupt)", err)
    if hits:
        return " | ".join(h[:330] for h in hits[-n:])
    lines = [l for l in err.splitlines() if l.strip() and "it/s]" not in l and "block/s" not in l and "s/block" not in l
             and " INFO " not in l and "[transformers]" not in l]
    return " | ".join(lines[-n:])[-400:]

def py(code):
    p = subprocess.run([PY, "-c", code], env=ENV, capture_output=True, text=True)
    if p.returncode: print(p.stderr[-2000:])
    return p.stdout.strip()

def weights(folder):
    return py(f"""
from safetensors.torch import load_file; import hashlib
t = load_file('{folder}/model.safetensors'); h = hashlib.sha256()
for k in sorted(t): h.update(k.encode()); h.update(t[k].float().numpy().tobytes())
print(h.hexdigest()[:16])""")

def has_nan(folder):
    return py(f"""
from safetensors.torch import load_file; import torch
t = load_file('{folder}/model.safetensors'); print([k for k in t if not torch.isfinite(t[k]).all()])""")

def ckpt(model, out, dtype="float32", method="magr+optq"):
    """leave block checkpoints of `model` in out/.blocks (as an interrupted or earlier run does)"""
    py(f"""
import torch
from magr.pipeline.models import load_model, DTYPES
from magr.core.methods import QuantConfig
try:
    from magr.pipeline.calibration_data import Calibration  # this tree
except ImportError:
    from magr.pipeline.data import Calibration  # 54cbdd3 and the robustness branch
from magr.pipeline.blocks import quantize_model
net, tok = load_model('{model}', dtype=DTYPES['{dtype}'])
calib = Calibration('tinystories', 4, 64).tokens(tok)
quantize_model(net, calib, QuantConfig.build(method='{method}', bits=3, iters=10), device='cpu', progress=False,
               checkpoint_dir='{out}/.blocks')""")

def fresh(name):
    d = WORK / name
    shutil.rmtree(d, ignore_errors=True)
    return d

def report(case, p, extra=""):
    print(f"## {case}\n   rc={p.returncode}  {extra}\n   stderr: {tail(p)}\n", flush=True)

CASES = {}
def case(f):
    CASES[f.__name__] = f
    return f

@case
def other_model_checkpoints():
    ref = fresh("b_fresh"); magr("quantize", "--model", M / "b", "--out", ref, *SMALL)
    out = fresh("b_into_a"); ckpt(M / "a", out)
    p = magr("quantize", "--model", M / "b", "--out", out, *SMALL)
    a = fresh("a_fresh"); magr("quantize", "--model", M / "a", "--out", a, *SMALL)
    w = weights(out)
    report("model B into an --out holding model A's checkpoints", p,
           f"weights == fresh B: {w == weights(ref)}; == fresh A: {w == weights(a)}")

@case
def dtype_checkpoints():
    ev = ["--eval-sets", "tinystories", "--eval-seqlen", "128", "--max-windows", "8"]
    ref = fresh("bf16_fresh"); magr("quantize", "--model", M / "a", "--dtype", "bfloat16", "--out", ref, *SMALL, *ev)
    out = fresh("bf16_into_f32"); ckpt(M / "a", out, "float32")
    p = magr("quantize", "--model", M / "a", "--dtype", "bfloat16", "--out", out, *SMALL, *ev)
    ppl = lambda d: json.loads((d / "magr_run.json").read_text())["ppl"]["tinystories"]["ppl"]
    report("bfloat16 run into an --out holding float32 checkpoints", p,
           f"ppl {ppl(out):.4f} vs fresh bf16 {ppl(ref):.4f}; weights identical: {weights(out) == weights(ref)}")

@case
def nan_then_fixed():
    out = fresh("nan_fixed")
    p1 = magr("quantize", "--model", M / "nan", "--method", "rtn", "--out", out, *SMALL)
    # the user fixes the model (here: the same folder name now holds the good weights) and reruns
    fixed = fresh("models_fixed"); shutil.copytree(M / "nan", fixed); shutil.copy(M / "a" / "model.safetensors", fixed)
    shutil.rmtree(out / "model.safetensors", ignore_errors=True)
    p1b = magr("quantize", "--model", fixed, "--method", "rtn", "--out", out, *SMALL)
    report("NaN model quantized (rtn), model fixed, rerun into the same --out", p1b,
           f"first run rc={p1.returncode}; after the fix, non-finite tensors in the saved model: {has_nan(out)}")

@case
def out_is_input():
    src = fresh("inplace_model"); shutil.copytree(M / "a", src)
    h = hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()
    p = magr("quantize", "--model", src, "--out", src, *SMALL)
    h2 = hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()
    report("--out equal to the input model folder", p, f"float model.safetensors unchanged: {h == h2}")

@case
def nan_weights():
    for method in ("rtn", "optq", "magr+optq"):
        out = fresh(f"nan_{method}")
        t0 = time.time(); p = magr("quantize", "--model", M / "nan", "--method", method, "--out", out, *SMALL)
        blocks = len(list((out / ".blocks").glob("*.pt"))) if (out / ".blocks").exists() else 0
        report(f"NaN weight, {method}", p, f"saved model non-finite tensors: {has_nan(out) if (out / 'model.safetensors').exists() else 'no model'}; block checkpoints: {blocks}")
    out = fresh("inf_optq"); p = magr("quantize", "--model", M / "inf", "--method", "optq", "--out", out, *SMALL)
    report("Inf weight, optq", p)

def _damaged(name, damage):
    ref = fresh("dmg_ref"); magr("quantize", "--model", M / "a", "--out", ref, *SMALL)
    out = fresh(name); ckpt(M / "a", out)
    for f in sorted((out / ".blocks").glob("block_00[34].*")): f.unlink()  # crashed while writing block 2
    damage(out / ".blocks")
    p = magr("quantize", "--model", M / "a", "--out", out, *SMALL)
    ok = (out / "model.safetensors").exists() and weights(out) == weights(ref)
    return p, ok

@case
def zero_byte_json():
    p, ok = _damaged("dmg_json", lambda d: (d / "block_002.json").write_bytes(b""))
    report("0-byte block_002.json (disk full) then rerun", p, f"result identical to an uninterrupted run: {ok}")

@case
def truncated_pt():
    def trunc(d):
        b = (d / "block_002.pt").read_bytes(); (d / "block_002.pt").write_bytes(b[: len(b) // 2])
    p, ok = _damaged("dmg_pt", trunc)
    report("truncated block_002.pt then rerun", p, f"result identical to an uninterrupted run: {ok}")

@case
def eval_settings():
    for flags, what in ((["--eval-seqlen", "0"], "--eval-seqlen 0"), (["--max-windows", "0"], "--max-windows 0"),
                        (["--eval-sets", "/tmp/robust/short.txt", "--eval-seqlen", "128"], "eval text shorter than one window")):
        out = fresh("evalbad"); t0 = time.time()
        p = magr("quantize", "--model", M / "a", "--out", out, *SMALL, "--eval-sets", "tinystories", *flags)
        blocks = (out / ".blocks").exists() and len(list((out / ".blocks").glob("*.pt")))
        report(what, p, f"blocks quantized before the error: {blocks}; {time.time() - t0:.1f} s")

@case
def unwritable_out():
    p = magr("quantize", "--model", M / "a", "--out", "/tmp/robust/afile/sub", "--no-save", *SMALL, "--eval-sets", "tinystories", "--eval-seqlen", "128")
    report("unwritable --out with --no-save", p, f"quantized first: {'quantiz' in p.stderr and 'w3' in p.stderr}")

@case
def calib_seqlen_context():
    out = fresh("ctx")
    p = magr("quantize", "--model", M / "a", "--out", out, "--method", "rtn", "--calib", "tinystories", "--nsamples", "2", "--seqlen", "1024")
    report("--seqlen 1024 > max_position_embeddings 512", p)

@case
def gemma2_masks():
    out = py("""
import torch
from magr.pipeline.models import load_model
from magr.pipeline.calibration import walk_blocks
m, _ = load_model('/tmp/robust/models/gemma2')
calib = torch.randint(3, 512, (2, 128), generator=torch.Generator().manual_seed(0))
hs = m(calib, output_hidden_states=True).hidden_states
errs = [float((b.inps - hs[b.index]).abs().max()) for b in walk_blocks(m, calib, 'cpu')]
print(' '.join(f'{e:.2e}' for e in errs))""")
    print(f"## Gemma2 (window 32, seqlen 128): max |block input - true hidden state| per block: {out}\n")
    o = fresh("gemma_cli")
    p = magr("quantize", "--model", M / "gemma2", "--out", o, "--method", "rtn", "--calib", "tinystories", "--nsamples", "2", "--seqlen", "128")
    report("Gemma2 quantize via CLI", p)

@case
def missing_model():
    report("missing model folder", magr("quantize", "--model", "/tmp/robust/nope", "--out", fresh("x"), *SMALL))

@case
def cuda_missing():
    report("--device cuda without CUDA", magr("quantize", "--model", M / "a", "--device", "cuda", "--out", fresh("x"), *SMALL))

@case
def os_error():
    report("OS error: --out below a file", magr("quantize", "--model", M / "a", "--out", "/tmp/robust/afile/sub", *SMALL))

@case
def ctrl_c():
    out = fresh("ctrlc")
    proc = subprocess.Popen([PY, "-m", "magr", "quantize", "--model", "stories260k", "--out", str(out), "--method", "magr+optq-cd",
                             "--calib", "tinystories", "--nsamples", "64", "--seqlen", "256", "--iters", "200", "--solver", "ista"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while time.time() - t0 < 300 and not list((out / ".blocks").glob("block_001.json")) if True else False:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    class P: pass
    p = P(); p.returncode = proc.returncode; p.stderr = err
    report("Ctrl-C during block 2", p, f"'Traceback' in stderr: {'Traceback' in err}; stderr lines: {len(err.splitlines())}")

@case
def bad_numbers():
    for flags in (["--blocksize", "0"], ["--group-size", "0"], ["--group-size", "-1"]):
        report(" ".join(flags), magr("quantize", "--model", M / "a", "--out", fresh("x"), *SMALL, *flags))

@case
def unsupported_arch():
    t0 = time.time(); p = magr("quantize", "--model", M / "gpt2", "--out", fresh("x"), *SMALL, "-v")
    report("unsupported architecture (GPT2 folder)", p, f"loaded weights/tokenized first: {'calibration:' in p.stderr or 'loading model' in p.stderr}")

@case
def zero_layer_json():
    out = fresh("zero")
    p = magr("quantize", "--model", M / "zero", "--method", "magr+rtn", "--out", out, *SMALL)
    try:
        json.loads((out / "magr_layers.json").read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
        strict = True
    except FileNotFoundError: strict = "no file"
    except ValueError as e: strict = f"invalid: {e}"
    report("all-zero layer: magr_layers.json strict JSON", p, f"strict: {strict}")

@case
def checkpoints_after_success():
    out = fresh("done")
    p = magr("quantize", "--model", M / "a", "--out", out, *SMALL)
    report("block checkpoints after success", p, f".blocks exists: {(out / '.blocks').exists()}")

for name, f in CASES.items():
    if not only or name in only:
        f()
