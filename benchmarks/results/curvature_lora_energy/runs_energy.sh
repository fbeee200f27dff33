#!/bin/bash
# Session 4, the energy target as committed (row-weight floor ENERGY_WEIGHT_FLOOR = 1e-2; the runs with 1e-3 are in
# weight_floor_1e-3/): role blocks, H learned on the first 50 steps, 50-step warm-up, lr 0.1, two runs at a time.
# Arguments: "trainer SEED" (HiSoTrainer + HiSoConfig) or "loop SEED" (the benchmark's own loop).
cd /work/main
D=benchmarks/results/curvature_lora_energy
run() {
  local name=energy_lr0.1_w50_n50_s$2_role extra=""
  if [ $1 = trainer ]; then name=trainer_$name; extra=--trainer; fi
  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/curvature_lora.py --method energy $extra --blocks role \
    --curvature-steps 50 --warmup 50 --lr 0.1 --seed $2 --steps 300 --out $D/$name.json > $D/$name.log 2>&1
}
while [ $# -gt 0 ]; do
  run $1 &
  [ $# -gt 1 ] && run $2 &
  wait
  shift; shift
done
