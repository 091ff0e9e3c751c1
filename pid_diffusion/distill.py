"""PID distillation assembled from a `DistillConfig` (PID.md §5): the frozen teacher, the time grid, the
distance, the objective and the student it trains, plus the one-step sample grid the training loop writes.

    objective, student = build(config, device)
    training_loop(config, objective, student, one_step_preview(student, 64, config.train.seed, device))
"""

from __future__ import annotations

import torch
from torch import nn

from pid_diffusion import perf
from pid_diffusion.config import DistillConfig
from pid_diffusion.grid import KarrasGrid
from pid_diffusion.loss import PIDObjective
from pid_diffusion.samplers import OneStepSampler
from pid_diffusion.student import PIDStudent
from pid_diffusion.teacher import load_teacher
from pid_diffusion.train import Preview

__all__ = ["build", "one_step_preview"]


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
