"""PID distillation assembled from a `DistillConfig` (docs/method.md §5): the frozen teacher, the time grid, the
distance, the objective and the student it trains.

    objective, student = build(config, device)
    preview = sampler_preview(OneStepSampler(), student, config.run.image_count, config.train.seed, device)
    training_loop(config, objective, student, preview)
"""

from __future__ import annotations

import torch

from pid_diffusion import perf
from pid_diffusion.config import DistillConfig
from pid_diffusion.grid import KarrasGrid
from pid_diffusion.loss import PIDObjective
from pid_diffusion.student import PIDStudent
from pid_diffusion.teacher import load_teacher

__all__ = ["build"]


def build(config: DistillConfig, device: torch.device) -> tuple[PIDObjective, PIDStudent]:
    """The frozen teacher's PID objective and the student it trains, on `device`."""
    pid = config.pid
    teacher = load_teacher(config.teacher.path, config.teacher.preset, device=device)
    grid = KarrasGrid(num_points=pid.num_points, rho=pid.rho, sigma_min=pid.sigma_min, sigma_max=pid.sigma_max)
    metric = pid.metric.build(**pid.metric_options()).to(device)
    # The training loop applies the speed options to the student; the teacher and the metric are built here.
    if config.train.channels_last:
        teacher.to(memory_format=torch.channels_last)
    if config.train.activation_checkpointing and pid.metric.is_lpips:
        perf.enable_lpips_checkpointing(metric)
    objective = PIDObjective(teacher, grid, metric, derivative=pid.derivative, form=pid.form,
                             stop_neighbour_grad=pid.stop_neighbour_grad)
    torch.manual_seed(config.train.seed)  # The random initialisation of the ablation; DDP broadcasts rank 0's.
    student = PIDStudent.from_teacher(teacher, pid.sigma_min, pid.sigma_max, init=config.student.init,
                                      network_overrides={"dropout": config.student.dropout})
    return objective, student.to(device)
