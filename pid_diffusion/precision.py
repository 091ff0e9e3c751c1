"""Reduced precision that keeps PID's derivative: the recipes, their check, and the measurement of their error.

PID's student is trained on a finite difference (y_i − y_j) / (t_i − t_j) between neighbouring grid times. Near ε
the two outputs differ by a small fraction of their size, so the rounding of a 16-bit student pass swamps the
difference (docs/precision.md measures it). A recipe is the loop's autocast (`train.precision`), the derivative
(`pid.derivative`) and the arithmetic of the student's passes (`pid.student_precision`):

    fp32, any derivative                          exact to float32, the baseline
    16-bit, derivative=jvp                        the exact derivative rounds like any other output: kept
    16-bit, student_precision=fp32                teacher and distance in 16 bits, differenced student in fp32
    16-bit, finite difference, student in 16 bit  refused, unless named: student_precision=train_rounded_difference

`errors` measures a recipe against a float64 reference of the same student on the same inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from pid_diffusion.config import Precision
from pid_diffusion.grid import KarrasGrid
from pid_diffusion.loss import Derivative, StudentPrecision, trajectory_and_derivative
from pid_diffusion.training.train import AUTOCAST_DTYPES

__all__ = ["Errors", "Recipe", "Reference", "SAFE_RECIPES", "check_recipe", "errors", "reference"]

SAFE_RECIPES = ("train.precision=fp32; or a 16-bit train.precision with pid.student_precision=fp32 (teacher and "
                "distance in 16 bits, the differenced student pass in fp32); or a 16-bit train.precision with "
                "pid.derivative=jvp (the exact derivative)")


def check_recipe(precision: Precision, derivative: Derivative, student_precision: StudentPrecision) -> None:
    """Raise ValueError for a recipe that rounds the derivative away (a 16-bit finite difference not asked for
    by name). Under fp32, or with the JVP, every student_precision computes the same: a preset's recipe stays
    valid when a run overrides train.precision=fp32."""
    sixteen_bit = AUTOCAST_DTYPES[precision] is not None
    differenced = derivative is not Derivative.JVP
    if student_precision is StudentPrecision.TRAIN and sixteen_bit and differenced:
        raise ValueError(
            f"train.precision={precision.value} with pid.derivative={derivative.value} differences two "
            f"{precision.value} student outputs, whose rounding swamps the difference near ε (docs/precision.md: "
            f"at N = 250 the relative error of dy/dt reaches 1.8 in bf16 and 0.23 in fp16, 50 and 7 times the "
            f"scheme's own truncation error in Eq. 9; at N = 40, bf16 about equals it and fp16 stays below it). "
            f"Safe recipes: {SAFE_RECIPES}. To train on the rounded difference anyway, set "
            f"pid.student_precision={StudentPrecision.TRAIN_ROUNDED_DIFFERENCE.value}")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One precision recipe: the loop's autocast, the derivative and the student's arithmetic."""

    precision: Precision
    derivative: Derivative
    student_precision: StudentPrecision = StudentPrecision.TRAIN

    @property
    def name(self) -> str:
        """`bf16 forward`; `bf16 forward, student fp32` (mixed); `bf16 forward, rounded` (named unsafe)."""
        student = {StudentPrecision.TRAIN: "", StudentPrecision.FP32: ", student fp32",
                   StudentPrecision.TRAIN_ROUNDED_DIFFERENCE: ", rounded"}[self.student_precision]
        return f"{self.precision.value} {self.derivative.value}{student}"

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        """The training loop's autocast region of this recipe on `device_type`."""
        dtype = AUTOCAST_DTYPES[self.precision]
        return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@dataclasses.dataclass(frozen=True)
