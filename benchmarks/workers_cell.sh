#!/usr/bin/env bash
# One quantize cell of the default (params.yaml's calibration, evaluation and quant settings) three ways, one after
# the other, each in a fresh process, printing wall seconds and every seed's perplexities (benchmarks/NOTES.md
# "Workers"):
#   threads2 : --workers 1, two torch threads (the default before workers)
#   threads1 : --workers 1, one torch thread (the reference the workers must equal bit for bit)
#   workers2 : --workers 2 (two one-thread processes)
# bash benchmarks/workers_cell.sh MODEL_FOLDER OUT [METHOD BITS SEEDS...]   e.g. runs/model /tmp/wk optq 4 0 1 2
set -euo pipefail
MODEL=$1; OUT=$2; METHOD=${3:-optq}; BITS=${4:-4}; shift $(( $# < 4 ? $# : 4 )); SEEDS=${*:-0 1 2}
MAGR=${MAGR:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/magr}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE TOKENIZERS_PARALLELISM=false
run() {  # name threads workers
  rm -rf "$OUT/$1"; local t0=$SECONDS
  OMP_NUM_THREADS=$2 MKL_NUM_THREADS=$2 "$MAGR" quantize --model "$MODEL" --load auto --dtype float32 \
    --forward-dtype bfloat16 --device cpu --workers "$3" --calib c4 --nsamples 16 --seqlen 512 --sampler released \
    --seeds $SEEDS --eval-sets wikitext2 c4 --eval-seqlen 512 --max-windows 16 --eval-batch 1 --solver spg --iters 20 \
    --precision bf16 --feature-source last_sample --no-true-sequential --method "$METHOD" --bits "$BITS" --no-save \
    --out "$OUT/$1" > "$OUT/$1.log" 2>&1
  python3 - "$OUT/$1" "$((SECONDS - t0))" <<'PY'
import json, sys
from pathlib import Path
runs = sorted(Path(sys.argv[1]).glob("seed-*/magr_run.json"))
ppl = {r.parent.name: {k: round(v["ppl"], 4) for k, v in json.loads(r.read_text())["ppl"].items()} for r in runs}
print(f"{Path(sys.argv[1]).name}: {sys.argv[2]} s  {ppl}")
PY
}
mkdir -p "$OUT"
run threads2 2 1
run threads1 1 1
run workers2 1 2
