#!/usr/bin/env bash
# Issue 14, ALDP stage 2: continue the h64 model (train_h64.sh, 15,000 steps, lr decayed) with a fresh
# cosine schedule at half the peak learning rate for 20,000 more steps on the same training MD run.
set -euo pipefail
export OMP_NUM_THREADS=1
qmanifold train --data runs/aldp_data/aldp_20ns_seed0.npz --model chiral_egnn --hidden 64 --layers 4 \
  --init-from runs/aldp_h64/best.pt --steps 20000 --batch-size 32 --lr 5e-4 --warmup 200 --ckpt-every 250 \
  --val-every 1000 --val-limit 200 --log-every 50 --seed 1 --threads 1 --no-progress --out runs/aldp_h64_s2
