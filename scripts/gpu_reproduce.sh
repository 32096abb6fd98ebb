#!/usr/bin/env bash
# Issue 7: the paper's CIFAR-10 numbers re-measured on one GPU, in a few device calls.
#
# From the repository root on the GPU machine, with ../shared/data/cifar10-jpeg.tar.gz copied
# to .data/ (git-ignored; carry it with the device tool's `carry: [".data"]`):
#
#   bash scripts/gpu_reproduce.sh STAGE [OUT]
#
# One STAGE per call, each sized to finish inside a 10-minute call on an H100 at the trainer's
# measured speed (check `allconv benchmark` first):
#   bench      benchmarks/bench_train.py on the GPU (the GPU rows of benchmarks/RESULTS.md)
#   fast       fast-cifar10: time to the paper's 90.92 % (test error per epoch in metrics.jsonl)
#   paper      all-cnn-c, paper-cifar10 (Table 3; paper 9.08 % error)
#   paper-aug  all-cnn-c, paper-cifar10-aug (Table 4; paper 7.25 %)
#   ablate-c   the C family, paper-cifar10, one model per call: MODELS=model-c bash ... ablate-c
# Results (summaries, metrics, tables, curves) are copied to OUT (default $OUT, else results/)
# as soon as each stage ends, with nvidia-smi, versions and the command.
set -euo pipefail
stage=${1:?usage: gpu_reproduce.sh bench|fast|paper|paper-aug|ablate-c [OUT]}
out=${2:-${OUT:-results}}
data=${DATA:-/tmp/cifar10}
mkdir -p "$out"
if [ ! -d "$data/train" ]; then
  mkdir -p "$data" && tar -xzf .data/cifar10-jpeg.tar.gz -C "$data"
fi
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
allconv() { python3 -m allconv_cli "$@"; }
{
  date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, timm, allconv_cli; print('torch', torch.__version__, 'timm', timm.__version__, 'allconv', allconv_cli.__version__)"
  echo "stage: $stage"
} > "$out/env-$stage.txt"

train_and_eval() {  # NAME PRESET [options...]
  local name=$1 preset=$2; shift 2
  local cmd=(train --preset "$preset" --dataset imagefolder --data-dir "$data" --out "runs/$name" "$@")
  echo "allconv ${cmd[*]}" >> "$out/env-$stage.txt"
  local start=$SECONDS
  allconv "${cmd[@]}" --json > "$out/$name.json"
  echo "$((SECONDS - start)) s wall, data loading included" > "$out/$name.time"
  allconv eval "runs/$name" --json --out "$out/$name-confusion.png" > "$out/$name-eval.json"
  cp "runs/$name/metrics.jsonl" "$out/$name-metrics.jsonl"
  cp "runs/$name/curves.png" "$out/$name-curves.png"
}

case $stage in
  bench) python3 benchmarks/bench_train.py --device cuda | tee "$out/bench.md" ;;
  fast) train_and_eval fast-cifar10 fast-cifar10 ;;
  paper) train_and_eval paper-cifar10 paper-cifar10 ;;
  paper-aug) train_and_eval paper-cifar10-aug paper-cifar10-aug ;;
  ablate-c)
    allconv ablate --models "${MODELS:?name one model per call, e.g. MODELS=model-c}" --preset paper-cifar10 \
      --dataset imagefolder --data-dir "$data" --out runs/ablation-c --json > "$out/ablation-${MODELS}.json"
    cp runs/ablation-c/table.* runs/ablation-c/chart.png "$out/" ;;
  *) echo "unknown stage $stage: use bench, fast, paper, paper-aug or ablate-c" >&2; exit 2 ;;
esac
echo "done: $stage -> $out"
