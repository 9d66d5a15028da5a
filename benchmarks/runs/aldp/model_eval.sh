#!/usr/bin/env bash
# Issue 14, ALDP: score the trained chiral_egnn (runs/aldp_h64; the `qmanifold train` command is in COMMANDS.md).
#   select   sampler choice against the TRAINING MD run (seed 0): 1000 samples per time grid, 50 steps
#   report   once, against the independent MD run (seed 1): 10,000 samples (2 x 5000 with seeds 0 and 1, run
#            side by side on the 2 cores, concatenated), GRID = the selected time grid
#   ess      N samples (default 500) with Hutchinson log-densities (Heun, 10 steps, 4 probes): ESS, reweighted plots
# Usage: bash benchmarks/runs/aldp/model_eval.sh select | report GRID | ess [N]
set -euo pipefail
ck=${CKPT:-runs/aldp_h64/best.pt}
train=runs/aldp_data/aldp_20ns_seed0.npz
test=runs/aldp_data/aldp_20ns_seed1.npz
out=runs/aldp_eval
mkdir -p "$out"
export OMP_NUM_THREADS=1
common=(--steps 50 --refine none --stereo-retries 0 --no-stereo-repair --threads 1 --no-progress --batch-size 250 --overwrite)
case "$1" in
  select)
    for grid in uniform edm; do
      qmanifold sample --checkpoint "$ck" --data "$train" -n 1000 --time-grid "$grid" --seed 11 "${common[@]}" \
        --out "$out/select_$grid.sdf" &
    done
    wait
    for grid in uniform edm; do
      qmanifold evaluate-boltzmann --system aldp --samples "$out/select_$grid.sdf" --reference "$train" \
        --json "$out/select_$grid.json" --overwrite
    done ;;
  report)
    for seed in 0 1; do
      qmanifold sample --checkpoint "$ck" --data "$train" -n 5000 --time-grid "$2" --seed "$seed" "${common[@]}" \
        --out "$out/test_part$seed.sdf" &
    done
    wait
    cat "$out/test_part0.sdf" "$out/test_part1.sdf" > "$out/test_10000.sdf"
    qmanifold evaluate-boltzmann --system aldp --samples "$out/test_10000.sdf" --reference "$test" \
      --json "$out/test_10000.json" --plots "$out/plots_test_10000" --overwrite ;;
  ess)
    qmanifold evaluate-boltzmann --system aldp --checkpoint "$ck" --reference "$test" --n "${2:-500}" \
      --method heun --steps 10 --nll-estimator hutchinson --probes 4 --batch-size 100 --threads 1 --seed 0 \
      --json "$out/test_ess.json" --plots "$out/plots_test_ess" --overwrite ;;
  *) echo "usage: $0 select | report GRID | ess [N]" >&2; exit 2 ;;
esac
