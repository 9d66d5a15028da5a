#!/usr/bin/env bash
# Issue 13 section 6 at the benchmark's default size: the 9 loss-comparison runs of commands.sh
# (same commands, same seeds; the checkpoints of the first round were not kept), each scored on the
# first 1000 EDM test molecules. Usage: bash benchmarks/runs/loss_sweep/rerun1000.sh [OUT_DIR]
set -euo pipefail
out=${1:-runs/sweep1000}
mkdir -p "$out"
for seed in 0 1 2; do
  for loss in quotient conventional af3_align; do
    run="$out/${loss}_seed${seed}"
    if [ ! -f "$run/best.pt" ]; then
      qmanifold train --data qm9-edm --heavy-atoms-only --model chiral_egnn --loss "$loss" --interpolant linear \
        --prediction x1 --hidden 64 --layers 4 --steps 2000 --batch-size 32 --lr 0.001 --warmup 200 \
        --val-every 2000 --ckpt-every 500 --seed "$seed" --threads 1 --no-progress --out "$run" --overwrite
    fi
    if [ ! -f "$run/bench1000.json" ]; then
      qmanifold benchmark conformers --checkpoint "$run/best.pt" --data qm9-edm --split test --limit 1000 \
        --no-etkdg --threads 1 --no-progress --seed "$seed" --json "$run/bench1000.json" --overwrite
    fi
  done
done
