#!/usr/bin/env bash
cd /work/main && . .venv/bin/activate
while [ ! -f runs/aldp_data/aldp_20ns_seed0.npz ]; do sleep 20; done
sleep 5
export OMP_NUM_THREADS=1
qmanifold train --data runs/aldp_data/aldp_20ns_seed0.npz --model chiral_egnn --hidden 64 --layers 4 \
  --steps 15000 --batch-size 32 --lr 1e-3 --warmup 200 --ckpt-every 250 --val-every 1000 --val-limit 200 \
  --log-every 50 --seed 0 --threads 1 --no-progress --out runs/aldp_h64
