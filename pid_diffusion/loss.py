"""The PID residual loss (paper Eq. 8 and Eq. 9) and the distillation objective the training loop runs.

The student x_θ(z, t) should solve the teacher's probability-flow ODE dx/dt = (x − D_φ(x, t)) / t. At a
grid time t_i, with y_i = x_θ(z, t_i) and a derivative estimate dy/dt, PID penalises (docs/method.md §3)

    Eq. 8 (derivative form):  d( dy/dt,  (y_i − D_φ(y_i, t_i)) / t_i )
    Eq. 9 (denoiser form):    d( y_i − t_i · dy/dt,  D_φ(y_i, t_i) )       the official, default form

with the teacher term under stop-gradient. For the L2 distance, Eq. 9 = t_i² · Eq. 8 per sample.

What a zero residual means (checked in tests/test_analytic_convergence.py):
- forward differences: y_{i+1} = y_i + (t_{i+1} − t_i)(y_i − D_φ(y_i, t_i))/t_i, the teacher's Euler
  solution (Lemma 1), for i ≤ N − 2. The official backward step at i = N − 1 adds a condition that the
  Euler solution does not meet, so its residual there is small but not zero;
- central differences: y_{i+1} = y_{i−1} − (t_{i−1} − t_{i+1})(y_i − D_φ(y_i, t_i))/t_i, an explicit
  two-step (leapfrog) recursion from y_0 = z; no residual involves i = 0, so y_1 is left free.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from pid_diffusion.grid import KarrasGrid
from pid_diffusion.networks import one_hot

PerSampleDistance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # d(a, b) -> distances [B]


class Derivative(enum.Enum):
    """How dy/dt at t_i is obtained from the student."""

    FORWARD = "forward"  # (y_i − y_j) / (t_i − t_j), j = i + 1 (j = N − 2 at the last point): official
    CENTRAL = "central"  # (y_{i−1} − y_{i+1}) / (t_{i−1} − t_{i+1}), interior i only: second order
    JVP = "jvp"  # the exact ∂x_θ/∂t by forward-mode AD (torch.autograd.forward_ad): an ablation


class StudentPrecision(enum.Enum):
    """The arithmetic of the student's passes (y_i, its neighbours, its tangent) inside the loop's autocast.

    A finite difference of two 16-bit student outputs is dominated by rounding near ε (docs/precision.md), so
    a recipe that autocasts the differenced pass says what it costs in its name; the check of a configuration
    is `precision.check_recipe`.
    """

    TRAIN = "train"  # as train.precision: the loop's autocast, if any, covers the student too
    FP32 = "fp32"  # float32 under any autocast; the teacher and the distance keep train.precision
    TRAIN_ROUNDED_DIFFERENCE = "train_rounded_difference"  # as TRAIN, accepting a finite difference of 16-bit outputs

    def context(self, device_type: str) -> contextlib.AbstractContextManager:
        """Where the student's passes run: outside any autocast region for FP32, else unchanged."""
        if self is StudentPrecision.FP32 and torch.is_autocast_enabled(device_type):
            return torch.autocast(device_type=device_type, enabled=False)
        return contextlib.nullcontext()


class ResidualForm(enum.Enum):
    """Which side of the ODE the distance compares."""

    DENOISER = "denoiser"  # Eq. 9: d(y_i − t_i dy/dt, D_φ(y_i, t_i))
    DERIVATIVE = "derivative"  # Eq. 8: d(dy/dt, (y_i − D_φ(y_i, t_i)) / t_i)


def pid_residual(student: nn.Module, teacher: nn.Module, z: torch.Tensor, indices: torch.Tensor,
                 class_labels: torch.Tensor | None = None, *, grid: KarrasGrid, metric: PerSampleDistance,
                 derivative: Derivative = Derivative.FORWARD, form: ResidualForm = ResidualForm.DENOISER,
                 stop_neighbour_grad: bool = False,
                 student_precision: StudentPrecision = StudentPrecision.TRAIN) -> torch.Tensor:
    """Per-sample PID residual [B] at the grid times t_i = grid.sigmas[indices] (Eq. 9, or Eq. 8).

    `student(z, t, class_labels)` is x_θ; `teacher(x, σ, class_labels)` is D_φ, evaluated without gradient
    at the detached y_i (the official stop-gradient). The student's values at t_i and at the neighbours
    the difference scheme needs go through the network as one concatenated batch. `stop_neighbour_grad`
    detaches the neighbour values (finite differences only). `student_precision` chooses the arithmetic of
    the student's passes under an autocast region. Grid times are float64, cast to z's dtype.
    """
    check_options(derivative, form, stop_neighbour_grad)
    grid.check_indices(indices, interior_only=derivative is Derivative.CENTRAL)  # Indices from outside: checked.
    return _pid_residual(student, teacher, z, indices, class_labels, grid, metric, derivative, form,
                         stop_neighbour_grad, student_precision)


