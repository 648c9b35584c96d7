#!/bin/bash
# SLURM example: DiffiT base training on 2 nodes × 8 GPUs with DeepSpeed ZeRO-3.
#   sbatch launch/slurm_train_base.sh --epochs 100 --model diffit_cifar --data cifar10
# The checkpoint root must be on a filesystem all nodes share. A preempted job resumes with --resume.
#SBATCH --job-name=diffit-base
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one launcher per node; it starts the 8 GPU processes
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --signal=B:USR1@120          # ask for a checkpoint 2 minutes before the time limit
#SBATCH --output=slurm-%j.out
set -euo pipefail

MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
GPUS_PER_NODE=8

srun --kill-on-bad-exit=1 bash -c "accelerate launch \
  --config_file configs/accelerate/multi_node_zero3.yaml \
  --num_machines $SLURM_NNODES \
  --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
  --machine_rank \$SLURM_NODEID \
  --main_process_ip $MAIN_ADDR \
  --main_process_port 29500 \
  scripts/train_base.py --checkpoint-root \${CHECKPOINT_ROOT:-checkpoints} $*"
