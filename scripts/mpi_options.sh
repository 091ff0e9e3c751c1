# Sourced by the launchers: Open MPI options in the array MPI_OPTIONS, from NUM_PROCESSES (processes = GPUs,
# over all nodes) and HOSTFILE (an Open MPI host file for several nodes; empty: this node only), and
# `run_stoppable` (stoppable.sh), which runs the job so that stopping the launcher stops the job cleanly.
MPI_OPTIONS=(-np "${NUM_PROCESSES}" --bind-to none)
# Export the environment to processes on other nodes; TORCH_HOME locates LPIPS and Inception weight files.
for VARIABLE in PATH PYTHONPATH LD_LIBRARY_PATH TORCH_HOME; do
  if [[ -n "${!VARIABLE:-}" ]]; then MPI_OPTIONS+=(-x "${VARIABLE}"); fi
done
if [[ -n "${HOSTFILE:-}" ]]; then
  MPI_OPTIONS+=(--hostfile "${HOSTFILE}")
fi

source "$(dirname "${BASH_SOURCE[0]}")/stoppable.sh"
