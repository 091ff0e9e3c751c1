"""`pid-distill`: distil an EDM teacher into a one-step PID student (PID.md §5).

    pid-distill --preset=cifar10 --run.dir=runs/c10 --train.batch=512      # one process (or torchrun)
    mpirun -np 8 pid-distill --preset=cifar10 --run.dir=runs/c10           # eight processes
    pid-distill --preset=imagenet64 --dry-run                              # print the resolved options

Any configuration field can be overridden as `--section.key=value` (or `--key=value` when unique);
re-running the same command resumes from the newest checkpoint in the run folder.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from torch import nn

from pid_diffusion import dist
from pid_diffusion.config import DISTILL_PRESETS, ConfigError, DistillConfig, parse_overrides, resolve, to_json
from pid_diffusion.grid import KarrasGrid
from pid_diffusion.loss import PIDObjective
from pid_diffusion.samplers import OneStepSampler
from pid_diffusion.student import PIDStudent
from pid_diffusion.teacher import load_teacher
from pid_diffusion.train import Preview, training_loop


def build(config: DistillConfig, device: torch.device) -> tuple[PIDObjective, PIDStudent]:
    """The frozen teacher's PID objective and the student it trains, on `device`."""
    pid = config.pid
    teacher = load_teacher(config.teacher.path, config.teacher.preset, device=device)
    grid = KarrasGrid(num_points=pid.num_points, rho=pid.rho, sigma_min=pid.sigma_min, sigma_max=pid.sigma_max)
    metric = pid.metric.build(**pid.metric_options()).to(device)
    objective = PIDObjective(teacher, grid, metric, derivative=pid.derivative, form=pid.form,
                             stop_neighbour_grad=pid.stop_neighbour_grad)
    torch.manual_seed(config.train.seed)  # The random initialisation of the ablation; DDP broadcasts rank 0's.
    student = PIDStudent.from_teacher(teacher, pid.sigma_min, pid.sigma_max, init=config.student.init,
                                      network_overrides={"dropout": config.student.dropout})
    return objective, student.to(device)


def one_step_preview(student: PIDStudent, count: int, seed: int, device: torch.device) -> Preview:
    """One-step samples x_θ(z, ε) of `count` fixed latents (seeded by `seed`), classes cycling 0, 1, 2, …"""
    shape = (count, student.img_channels, student.img_resolution, student.img_resolution)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    labels = None
    if student.label_dim:
        labels = torch.nn.functional.one_hot(torch.arange(count) % student.label_dim, student.label_dim)
        labels = labels.to(device=device, dtype=torch.float32)
    sampler = OneStepSampler()

    def preview(model: nn.Module) -> torch.Tensor:
        return sampler(model, latents, labels)

    return preview


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, DistillConfig]:
    parser = argparse.ArgumentParser(
        prog="pid-distill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False, epilog="Options of the configuration: see --dry-run and docs/training.md.")
    parser.add_argument("--preset", default="default", choices=DISTILL_PRESETS.names(),
                        help="the configuration to start from (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved configuration and exit")
    args, rest = parser.parse_known_args(argv)
    try:
        return args, resolve(args.preset, parse_overrides(rest))
    except ConfigError as error:
        parser.error(str(error))


def main(argv: Sequence[str] | None = None) -> None:
    with dist.abort_on_error():
        args, config = parse_args(argv)
        if args.dry_run:
            dist.print0(to_json(config), end="")
            return
        device = dist.device()
        objective, student = build(config, device)
        preview = one_step_preview(student, config.run.image_count, config.train.seed, device)
        training_loop(config, objective, student, preview)
    dist.shutdown()


if __name__ == "__main__":
    main()
