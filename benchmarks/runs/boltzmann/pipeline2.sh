#!/bin/bash
cd /work/main
. .venv/bin/activate
export OMP_NUM_THREADS=1
date
nice -n 15 qmanifold train-boltzmann --data /tmp/boltz/lj13_n10000_seed0.npz --out /tmp/boltz/lj13_run --steps 6000 --batch-size 128 --lr 5e-4 --hidden 32 --layers 3 --no-progress
date
