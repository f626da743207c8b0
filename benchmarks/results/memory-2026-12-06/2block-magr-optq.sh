cd /work/main
OMP_NUM_THREADS=1 /work/main/.venv/bin/python /work/main/benchmarks/peak_rss.py --limit-gib 14 --log /work/memlogs/magr.rss.jsonl -- /work/main/.venv/bin/python -m magr quantize \
    --model /work/big2 --method magr+optq --dtype float32 --device cpu --bits 4 --calib c4 --nsamples 4 --seqlen 128 \
    --solver spg --iters 20 --precision bf16 --load stream --no-save --out /work/memlogs/out-magr > /work/memlogs/magr.out 2> /work/memlogs/magr.log
tail -1 /work/memlogs/magr.out
