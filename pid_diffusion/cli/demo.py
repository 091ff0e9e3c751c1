"""`pid-demo`: the whole job in one command, on a CPU, in a few minutes.

Distils the bundled 16×16 shapes teacher (model_zoo/edm-shapes-16x16.pt) into a one-step student with the
`default` preset (configs/distill/default.json), then writes `<run.dir>/demo.png` (teacher Heun samples,
student before and after, all from the same latents) and prints the agreement of student and teacher
(RMSE, PSNR; raw weights unless --ema-rate) and, when EDM's Inception detector is on disk, FID.

    pid-demo                                   # or: python -m pid_diffusion.cli.demo
    pid-demo --run.dir=runs/demo2 --train.steps=200
    mpirun -np 2 pid-demo                      # two processes

The configuration options are those of pid-distill (`--preset`, `--config`, `--section.key=value`);
re-running resumes the run folder.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

from pid_diffusion.utils import dist, logs
from pid_diffusion.cli import errors, options
from pid_diffusion.demo import DemoOptions, run_demo
from pid_diffusion.distill import TASK, DistillConfig, check_files, network_size


def parse_args(argv: Sequence[str] | None):
    defaults = DemoOptions()
    parser = options.training_parser("pid-demo", __doc__, TASK, DistillConfig)
    parser.add_argument("--eval-images", type=int, default=defaults.eval_images,
                        help="latents on which teacher and student are compared (default: %(default)s)")
    parser.add_argument("--grid-columns", type=int, default=defaults.grid_columns,
                        help="images per row of demo.png (default: %(default)s)")
    parser.add_argument("--ema-rate", type=float, default=defaults.ema_rate,
                        help="evaluate this EMA of the student instead of its raw weights (default: the raw weights, which "
                             "agree best with the teacher at the end of the default's learning-rate decay)")
    parser.add_argument("--fid-images", type=int, default=defaults.fid_images,
                        help="samples (and data images) per FID, when a detector is present (default: %(default)s)")
    parser.add_argument("--detector", default=defaults.detector,
                        help="Inception detector file (default: the torch hub cache; never downloaded)")
    args, config = options.parse_training(parser, DistillConfig, TASK, argv)
    try:
        demo = dataclasses.replace(defaults, eval_images=args.eval_images, grid_columns=args.grid_columns,
                                   ema_rate=args.ema_rate, fid_images=args.fid_images, detector=args.detector)
    except ValueError as error:
        parser.error(str(error))
    if demo.ema_rate is not None and demo.ema_rate not in config.train.ema_rates:
        parser.error(f"--ema-rate={demo.ema_rate} is not one of train.ema_rates {config.train.ema_rates}")
    return args, config, demo


def main(argv: Sequence[str] | None = None) -> None:
    with dist.abort_on_error(), errors.reported("pid-demo"):
        args, config, demo = parse_args(argv)
        # pid-distill's launch check (batch split, run folder, teacher file, disk), before any file is loaded.
        report = options.launch_check(args, config, functools.partial(network_size, config),
                                      functools.partial(check_files, config))
        if report is None:  # --dry-run
            return
        with logs.tee_output(config.run.dir):
            dist.print0("\n".join(report))
            run_demo(config, demo)
    dist.shutdown()


if __name__ == "__main__":
    main()
