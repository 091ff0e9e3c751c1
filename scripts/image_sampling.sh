#!/usr/bin/env bash
# One-step samples of a PID student (or a teacher's, with --teacher) under Open MPI, one process per GPU.
#
#   bash scripts/image_sampling.sh runs/pid-cifar10/checkpoint-00800000.pt               # 64-image grid
#   SEEDS=0-49999 OUT=samples bash scripts/image_sampling.sh CHECKPOINT --npz samples/cifar10.npz
#   bash scripts/image_sampling.sh --teacher teachers/edm-cifar10-32x32-uncond-vp.pt --sampler heun
#
# The first argument is a checkpoint unless it is an option; extra arguments go to pid-sample
# (`pid-sample --help`). Image k depends only on seed k, whatever NUM_PROCESSES and BATCH are.
set -euo pipefail

NUM_PROCESSES=${NUM_PROCESSES:-1}   # Processes = GPUs, over all nodes (mpirun's -np).
HOSTFILE=${HOSTFILE:-}              # Open MPI host file for several nodes; empty: this node.
EMA=${EMA:-0.9999}                  # EMA rate of a student checkpoint (PID keeps 0.999, 0.9999, 0.99995).
SEEDS=${SEEDS:-0-63}                # One image per seed.
BATCH=${BATCH:-64}                  # Images per GPU and network call.
OUT=${OUT:-samples}                 # Folder of the default grid.

SOURCE=()
if [[ $# -gt 0 && "$1" != -* ]]; then
  SOURCE=(--checkpoint "$1" --ema "${EMA}"); shift
fi

source "$(dirname "${BASH_SOURCE[0]}")/mpi_options.sh"

run_stoppable mpirun "${MPI_OPTIONS[@]}" \
  python -m pid_diffusion.cli.sample \
    "${SOURCE[@]}" \
    --seeds "${SEEDS}" \
    --batch "${BATCH}" \
    --grid "${OUT}/grid.png" \
    "$@"
