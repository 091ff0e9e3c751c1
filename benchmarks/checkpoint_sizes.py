"""Sizes of a snapshot and a training state at the paper presets (docs/training.md), from the number of
parameters × 4 bytes × copies, and, with --save, measured by writing them with checkpoint.py's own functions.

    python benchmarks/checkpoint_sizes.py                  # the table, computed
    python benchmarks/checkpoint_sizes.py --save cifar10   # also write the CIFAR-10 files and measure them

A snapshot holds the student and each EMA (1 + 3 copies at the paper's three rates); a training state adds
RAdam's two moments (6 copies), the RNG states and the configuration (a few kB).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pid_diffusion import distill
from pid_diffusion.training import checkpoint  # noqa: E402
from pid_diffusion.utils import dist
from pid_diffusion.networks.edm import EDM_PRESETS, EDMPrecond  # noqa: E402
from pid_diffusion.student import PIDStudent  # noqa: E402
from pid_diffusion.training.train import EMA, build_optimizer  # noqa: E402

TEACHERS = {"cifar10": "edm-cifar10-32x32-uncond-vp", "imagenet64": "edm-imagenet-64x64-cond-adm"}
OPTIMIZER_MOMENTS = 2  # Adam and RAdam: exp_avg, exp_avg_sq.


def student(preset: str) -> PIDStudent:
    config = distill.resolve(preset)
    teacher = EDMPrecond(**EDM_PRESETS[TEACHERS[preset]])
    return PIDStudent.from_teacher(teacher, config.pid.sigma_min, config.pid.sigma_max), config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--save", nargs="*", choices=sorted(TEACHERS), default=[], help="presets to write and measure")
    args = parser.parse_args()
    print("| preset | parameters | EMAs | snapshot (computed) | training state (computed) | measured |")
    print("|---|---|---|---|---|---|")
    for preset in TEACHERS:
        model, config = student(preset)
        params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
        emas = len(config.train.ema_rates)
        snapshot, state = params * 4 * (1 + emas), params * 4 * (1 + emas + OPTIMIZER_MOMENTS)
        measured = "—"
        if preset in args.save:
            dist.init()
            with tempfile.TemporaryDirectory() as folder:
                config = distill.resolve(preset, {"run.dir": folder})
                optimizer = build_optimizer(model.parameters(), config.train)
                for p in model.parameters():
                    p.grad = torch.zeros_like(p)
                optimizer.step()  # Creates the moments, as after the first training step.
                ema = EMA(model, config.train.ema_rates)
                scaler = torch.amp.GradScaler("cpu", enabled=False)
                sizes = [os.path.getsize(checkpoint.save_snapshot(config, 1, model, ema)),
                         os.path.getsize(checkpoint.save(config, 1, model, ema, optimizer, scaler))]
            measured = f"{sizes[0] / 1e9:.3f} GB / {sizes[1] / 1e9:.3f} GB"
            del optimizer, ema
        print(f"| {preset} | {params / 1e6:.1f} M | {emas} | {snapshot / 1e9:.3f} GB | {state / 1e9:.3f} GB | {measured} |")
    dist.shutdown()


if __name__ == "__main__":
    main()
