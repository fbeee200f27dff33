#!/bin/bash
# Session 4: more seeds of the head alone and of the learned energy target (role blocks, 50-step warm-up, H learned
# on the first 50 steps). The other runs were started one by one with the commands in BENCHMARKS.md.
cd /work/main
D=benchmarks/results/curvature_lora_energy
for seed in "$@"; do
  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/curvature_lora.py --method head --lr 0.1 --seed $seed --steps 300 \
    --out $D/head_lr0.1_s$seed.json > $D/head_lr0.1_s$seed.log 2>&1 &
  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/curvature_lora.py --method energy --blocks role --curvature-steps 50 \
    --warmup 50 --lr 0.1 --seed $seed --steps 300 --out $D/energy_lr0.1_w50_n50_s${seed}_role.json \
    > $D/energy_lr0.1_w50_n50_s${seed}_role.log 2>&1
  wait
done
