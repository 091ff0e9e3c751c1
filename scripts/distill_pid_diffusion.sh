#!/usr/bin/env bash
# The paper's PID runs (Tee et al. 2024) under Open MPI, one process per GPU. The run itself (teacher, batch,
# steps, run folder) is the preset file configs/distill/<preset>.json; this script only sets
# the launcher's options.
#
#   bash scripts/distill_pid_diffusion.sh cifar10            # CIFAR-10 32×32, EDM DDPM++ teacher
#   bash scripts/distill_pid_diffusion.sh imagenet64         # ImageNet 64×64, EDM ADM teacher
#   bash scripts/distill_pid_diffusion.sh cifar10-central    # the second-order central difference
#
# Re-running the same command resumes from the newest checkpoint in the run folder. Extra arguments are
# passed on as configuration overrides, e.g. `... cifar10 --teacher.path=/data/edm-cifar10.pkl`. Teachers:
# see docs/teacher_checkpoints.md (an EDM .pkl works as is).
set -euo pipefail

PRESET=${1:-cifar10}; shift || true
NUM_PROCESSES=${NUM_PROCESSES:-8}               # Processes = GPUs, over all nodes (mpirun's -np).
HOSTFILE=${HOSTFILE:-}                          # Open MPI host file for several nodes; empty: this node.

source "$(dirname "${BASH_SOURCE[0]}")/mpi_options.sh"

run_stoppable mpirun "${MPI_OPTIONS[@]}" python -m pid_diffusion.cli.distill --preset="${PRESET}" "$@"
