#!/usr/bin/env bash
# Multi-node sskd on SLURM: one `accelerate launch` per node, one rank per GPU (8 per node unless
# --gpus-per-node or GPUS_PER_NODE says otherwise). Submit from the sskd checkout:
#   sbatch --nodes=4 launch/slurm.sh distill --config sskd/configs/imagenet/resnet34-resnet18.yaml \
#          --teacher runs/r34-ss --shards /data/shards/imagenet --out runs/r18-sskd
# Resubmitting the same line with --resume continues after a time limit or preemption: SLURM's SIGTERM
# makes every rank finish its step and write checkpoints/last.pt before it exits.
#SBATCH --job-name=sskd
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --signal=TERM@120
#SBATCH --output=sskd-%j.out
set -euo pipefail
# sbatch runs a copy of this file from its spool folder, so its own path says nothing about where the
# checkout is: use the folder sbatch was called from (or SSKD_ROOT).
root="${SSKD_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
config="$root/launch/accelerate/multi_node.yaml"
if [ ! -f "$config" ]; then
  echo "slurm.sh: $config not found; submit from the sskd checkout or set SSKD_ROOT" >&2
  exit 2
fi
if [ $# -eq 0 ]; then
  echo "usage: sbatch --nodes=N launch/slurm.sh COMMAND [ARGS...]   (COMMAND: distill, train-teacher, ...)" >&2
  exit 2
fi
# Processes per node = GPUs per node: GPUS_PER_NODE, else what sbatch was given (SLURM_GPUS_PER_NODE, set by
# --gpus-per-node, on the command line or above; it may read "a100:4"), else 8. A count that differs from the
# node's GPUs leaves the rendezvous waiting for ranks that never come.
gpus=${GPUS_PER_NODE:-${SLURM_GPUS_PER_NODE:-8}}
GPUS_PER_NODE=${gpus##*:}
if [[ $gpus == *,* ]] || ! [[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]]; then
  echo "slurm.sh: GPUs per node '$gpus' is not one count; set GPUS_PER_NODE=N" >&2
  exit 2
fi
: "${SLURM_JOB_NODELIST:?not set: submit with sbatch}" "${SLURM_NNODES:?not set: submit with sbatch}"
hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")  # whole, not `| head -n 1`: no SIGPIPE under pipefail
MASTER_ADDR=${hosts%%$'\n'*}
if [ -z "$MASTER_ADDR" ]; then
  echo "slurm.sh: no host in SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST'" >&2
  exit 2
fi
MASTER_PORT=${MASTER_PORT:-29500}
NNODES=$SLURM_NNODES
# srun of Slurm 22.05 and later does not read SLURM_CPUS_PER_TASK (sbatch's --cpus-per-task): passed on here,
# or each node's launcher (all its ranks and DALI threads) may be confined to one CPU.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
  export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
fi
args=$(printf ' %q' "$@")  # each argument quoted once more for the shell srun starts (spaces survive)
cd "$root"
# srun starts this block once per node; SLURM_NODEID is the node's machine_rank.
# `sskd launch` is `accelerate launch` ending in one line: the time limit's SIGTERM or a failed rank gives no
# launcher traceback in sskd-%j.out, and exit status 128 + the signal (the ranks checkpoint first).
srun --kill-on-bad-exit=1 bash -c "exec sskd launch \
  --config_file $(printf %q "$config") \
  --num_machines $NNODES --num_processes $((NNODES * GPUS_PER_NODE)) \
  --machine_rank \$SLURM_NODEID --main_process_ip $MASTER_ADDR --main_process_port $MASTER_PORT \
  -m sskd$args"