class Reference:
    """Float64 values of the student at one grid time: y_i, dy/dt of each scheme, the exact dy/dt (JVP); the
    teacher's D(y_i, t_i) in float32 (the scale of Eq. 9's target)."""

    t: float
    y: torch.Tensor
    derivatives: dict[Derivative, torch.Tensor]
    denoised: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Errors:
    """A recipe's errors at one grid time t_i, each a ratio of norms over the batch.

    derivative: ‖dy/dt − dy/dt₆₄‖ / ‖dy/dt₆₄‖, the same scheme in float64 (the recipe's rounding);
    term:       t ‖dy/dt − dy/dt₆₄‖ / ‖D‖, that rounding in Eq. 9's units (the target y − t dy/dt against D);
    target:     ‖(y − t dy/dt) − (y − t dy/dt)₆₄‖ / ‖D‖, Eq. 9's student side (rounding of y and of t·dy/dt);
    truncation: t ‖dy/dt₆₄ − exact₆₄‖ / ‖D‖, the scheme's own error in Eq. 9's units (0 for JVP);
    teacher:    ‖D − D₃₂‖ / ‖D₃₂‖, the teacher's rounding in the recipe (its target side).
    """

    derivative: float
    term: float
    target: float
    truncation: float
    teacher: float


def _schemes(grid: KarrasGrid, index: int) -> list[Derivative]:
    interior = 0 < index < grid.num_points - 1
    return [d for d in Derivative if d is not Derivative.CENTRAL or interior]


def _denoise(teacher: nn.Module, y: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
    return teacher(y.float(), t.float(), class_labels).float()


@torch.no_grad()  # forward-mode AD (the JVP) works without the graph
def reference(student: nn.Module, teacher: nn.Module, z: torch.Tensor, index: int, grid: KarrasGrid,
              class_labels: torch.Tensor | None = None, dtype: torch.dtype = torch.float64) -> Reference:
    """The reference at grid index `index` for latents z (every latent at the same time), computed in `dtype`
    outside any autocast: float64, or float32 (a recipe against an fp32 pass, as benchmarks/gpu_check.py)."""
    z_ref = z.to(dtype)
    indices = torch.full((z.shape[0],), index, dtype=torch.long, device=z.device)
    derivatives, y = {}, None
    t = grid.times(indices).to(z.device)
    with torch.autocast(z.device.type, enabled=False):
        for scheme in _schemes(grid, index):
            y, d = trajectory_and_derivative(student, z_ref, indices, class_labels, grid=grid, derivative=scheme)
            derivatives[scheme] = d.double()
        denoised = _denoise(teacher, y, t, class_labels)
    return Reference(t=float(grid.sigmas[index]), y=y.double(), derivatives=derivatives, denoised=denoised)


@torch.no_grad()
def errors(student: nn.Module, teacher: nn.Module, z: torch.Tensor, index: int, grid: KarrasGrid,
           recipe: Recipe, ref: Reference, class_labels: torch.Tensor | None = None) -> Errors:
    """`recipe`'s errors at grid index `index` against `ref` (`reference` of the same inputs)."""
    indices = torch.full((z.shape[0],), index, dtype=torch.long, device=z.device)
    t = grid.times(indices).to(z.device)
    with recipe.autocast(z.device.type):
        y, d = trajectory_and_derivative(student, z.float(), indices, class_labels, grid=grid,
                                         derivative=recipe.derivative, student_precision=recipe.student_precision)
        denoised = _denoise(teacher, y, t, class_labels)
    d_ref, exact = ref.derivatives[recipe.derivative], ref.derivatives[Derivative.JVP]
    scale = ref.denoised.double().norm().item()
    target = (y.double() - ref.t * d.double()) - (ref.y - ref.t * d_ref)
    return Errors(derivative=((d.double() - d_ref).norm() / d_ref.norm()).item(),
                  term=ref.t * (d.double() - d_ref).norm().item() / scale,
                  target=target.norm().item() / scale,
                  truncation=ref.t * (d_ref - exact).norm().item() / scale,
                  teacher=((denoised.double() - ref.denoised.double()).norm()).item() / scale)
