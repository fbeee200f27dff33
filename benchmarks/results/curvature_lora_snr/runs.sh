#!/bin/bash
# Session 3: snr (with the lower confidence bound on gamma) with warm-up / every 4 / role blocks.
# Each argument: "METHOD LR WARMUP SEED [BLOCKS]".
cd /work/main
D=benchmarks/results/curvature_lora_snr
run() { # method lr warmup seed [blocks]
  blocks=${5:-tensor}
  name=$1_lr$2_w$3_s$4; [ $blocks = role ] && name=${name}_role
  [ -f $D/$name.json ] && return
  echo "=== $name $(date +%T)" >> $D/runs.log
  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/curvature_lora.py --method $1 --lr $2 --warmup $3 --seed $4 --blocks $blocks --steps 300 --out $D/$name.json >> $D/runs.log 2>&1
}
for spec in "$@"; do run $spec; done
echo "=== done $(date +%T)" >> $D/runs.log
