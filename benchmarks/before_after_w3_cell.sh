#!/usr/bin/env bash
# Issue 19 acceptance 1: per-seed time of a W3 MagR+OPTQ cell at the earlier default's settings (4 x 512, 4 windows),
# before (float32 forwards, FISTA 14) and after (bfloat16 forwards, SPG 16 bf16), back to back, 2 threads, twice.
set -e
# needs runs/model (the prepare stage: python scripts/prepare_model.py --source smollm2-135m --dtype float32 --out runs/model)
cd "$(dirname "$0")/.."
export MAGR_SHARED=${MAGR_SHARED:-$(cd .. && pwd)/shared} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE
COMMON="--model runs/model --dtype float32 --device cpu --calib c4 --nsamples 4 --seqlen 512 --seed 0 --sampler released
 --eval_sets wikitext2 c4 --eval_seqlen 512 --max_windows 4 --eval_batch 1 --feature_source last_sample
 --no-true-sequential --method magr+optq --bits 3 --no-save"
for rep in 1 2; do
  for v in before after; do
    if [ $v = before ]; then X="--forward-dtype float32 --solver fista --iters 14"; else X="--forward-dtype bfloat16 --solver spg --iters 16 --precision bf16"; fi
    /usr/bin/time -f "$v rep $rep: wall %e s" ${VENV:-.venv}/bin/magr quantize $COMMON $X --out ${OUT:-/tmp/magr_before_after}/ba-$v-$rep 2>&1 | grep -E "wall" 
  done
done
${VENV:-.venv}/bin/python - <<'PY'
import json, os
for rep in (1, 2):
    for v in ("before", "after"):
        d = os.environ.get("OUT", "/tmp/magr_before_after") + f"/ba-{v}-{rep}"
        m = json.load(open(f"{d}/magr_run.json")); L = json.load(open(f"{d}/magr_layers.json"))
        recs = L if isinstance(L, list) else L.get("layers", L)
        mg = sum(r.get("seconds_magr", 0) for r in recs); q = sum(r.get("seconds_quant", 0) for r in recs); rf = sum(r.get("seconds_refine", 0) for r in recs)
        ev = sum(x["seconds"] for x in m["ppl"].values())
        print(f"{v} rep {rep}: quantize {m['seconds']:.1f} s = MagR {mg:.1f} + OPTQ {q:.1f} + CD {rf:.1f} + forwards/stats {m['seconds']-mg-q-rf:.1f}; evaluation {ev:.1f} s; ppl " + ", ".join(f"{k} {x['ppl']:.2f}" for k, x in m["ppl"].items()))
PY
