#!/bin/bash
# SmolLM2-135M, one setting: uninterrupted vs SIGKILL after block 11 + resume
set -x
cd /work/wt-robust
export OMP_NUM_THREADS=1 PYTHONPATH=/work/wt-robust MAGR_SHARED=/work/shared HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=/work/main/.venv/bin/python
ARGS="--model smollm2-135m --method magr+optq --bits 3 --calib c4 --nsamples 4 --seqlen 512 --no-true-sequential --iters 14"
rm -rf /tmp/robust/smol/ref /tmp/robust/smol/res
/usr/bin/time -f "ref %e s" $PY -m magr quantize $ARGS --out /tmp/robust/smol/ref > /tmp/robust/smol/ref.log 2>&1; echo "ref rc=$?"
/usr/bin/time -f "killed %e s" $PY tests/fault_runner.py kill-after 11 -- quantize $ARGS --out /tmp/robust/smol/res > /tmp/robust/smol/killed.log 2>&1; echo "killed rc=$?"
ls /tmp/robust/smol/res/.blocks | wc -l
/usr/bin/time -f "resume %e s" $PY -m magr quantize $ARGS --out /tmp/robust/smol/res > /tmp/robust/smol/resume.log 2>&1; echo "resume rc=$?"
$PY - <<'PY'
import json, torch
from safetensors.torch import load_file
for name in ("model.safetensors", "magr_qparams.safetensors"):
    a, b = load_file(f"/tmp/robust/smol/ref/{name}"), load_file(f"/tmp/robust/smol/res/{name}")
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(name, len(a), "tensors, bit-identical:", same)
r = json.load(open("/tmp/robust/smol/res/magr_run.json"))
print("resumed_blocks", r["resumed_blocks"])
PY
