#!/usr/bin/env bash
# Multi-node SSKD on SLURM: one `accelerate launch` per node, 8 GPUs each.
#   sbatch --nodes=4 launch/slurm.sh distill --teacher runs/r34-ss --student torchvision:resnet18 \
#          --method sskd --shards /data/imagenet-wds --config sskd/configs/imagenet/r34_r18.yaml --out runs/r18
#SBATCH --job-name=sskd
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --output=sskd-%j.out
set -euo pipefail
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
NNODES=$SLURM_NNODES
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# srun starts this block once per node; SLURM_NODEID is the node's machine_rank.
srun --kill-on-bad-exit=1 bash -c "accelerate launch \
  --config_file $here/accelerate/multi_node.yaml \
  --num_machines $NNODES --num_processes $((NNODES * GPUS_PER_NODE)) \
  --machine_rank \$SLURM_NODEID --main_process_ip $MASTER_ADDR --main_process_port $MASTER_PORT \
  -m sskd $*"
