#!/bin/bash
cd /work/main
. .venv/bin/activate
export OMP_NUM_THREADS=1
date
nice -n 15 qmanifold train-boltzmann --data /tmp/boltz/dw4_n20000_seed0.npz --out /tmp/boltz/dw4_run --steps 10000 --batch-size 256 --lr 5e-4 --no-progress
date
nice -n 15 qmanifold data lj13 --n 10000 --out /tmp/boltz/lj13_n10000_seed0.npz --no-progress
date
