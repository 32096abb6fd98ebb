# One H200 call (2026-12-04, call 4): the paper protocol for All-CNN-C first (its 350 epochs,
# compiled with CUDA graphs), a diagnosis of the failing deterministic CUDA run beside it, then
# the step benchmarks of issue 39 and the fast recipe compiled. Everything lands in $OUT as it ends.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 ALLCONV_CACHE_DIR=/tmp/allconv-cache
A="python3 -m allconv_cli"
T0=$(date +%s)
RESULTS=$OUT; OUT=/tmp/out; mkdir -p $OUT  # $RESULTS gets all.tar.gz (rewritten every 15 s) and log.txt
pack() { for d in /dev/shm/runs/paper-* /tmp/runs/fast; do for f in metrics.jsonl result.json config.json; do
           cp $d/$f $OUT/$(basename $d)-$f 2>/dev/null; done; done
         tar -czf /tmp/all.tar.gz -C $OUT . && cp /tmp/all.tar.gz $RESULTS/all.tar.gz.part && mv $RESULTS/all.tar.gz.part $RESULTS/all.tar.gz
         cp $OUT/log.txt $RESULTS/log.txt 2>/dev/null; }
(while sleep 15; do pack; done) &
log() { echo "[$(( $(date +%s) - T0 )) s] $*" >> $OUT/log.txt; }
(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
 python3 -c "import torch,torchvision,timm;print(torch.__version__,torchvision.__version__,timm.__version__)"
 git log -1 --format=%h; nproc) > $OUT/env.txt 2>&1
mkdir -p /tmp/data/cifar10 /tmp/runs && tar -xzf .carry/cifar10-jpeg.tar.gz -C /tmp/data/cifar10
log "unpacked"
DATA="--dataset imagefolder --data-dir /tmp/data/cifar10"
PAPER=/dev/shm/runs/paper-all-cnn-c  # tmpfs: 350 checkpoints of 49 MB (the ZCA matrix twice) cost no fsync
mkdir -p /dev/shm/runs
(timeout -s TERM ${PAPER_S:-440} $A train --preset paper-cifar10 $DATA --device cuda --compile --eval-every 5 \
   --out $PAPER --json > $OUT/paper.json 2> $OUT/paper.err
 rc=$?; log "paper (compiled) rc $rc"
 used=$(( $(date +%s) - T0 ))
 if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $used -lt 250 ]; then  # compiling failed early: the eager step instead
   PAPER=$PAPER-eager
   timeout -s TERM $(( ${PAPER_S:-440} - used )) $A train --preset paper-cifar10 $DATA --device cuda --eval-every 5 \
     --out $PAPER --json > $OUT/paper-eager.json 2> $OUT/paper-eager.err
   log "paper (eager) rc $?"
 fi) &
PID=$!
timeout 90 $A train --preset smoke --train-limit 512 --test-limit 256 --epochs 2 --device cuda --precision bf16 \
  --deterministic --out /tmp/runs/det --json > $OUT/det.json 2> $OUT/det.err
log "deterministic run rc $?"
timeout -s INT 170 python3 -m pytest -q -x -p no:cacheprovider -m gpu tests/test_gpu.py -rA --tb=short \
  -k "captured or resumes_bit_exactly" > $OUT/gpu-tests.txt 2>&1
log "gpu tests rc $?"
wait $PID
for args in "" "--compile" "--preset fast-cifar10" "--preset fast-cifar10 --compile" "--preset paper-cifar10 --compile" \
            "--batch-size 512" "--batch-size 512 --compile"; do
  left=$(( ${BUDGET_S:-540} - ($(date +%s) - T0) ))
  [ $left -lt 45 ] && { log "no time for benchmark $args"; continue; }
  echo "{\"args\": \"$args\", \"out\": $(timeout 60 $A benchmark --mode train --device cuda --steps 100 --warmup 30 \
    --json $args 2>>$OUT/bench.err || echo null)}" >> $OUT/bench.jsonl
  log "benchmark $args"
done
left=$(( ${BUDGET_S:-540} - ($(date +%s) - T0) ))
if [ $left -gt 60 ]; then
  timeout -s TERM $(( left - 10 )) $A train --preset fast-cifar10 $DATA --device cuda --compile --out /tmp/runs/fast \
    --json > $OUT/fast.json 2> $OUT/fast.err
  log "fast-cifar10 compiled rc $?"
fi
log "done"; pack