def _pid_residual(student: nn.Module, teacher: nn.Module, z: torch.Tensor, indices: torch.Tensor,
                  class_labels: torch.Tensor | None, grid: KarrasGrid, metric: PerSampleDistance,
                  derivative: Derivative, form: ResidualForm, stop_neighbour_grad: bool,
                  student_precision: StudentPrecision) -> torch.Tensor:
    """`pid_residual` with options already checked (by `PIDObjective`, once, instead of at every step) and trusted
    indices (those `KarrasGrid.sample_indices` draws: in range by construction, so nothing is read back from the
    device for them)."""
    if indices.shape != (z.shape[0],):
        raise ValueError(f"indices have shape {tuple(indices.shape)}; need one grid index per latent, "
                         f"shape ({z.shape[0]},)")
    with student_precision.context(z.device.type):
        y_i, dy_dt = _trajectory_and_derivative(student, z, indices, class_labels, grid, derivative,
                                                stop_neighbour_grad)
    t_i = _per_sample(grid.times(indices), z)
    with torch.no_grad():  # the teacher is a fixed target: stop-gradient, also through y_i
        denoised = teacher(y_i.detach(), t_i.flatten(), class_labels).to(y_i.dtype)

    if form is ResidualForm.DENOISER:
        residual = metric(y_i - t_i * dy_dt, denoised)  # Eq. 9
    else:
        residual = metric(dy_dt, (y_i - denoised) / t_i)  # Eq. 8
    if residual.shape != (z.shape[0],):
        raise ValueError(f"the metric returned shape {tuple(residual.shape)}; it must give one distance per "
                         f"sample, shape ({z.shape[0]},)")
    return residual


