#!/bin/bash
# Session 3: snr with warm-up / every 4, seed 0.
cd /work/main
D=benchmarks/results/curvature_lora_s3
run() { # method lr warmup seed
  name=$1_lr$2_w$3_s$4
  [ -f $D/$name.json ] && return
  echo "=== $name $(date +%T)" >> $D/runs.log
  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/curvature_lora.py --method $1 --lr $2 --warmup $3 --seed $4 --steps 300 --out $D/$name.json >> $D/runs.log 2>&1
}
run snr 0.1 30 0
run snr4 0.1 60 0
run snr4 0.03 0 0
run snr 0.05 30 0
echo "=== done $(date +%T)" >> $D/runs.log
