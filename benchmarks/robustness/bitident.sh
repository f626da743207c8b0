#!/bin/bash
cd /work/wt-robust
export OMP_NUM_THREADS=1 PYTHONPATH=/work/wt-robust MAGR_SHARED=/work/shared HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=/work/main/.venv/bin/python
W=/tmp/robust/bitident; rm -rf $W; mkdir -p $W
for m in rtn optq magr+optq magr+optq-cd; do
  ARGS="--model stories260k --method $m --bits 3 --calib tinystories --nsamples 16 --seqlen 256 --iters 50"
  $PY -m magr quantize $ARGS --out $W/$m-ref > $W/$m-ref.log 2>&1; r1=$?
  for fault in kill-after:2 kill-mid-write:3 enospc:1; do
    f=${fault%:*}; k=${fault#*:}
    $PY tests/fault_runner.py $f $k -- quantize $ARGS --out $W/$m-$f > $W/$m-$f-1.log 2>&1; r2=$?
    $PY -m magr quantize $ARGS --out $W/$m-$f > $W/$m-$f-2.log 2>&1; r3=$?
    $PY - $W/$m-ref $W/$m-$f "$m $f@$k rc ref=$r1 faulted=$r2 resumed=$r3" <<'PY'
import json, sys, torch
from safetensors.torch import load_file
a, b, label = sys.argv[1:]
same = all(torch.equal(x[k], y[k]) for n in ("model.safetensors", "magr_qparams.safetensors")
           for x, y in [(load_file(f"{a}/{n}"), load_file(f"{b}/{n}"))] for k in x) 
print(f"{label}: resumed_blocks={json.load(open(b + '/magr_run.json'))['resumed_blocks']} bit-identical={same}")
PY
  done
done
