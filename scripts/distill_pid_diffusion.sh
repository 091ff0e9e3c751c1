#!/usr/bin/env bash
# The paper's PID runs (Tee et al. 2024, docs/method.md §5) under Open MPI, one process per GPU.
#
#   bash scripts/distill_pid_diffusion.sh cifar10            # CIFAR-10 32×32, EDM DDPM++ teacher
#   bash scripts/distill_pid_diffusion.sh imagenet64         # ImageNet 64×64, EDM ADM teacher
#   bash scripts/distill_pid_diffusion.sh cifar10-central    # the second-order central difference
#
# Re-running the same command resumes from the newest checkpoint in the run folder. Extra arguments are
# passed on as configuration overrides, e.g. `... cifar10 --train.steps=400000`. Teachers: see
# docs/teacher_checkpoints.md (an EDM .pkl works as is).
set -euo pipefail

PRESET=${1:-cifar10}; shift || true
RUN_DIR=${RUN_DIR:-runs/pid-${PRESET}}        # Run folder: local path, gs://bucket/... or az://...
NUM_PROCESSES=${NUM_PROCESSES:-8}               # Processes = GPUs, over all nodes (mpirun's -np).
HOSTFILE=${HOSTFILE:-}                          # Open MPI host file for several nodes; empty: this node.

case "${PRESET}" in
  cifar10|cifar10-central)
    TEACHER=${TEACHER:-teachers/edm-cifar10-32x32-uncond-vp.pt}
    GLOBAL_BATCH=${GLOBAL_BATCH:-512}           # Paper: 8 GPUs × 64.
    MICRO_BATCH=${MICRO_BATCH:-none}            # Per GPU per forward pass; none: the whole per-GPU share.
    ;;
  imagenet64|imagenet64-central)
    TEACHER=${TEACHER:-teachers/edm-imagenet-64x64-cond-adm.pt}
    GLOBAL_BATCH=${GLOBAL_BATCH:-2048}          # Paper: 8 GPUs × 256, in micro-batches of 32.
    MICRO_BATCH=${MICRO_BATCH:-32}
    ;;
  *)
    echo "unknown preset '${PRESET}': use cifar10, imagenet64, cifar10-central or imagenet64-central" >&2
    exit 2
    ;;
esac

source "$(dirname "${BASH_SOURCE[0]}")/mpi_options.sh"

mpirun "${MPI_OPTIONS[@]}" \
  python -m pid_diffusion.cli.distill \
    --preset="${PRESET}" \
    --run.dir="${RUN_DIR}" \
    --teacher.path="${TEACHER}" \
    --train.batch="${GLOBAL_BATCH}" \
    --train.micro_batch="${MICRO_BATCH}" \
    "$@"
