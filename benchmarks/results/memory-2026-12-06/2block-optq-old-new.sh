# old code (HEAD worktree) then new code (working tree): the same streamed OPTQ command, one thread each
set -e
for v in old new; do
  if [ $v = old ]; then SRC=/work/wt-old; else SRC=/work/main; fi
  cd $SRC
  OMP_NUM_THREADS=1 PYTHONPATH=$SRC /work/main/.venv/bin/python /work/main/benchmarks/peak_rss.py --limit-gib 12 --log /work/memlogs/$v.rss.jsonl -- /work/main/.venv/bin/python -m magr quantize \
    --model /work/big2 --method optq --dtype float32 --device cpu --bits 4 --calib c4 --nsamples 4 --seqlen 128 \
    --load stream --no-save --out /work/memlogs/out-$v > /work/memlogs/$v.out 2> /work/memlogs/$v.log
  tail -1 /work/memlogs/$v.out
done
