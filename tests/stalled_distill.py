"""`pid-distill` that stalls in the step after a given step's checkpoint: a real run to kill mid-step.

    mpirun -np 2 python tests/stalled_distill.py --stall_after_step=3 <pid-distill options>

Each rank blocks in its first loss call that finds the checkpoint of that step on disk. Rank 0 writes it before
its next step, so rank 0 blocks at the start of that step and the other ranks wait for it in the step's
all-reduce: the job stays in the step, no later checkpoint is written, until it is killed. The plain
`pid-distill` command with the same options (without --stall_after_step) resumes the run this one leaves.
"""

import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pid_diffusion.training import checkpoint  # noqa: E402
from pid_diffusion.cli import distill  # noqa: E402
from pid_diffusion.loss import PIDObjective  # noqa: E402
from pid_diffusion.utils import fileio  # noqa: E402

STALL, RUN_DIR = "--stall_after_step=", "--run.dir="


def main(argv: list[str]) -> None:
    (step,) = [int(arg[len(STALL):]) for arg in argv if arg.startswith(STALL)]
    (run_dir,) = [arg[len(RUN_DIR):] for arg in argv if arg.startswith(RUN_DIR)]
    call = PIDObjective.__call__

    def stalling_call(self, model, batch):
        if fileio.exists(checkpoint.training_state_path(run_dir, step)):
            threading.Event().wait()  # never set: the test kills the job here
        return call(self, model, batch)

    PIDObjective.__call__ = stalling_call
    distill.main([arg for arg in argv if not arg.startswith(STALL)])


if __name__ == "__main__":
    main(sys.argv[1:])
