"""`pid-distill`: distil an EDM teacher into a one-step PID student (docs/method.md §5).

    pid-distill --preset=cifar10 --train.batch=256                   # one process (or torchrun)
    mpirun -np 8 pid-distill --preset=cifar10                        # eight processes
    srun --ntasks-per-node=8 pid-distill --preset=cifar10            # eight SLURM tasks
    pid-distill --config=my-run.json --run.dir=runs/mine             # from a file of your own
    pid-distill --config=runs/pid-cifar10/config.json                # replay (resume) a run from its folder
    mpirun -np 8 pid-distill --preset=cifar10 --dry-run              # check the launch, load nothing

Presets are the files configs/distill/<name>.json, each holding what differs from the defaults (the paper's
CIFAR-10 run). Any field can be overridden as `--section.key=value` (or `--key=value` when unique);
re-running the same command resumes from the newest training state in the run folder, where the options that
do not define the run's maths ([resume: may change] below) may differ. SIGTERM, SIGINT or SIGUSR1
(`--run.preempt_signals`) stops after the step in flight with its training state and exit status 75. Before
loading anything every run checks the batch split over its ranks, the teacher and LPIPS files, the run
folder (damaged training states are named and skipped) and the disk space its snapshots and training states
will take; `--dry-run` does only that, under the real launcher. Everything printed also goes to <run.dir>/log.txt.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Sequence

from pid_diffusion import encoders
from pid_diffusion.utils import dist, logs
from pid_diffusion.cli import errors, options
from pid_diffusion.distill import TASK, DistillConfig, build, check_files, fingerprints, network_size
from pid_diffusion.samplers import OneStepSampler
from pid_diffusion.generate import sampler_preview
from pid_diffusion.training.train import training_loop


def build_parser() -> argparse.ArgumentParser:
    return options.training_parser("pid-distill", __doc__, TASK, DistillConfig)


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, DistillConfig]:
    return options.parse_training(build_parser(), DistillConfig, TASK, argv)


def main(argv: Sequence[str] | None = None) -> None:
    with dist.abort_on_error(), errors.reported("pid-distill"):
        args, config = parse_args(argv)
        # The checks of the launch: the same one-line errors a dry-run and a run give, before any file is loaded.
        report = options.launch_check(args, config, functools.partial(network_size, config),
                                      functools.partial(check_files, config))
        if report is None:  # --dry-run
            return
        with logs.tee_output(config.run.dir):
            dist.print0("\n".join(report))
            device = dist.device()
            objective, student = build(config, device)
            preview = sampler_preview(OneStepSampler(), student, config.run.image_count, config.train.seed, device)
            if config.run.image_every:  # a latent student's preview is decoded by its VAE
                preview = encoders.decoded_preview(preview, student.encoder, device)
            training_loop(config, objective, student, preview, fingerprints(objective))
    dist.shutdown()


if __name__ == "__main__":
    main()
