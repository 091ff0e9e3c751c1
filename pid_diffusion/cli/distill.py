"""`pid-distill`: distil an EDM teacher into a one-step PID student (docs/method.md §5).

    pid-distill --preset=cifar10 --train.batch=256                   # one process (or torchrun)
    mpirun -np 8 pid-distill --preset=cifar10                        # eight processes
    srun --ntasks-per-node=8 pid-distill --preset=cifar10            # eight SLURM tasks
    pid-distill --config=my-run.json --run.dir=runs/mine             # from a file of your own
    pid-distill --config=runs/pid-cifar10/config.json                # replay (resume) a run from its folder
    pid-distill --preset=imagenet64 --dry-run                        # print the resolved options

Presets are the files configs/distill/<name>.json, each holding what differs from the defaults (the paper's
CIFAR-10 run). Any field can be overridden as `--section.key=value` (or `--key=value` when unique);
re-running the same command resumes from the newest checkpoint in the run folder. SIGTERM, SIGINT or
SIGUSR1 (`--run.preempt_signals`) stops after the step in flight with its checkpoint and exit status 75.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from pid_diffusion import dist
from pid_diffusion.cli import errors, options
from pid_diffusion.distill import TASK, DistillConfig, build
from pid_diffusion.samplers import OneStepSampler
from pid_diffusion.train import sampler_preview, training_loop


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, DistillConfig]:
    return options.parse_training(options.training_parser("pid-distill", __doc__, TASK), DistillConfig, TASK, argv)


def main(argv: Sequence[str] | None = None) -> None:
    with dist.abort_on_error(), errors.reported("pid-distill"):
        args, config = parse_args(argv)
        if options.dry_run(args, config):
            return
        device = dist.device()
        objective, student = build(config, device)
        preview = sampler_preview(OneStepSampler(), student, config.run.image_count, config.train.seed, device)
        training_loop(config, objective, student, preview)
    dist.shutdown()


if __name__ == "__main__":
    main()
