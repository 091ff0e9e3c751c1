# Sourced by the launchers (the mpirun scripts and slurm_distill.sbatch): `run_stoppable LAUNCHER ARGS...`
# runs a job so that stopping the script stops the job cleanly, and returns the job's status.
#
# Open MPI's mpirun kills the ranks at once on SIGINT or SIGTERM but forwards SIGUSR1 to every rank, as srun
# does, and the commands take SIGUSR1 as "stop after the step in flight" (pid_diffusion/utils/preemption.py).
# So the job runs in a session of its own (a terminal's Ctrl-C reaches this script, not the launcher), and the
# first SIGINT, SIGTERM or SIGHUP the script gets becomes SIGUSR1 for the job: every rank finishes the same
# step, the training state of that step is written, the ranks exit with 75 and so does the script. A second
# signal ends the job at once (SIGTERM, which mpirun and srun answer by killing the ranks) and the script
# with 128 + the signal's number. Otherwise the script's status is the job's.
STOP_AFTER_STEP=USR1  # What the launcher forwards to every rank: stop after the step in flight.
STOP_NOW=TERM         # What makes the launcher end every rank at once.

run_stoppable() {
  STOP_REQUESTS=0
  JOB=""
  # A non-interactive shell cannot trap a signal it was started ignoring: a background job of a script
  # (`bash launcher.sh &` from another script, some CI runners) starts with SIGINT ignored, so Ctrl-C cannot
  # reach the job, while SIGTERM still can.
  if [[ "$(trap -p INT)" == "trap -- '' SIGINT" ]]; then
    echo "$(basename "$0"): SIGINT is ignored in this shell (started as a background job): Ctrl-C cannot stop" \
         "the job; stop it with \`kill $$\` (SIGTERM)" >&2
  fi
  trap '_stop INT' INT
  trap '_stop TERM' TERM
  trap '_stop HUP' HUP
  setsid "$@" &
  JOB=$!
  if ((STOP_REQUESTS > 0)); then kill -s "${STOP_AFTER_STEP}" "${JOB}"; fi  # Signalled before the job had an id.
  local status
  while true; do
    INTERRUPTED=0
    status=0
    wait "${JOB}" || status=$?
    ((INTERRUPTED)) || break  # A trapped signal interrupts `wait` only; the job is still running.
  done
  trap - INT TERM HUP
  if ((STOP_REQUESTS > 1)); then exit "${SECOND_SIGNAL_STATUS}"; fi
  return "${status}"
}

_stop() {
  INTERRUPTED=1
  STOP_REQUESTS=$((STOP_REQUESTS + 1))
  if ((STOP_REQUESTS == 1)); then
    echo "$(basename "$0"): SIG$1: the job stops after the step in flight (SIG${STOP_AFTER_STEP} to every rank);" \
         "a second signal ends it at once" >&2
    if [[ -n "${JOB}" ]]; then kill -s "${STOP_AFTER_STEP}" "${JOB}" 2>/dev/null || true; fi
  elif ((STOP_REQUESTS == 2)); then
    SECOND_SIGNAL_STATUS=$((128 + $(kill -l "$1")))
    echo "$(basename "$0"): second signal (SIG$1): ending the job now" >&2
    if [[ -n "${JOB}" ]]; then kill -s "${STOP_NOW}" "${JOB}" 2>/dev/null || true; fi
  fi
}
