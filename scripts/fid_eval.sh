#!/usr/bin/env bash
# FID and Inception Score of every checkpoint of a PID run (trained weights and each EMA) under Open MPI,
# one process per GPU, into <run>/fid.csv and <run>/fid.png.
#
#   bash scripts/fid_eval.sh runs/pid-cifar10 cifar10
#   SEED_RANGES="0-49999 50000-99999 100000-149999" bash scripts/fid_eval.sh runs/pid-imagenet64 imagenet64
#
# Re-running the same command evaluates only new checkpoints. Reference statistics are EDM's
# (https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/<name>.npz) or made with pid-fid-ref; the Inception
# detector is found in $TORCH_HOME/hub/checkpoints (see docs/evaluation.md). Extra arguments go to pid-fid.
set -euo pipefail

RUN_DIR=${1:?usage: fid_eval.sh RUN_DIR [cifar10|imagenet64] [pid-fid options]}
DATASET=${2:-cifar10}; shift 2 || shift $#
NUM_PROCESSES=${NUM_PROCESSES:-8}       # Processes = GPUs, over all nodes (mpirun's -np).
HOSTFILE=${HOSTFILE:-}                  # Open MPI host file for several nodes; empty: this node.
SEED_RANGES=${SEED_RANGES:-0-49999}     # 50,000 images each; EDM reports the best of three ranges.
BATCH=${BATCH:-250}                     # Images per GPU and batch.

case "${DATASET}" in
  cifar10)    REF=${REF:-fid-refs/cifar10-32x32.npz} ;;
  imagenet64) REF=${REF:-fid-refs/imagenet-64x64.npz} ;;
  *)
    echo "unknown data set '${DATASET}': use cifar10 or imagenet64 (or set REF)" >&2
    exit 2
    ;;
esac

source "$(dirname "${BASH_SOURCE[0]}")/mpi_options.sh"

# shellcheck disable=SC2086  # SEED_RANGES is a list of ranges, one argument each.
run_stoppable mpirun "${MPI_OPTIONS[@]}" \
  python -m pid_diffusion.cli.fid \
    --run "${RUN_DIR}" \
    --ref "${REF}" \
    --seeds ${SEED_RANGES} \
    --batch "${BATCH}" \
    "$@"
