#!/bin/bash
# Multi-node pre-training of configs/gpt2-124m.yaml under SLURM: one torchrun per node, c10d rendezvous
# on the first node, FSDP2 within a node and hybrid sharding across nodes (train.dist: auto). A rank that
# dies restarts the whole job up to 3 times (--max-restarts); each restart resumes from the newest
# checkpoint (--resume starts fresh when there is none). Submit: sbatch configs/slurm-gpt2-124m.sh
#SBATCH --job-name=pocketlm-gpt2-124m
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
set -euo pipefail
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun torchrun \
  --nnodes "$SLURM_NNODES" --nproc-per-node 8 \
  --rdzv-backend c10d --rdzv-endpoint "$head_node:29500" --rdzv-id "$SLURM_JOB_ID" \
  --max-restarts 3 \
  -m pocketlm.cli pretrain --config configs/gpt2-124m.yaml --data runs/data-124m --out runs/gpt2-124m --resume