class PIDObjective:
    """PID distillation as a training objective: latents, grid times and labels are its data (data-free).

    `sample_batch` draws, in this order and all from the given generator, z = T · N(0, I) in the teacher's
    image shape, grid indices (interior ones for `Derivative.CENTRAL`) and, for a class-conditional teacher,
    uniformly random one-hot labels. `__call__` returns the per-sample residual of `pid_residual`; the
    batch must be on the student's device. The student and `grid` must share T and ε.
    """

    def __init__(self, teacher: nn.Module, grid: KarrasGrid, metric: PerSampleDistance,
                 derivative: Derivative = Derivative.FORWARD, form: ResidualForm = ResidualForm.DENOISER,
                 stop_neighbour_grad: bool = False, student_precision: StudentPrecision = StudentPrecision.TRAIN):
        check_options(derivative, form, stop_neighbour_grad)
        if not isinstance(student_precision, StudentPrecision):
            raise TypeError(f"student_precision={student_precision!r}: pass a StudentPrecision member")
        for name in ("img_channels", "img_resolution", "label_dim"):
            if not hasattr(teacher, name):
                raise TypeError(f"the teacher has no `{name}`; pass an EDMPrecond or a GaussianTeacher")
        self.teacher = teacher
        self.grid = grid
        self.metric = metric
        self.derivative = derivative
        self.form = form
        self.stop_neighbour_grad = stop_neighbour_grad
        self.student_precision = student_precision
        self.image_shape = (teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
        self.label_dim = teacher.label_dim

    def sample_batch(self, generator: torch.Generator, batch_size: int) -> dict[str, torch.Tensor]:
        """`z` [B, C, H, W], `indices` [B] and, for a conditional teacher, one-hot `class_labels` [B, L]."""
        device = generator.device
        z = torch.randn((batch_size, *self.image_shape), generator=generator, device=device).mul_(self.grid.sigma_max)
        indices = self.grid.sample_indices(batch_size, generator, interior_only=self.derivative is Derivative.CENTRAL)
        batch = dict(z=z, indices=indices)
        if self.label_dim:
            classes = torch.randint(self.label_dim, (batch_size,), generator=generator, device=device)
            batch["class_labels"] = one_hot(classes, self.label_dim)
        return batch

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-sample PID residual [B] of the student `model` on `batch` (drawn by `sample_batch`: its indices
        are in range by construction and are not read back, so a step makes no device sync for them)."""
        return _pid_residual(model, self.teacher, batch["z"], batch["indices"], batch.get("class_labels"),
                             self.grid, self.metric, self.derivative, self.form, self.stop_neighbour_grad,
                             self.student_precision)


def trajectory_and_derivative(student: nn.Module, z: torch.Tensor, indices: torch.Tensor,
                              class_labels: torch.Tensor | None = None, *, grid: KarrasGrid,
                              derivative: Derivative = Derivative.FORWARD, stop_neighbour_grad: bool = False,
                              student_precision: StudentPrecision = StudentPrecision.TRAIN
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """y_i = x_θ(z, t_i) and the estimate of dy/dt at t_i that `derivative` names, in `student_precision`
    (the residual's student side; benchmarks/precision.py measures its rounding)."""
    grid.check_indices(indices, interior_only=derivative is Derivative.CENTRAL)
    with student_precision.context(z.device.type):
        return _trajectory_and_derivative(student, z, indices, class_labels, grid, derivative, stop_neighbour_grad)


def _trajectory_and_derivative(student: nn.Module, z: torch.Tensor, indices: torch.Tensor,
                               class_labels: torch.Tensor | None, grid: KarrasGrid, derivative: Derivative,
                               stop_neighbour_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """y_i = x_θ(z, t_i) and the estimate of dy/dt at t_i that `derivative` names."""
    if derivative is Derivative.JVP:
        return _time_jvp(student, z, grid.times(indices).to(device=z.device, dtype=z.dtype), class_labels)

    # Finite difference dy/dt ≈ (y_a − y_b) / (t_a − t_b) between grid indices a and b.
    if derivative is Derivative.FORWARD:
        a, b = indices, grid.forward_neighbours(indices)  # a backward difference at i = N − 1
        y_i, y_b = _evaluate(student, z, [indices, b], class_labels, grid)
        y_a = y_i
    else:
        a, b = grid.central_neighbours(indices)
        y_i, y_a, y_b = _evaluate(student, z, [indices, a, b], class_labels, grid)
        if stop_neighbour_grad:
            y_a = y_a.detach()
    if stop_neighbour_grad:
        y_b = y_b.detach()
    step = _per_sample(grid.times(a) - grid.times(b), z)  # differenced in float64, then cast
    return y_i, (y_a - y_b) / step


def _time_jvp(student: nn.Module, z: torch.Tensor, t_i: torch.Tensor, class_labels: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """y_i = x_θ(z, t_i) and the exact ∂x_θ/∂t at t_i, by one forward-mode pass with tangent 1 on each t_i.

    torch.autograd.forward_ad rather than torch.func.jvp: the functional transform forbids the in-place
    buffer broadcast DDP runs at every forward; dual tensors pass through it. Both outputs stay
    differentiable with respect to the student's parameters (the loss backpropagates through dy/dt), so
    every op of the student must support reverse mode through a tangent; torch's softmax does not
    (pytorch#162350), which is why the networks' attention writes its softmax out.
    """
    with fwAD.dual_level():
        y = student(z, fwAD.make_dual(t_i, torch.ones_like(t_i)), class_labels)
        y_i, dy_dt = fwAD.unpack_dual(y)
    if dy_dt is None:
        raise RuntimeError(f"{type(student).__name__} dropped the time tangent (its output does not depend on t "
                           f"through differentiable operations): Derivative.JVP needs forward-mode AD through t")
    return y_i, dy_dt


def _evaluate(student: nn.Module, z: torch.Tensor, index_sets: list[torch.Tensor],
              class_labels: torch.Tensor | None, grid: KarrasGrid) -> tuple[torch.Tensor, ...]:
    """x_θ(z, t_k) for each index set k, as one batch through the network (cat z, t and labels; split)."""
    copies = len(index_sets)
    times = torch.cat([grid.times(k) for k in index_sets]).to(device=z.device, dtype=z.dtype)
    labels = None if class_labels is None else class_labels.repeat(copies, 1)
    return student(z.repeat(copies, 1, 1, 1), times, labels).chunk(copies)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample values [B] in the dtype and device of `like`, shaped [B, 1, 1, 1] to scale its images."""
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def check_options(derivative: Derivative, form: ResidualForm, stop_neighbour_grad: bool) -> None:
    """Reject option values and combinations that have no meaning."""
    if not isinstance(derivative, Derivative):
        raise TypeError(f"derivative={derivative!r}: pass a Derivative member ({[d.name for d in Derivative]})")
    if not isinstance(form, ResidualForm):
        raise TypeError(f"form={form!r}: pass a ResidualForm member ({[f.name for f in ResidualForm]})")
    if derivative is Derivative.JVP and stop_neighbour_grad:
        raise ValueError("stop_neighbour_grad applies to finite differences only (it detaches the neighbour; "
                         "Derivative.JVP has none): set stop_neighbour_grad=False")
