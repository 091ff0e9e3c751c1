"""`pid-demo`: the whole job in one command, on a CPU, in a few minutes.

Distils the bundled 16×16 shapes teacher (model_zoo/edm-shapes-16x16.pt) into a one-step student with the
`default` preset (1200 steps of 32 latents, lr 6e-3 decayed to 0 by a cosine), then writes
`<run.dir>/demo.png` (teacher Heun samples, student before and after, all from the same latents) and
prints the agreement of student and teacher (RMSE, PSNR; raw weights unless --ema-rate) and, when EDM's
Inception detector is on disk, FID.

    pid-demo                                   # or: python -m pid_diffusion.cli.demo
    pid-demo --run.dir=runs/demo2 --train.steps=200
    mpirun -np 2 pid-demo                      # two processes

Configuration overrides are those of pid-distill (`--section.key=value`); re-running resumes the run folder.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

from pid_diffusion import dist
from pid_diffusion.cli import errors
from pid_diffusion.config import ConfigError, parse_overrides, resolve, to_json
from pid_diffusion.demo import DemoOptions, run_demo

PRESET = "default"  # The CPU preset of config.py; the demo is its showcase.


def parse_args(argv: Sequence[str] | None):
    defaults = DemoOptions()
    parser = argparse.ArgumentParser(prog="pid-demo", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="print the resolved configuration and exit")
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
    parser.add_argument("--preset", help=argparse.SUPPRESS)  # refused below: not a shorthand of teacher.preset
    args, rest = parser.parse_known_args(argv)
    if args.preset is not None:
        parser.error(f"--preset={args.preset}: pid-demo always runs the {PRESET!r} preset; distil another preset "
                     f"with pid-distill --preset={args.preset} (a teacher's architecture is --teacher.preset=...)")
    try:
        config = resolve(PRESET, parse_overrides(rest))
        options = dataclasses.replace(defaults, eval_images=args.eval_images, grid_columns=args.grid_columns,
                                      ema_rate=args.ema_rate, fid_images=args.fid_images, detector=args.detector)
    except (ConfigError, ValueError) as error:
        parser.error(str(error))
    if options.ema_rate is not None and options.ema_rate not in config.train.ema_rates:
        parser.error(f"--ema-rate={options.ema_rate} is not one of train.ema_rates {config.train.ema_rates}")
    return args, config, options


def main(argv: Sequence[str] | None = None) -> None:
    with dist.abort_on_error(), errors.reported("pid-demo"):
        args, config, options = parse_args(argv)
        if args.dry_run:
            dist.print0(to_json(config), end="")
            return
        run_demo(config, options)
    dist.shutdown()


if __name__ == "__main__":
    main()
