"""`pid-distill` with a pause in every loss call: a window for killing a real distillation mid-run.

    mpirun -np 2 python tests/slow_distill.py --step_delay_s=0.3 <pid-distill options>

The pause is not part of the configuration, so the plain `pid-distill` command with the same options
resumes the run this one leaves behind.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pid_diffusion.cli import distill  # noqa: E402
from pid_diffusion.loss import PIDObjective  # noqa: E402

PREFIX = "--step_delay_s="


def main(argv: list[str]) -> None:
    delays = [float(arg[len(PREFIX):]) for arg in argv if arg.startswith(PREFIX)]
    delay = delays[-1] if delays else 0.0
    call = PIDObjective.__call__

    def slow_call(self, model, batch):
        time.sleep(delay)
        return call(self, model, batch)

    PIDObjective.__call__ = slow_call
    distill.main([arg for arg in argv if not arg.startswith(PREFIX)])


if __name__ == "__main__":
    main(sys.argv[1:])
