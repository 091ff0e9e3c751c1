"""`pid-train-teacher`: train an EDM teacher on the generated shapes data set (the bundled small teacher).

    pid-train-teacher                                            # the default preset, one process
    mpirun -np 2 pid-train-teacher --run.dir=runs/teacher        # two processes
    pid-train-teacher --dry-run                                  # print the resolved options, check the launch
    pid-train-teacher --export=model_zoo/edm-shapes-16x16.pt     # then write the teacher file and its grid

The same training loop, launchers, checkpoints and configuration system as `pid-distill`, with EDM's
denoising objective instead of PID's (`pid_diffusion.teacher_training`); presets are the files
configs/teacher/<name>.json. Re-running the same command resumes. With `--export`, the EMA network of the
last checkpoint is written in the teacher checkpoint format (`teacher.load_teacher` reads it) together
with a PNG grid of its Heun samples (35 network calls).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Sequence

from pid_diffusion import images
from pid_diffusion.utils import dist, logs
from pid_diffusion.cli import errors, options
from pid_diffusion.samplers import HeunSampler
from pid_diffusion.teacher_training import TASK, TeacherTrainingConfig, build, export_teacher, grid_path, network_size
from pid_diffusion.generate import sampler_preview
from pid_diffusion.training.train import training_loop

GRID_COLUMNS = 8  # Images per row of the exported teacher's sample grid.


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, TeacherTrainingConfig]:
    parser = options.training_parser("pid-train-teacher", __doc__, TASK, TeacherTrainingConfig)
    parser.add_argument("--export", metavar="PATH",
                        help="after training, write the EMA teacher to PATH (and its Heun grid beside it)")
    parser.add_argument("--export-ema", type=float, metavar="RATE",
                        help="EMA rate to export (default: the first of train.ema_rates)")
    args, config = options.parse_training(parser, TeacherTrainingConfig, TASK, argv)
    if args.export_ema is not None and args.export_ema not in config.train.ema_rates:
        parser.error(f"--export-ema={args.export_ema} is not one of train.ema_rates {config.train.ema_rates}")
    return args, config


def main(argv: Sequence[str] | None = None) -> None:
    with dist.abort_on_error(), errors.reported("pid-train-teacher"):
        args, config = parse_args(argv)
        # The checks of the launch (pid-distill's): batch split, run folder, disk; --dry-run stops after them.
        report = options.launch_check(args, config, functools.partial(network_size, config))
        if report is None:
            return
        with logs.tee_output(config.run.dir):
            dist.print0("\n".join(report))
            device = dist.device()
            objective, net = build(config)
            preview = sampler_preview(HeunSampler(), net, config.run.image_count, config.train.seed, device)
            training_loop(config, objective, net, preview)
            if args.export and dist.rank() == 0:
                rate = args.export_ema if args.export_ema is not None else config.train.ema_rates[0]
                teacher = export_teacher(config, args.export, rate)
                images.write_tiled(preview(teacher.to(device)), grid_path(args.export), columns=GRID_COLUMNS)
                dist.print0(f"Wrote the teacher {args.export} (EMA {rate}) and its Heun grid {grid_path(args.export)}")
        dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main()
