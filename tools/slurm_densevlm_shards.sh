#!/bin/bash
# DenseVLM streamed from shards on several nodes with SLURM and accelerate (one task per node; accelerate starts
# one process per GPU on it). Submit: sbatch --nodes 4 tools/slurm_densevlm_shards.sh [--set key=value ...]
# The shards (data.shards in the recipe) are a folder every node can read, or an fsspec URL (s3://, gs://; the
# store's fsspec package installed, its credentials in the environment). Resubmitting after a failure with
# RESUME=1 continues from the last step checkpoint in output_dir (a shared folder), at the right shard and sample.
#SBATCH --job-name=densevlm-shards
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
set -euo pipefail
RECIPE=${RECIPE:-configs/train/densevlm_toy_shards.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
WORLD=$((SLURM_NNODES * GPUS_PER_NODE))
MASTER=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${PORT:-29500}
EXTRA=()
[[ "${RESUME:-0}" == 1 ]] && EXTRA+=(--resume)
# srun starts one launcher per node; SLURM_NODEID is that node's machine rank. loop.world_size makes a node
# started with another count refuse to train instead of splitting the epoch wrongly.
srun --kill-on-bad-exit=1 bash -c "accelerate launch \
  --num_machines $SLURM_NNODES --machine_rank \$SLURM_NODEID --num_processes $WORLD \
  --main_process_ip $MASTER --main_process_port $PORT --multi_gpu --mixed_precision bf16 \
  -m densevlm.cli train -c $RECIPE --set loop.world_size=$WORLD $* ${EXTRA[*]:-}"
