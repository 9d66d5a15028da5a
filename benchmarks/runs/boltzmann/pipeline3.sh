#!/bin/bash
cd /work/main
. .venv/bin/activate
export OMP_NUM_THREADS=1
date
nice -n 15 qmanifold evaluate-boltzmann --system lj13 --checkpoint /tmp/boltz/lj13_run/last.pt --n 500 --n-nll 2000 --nll-estimator hutchinson --steps 20 --batch-size 100 --json /tmp/boltz/lj13_eval.json --plots /tmp/boltz/lj13_plots
date
