#!/bin/bash
# Session 3: snr (with the lower confidence bound on gamma) with warm-up / every 4, seed 0.
cd /work/main
D=benchmarks/results/curvature_lora_s3
run() { # method lr warmup seed
  name=$1_lr$2_w$3_s$4
  [ -f $D/$name.json ] && return
  echo "=== $name $(date +%T)" >> $D/runs.log
  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/curvature_lora.py --method $1 --lr $2 --warmup $3 --seed $4 --steps 300 --out $D/$name.json >> $D/runs.log 2>&1
}
for spec in "$@"; do run $spec; done
echo "=== done $(date +%T)" >> $D/runs.log
