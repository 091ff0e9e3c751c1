"""PID's theory (docs/method.md §4) checked against an exact teacher: the ideal denoiser of Gaussian data.

- A student whose values on the grid are the teacher's Euler iterates has zero first-order residual
  (Lemma 1); the zero-residual solution of the central scheme is the two-step recursion derived below.
- The exact trajectory's residual shrinks like 1/N (forward difference) and 1/N² (central difference).
- Zero-residual solutions approach the exact trajectory at order 1 (forward) and 2 (central).
- A small PIDStudent trained with the residual loss approaches the exact trajectory.

Everything but the training test runs in float64 so that discretisation errors are not hidden by rounding.
"""

import pytest
import torch
from torch import nn

from pid_diffusion.analytic import GaussianTeacher
from pid_diffusion.grid import KarrasGrid
from pid_diffusion.loss import Derivative, PIDObjective, ResidualForm, pid_residual
from pid_diffusion.distances import L2
from pid_diffusion.student import PIDStudent

from factories import TINY_SONG_UNET

T, EPS, RHO = 80.0, 0.002, 7.0  # the paper's grid (docs/method.md §3)
S = 0.4  # data standard deviation of docs/method.md §4's reference numbers (d = 16)
CHANNELS, RESOLUTION = 1, 4  # d = 16
BATCH = 3


@pytest.fixture
def teacher():
    mu = 0.3 * torch.randn(CHANNELS, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(1))
    return GaussianTeacher(mu, S, CHANNELS, RESOLUTION)


@pytest.fixture
def z():
    shape = (BATCH, CHANNELS, RESOLUTION, RESOLUTION)
    return T * torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


class LookupStudent(nn.Module):
    """A "student" that returns stored trajectories: values[i, k] = x(z_k, t_i) on the grid."""

    def __init__(self, grid, latents, values):
        super().__init__()
        self.grid, self.latents, self.values = grid, latents, values

    def forward(self, z, t, class_labels=None):
        t = torch.as_tensor(t).reshape(-1).expand(z.shape[0])
        matches = (z.flatten(1)[:, None] == self.latents.flatten(1)[None]).all(-1)
        assert matches.any(1).all(), "called with a latent the lookup does not know"
        sample = matches.to(torch.int64).argmax(1)
        index = (self.grid.sigmas[None] - t[:, None].to(torch.float64)).abs().argmin(1)
        return self.values[index, sample]


class ExactStudent(nn.Module):
    """The exact trajectory x(z, t) of the Gaussian teacher as a student."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher

    def forward(self, z, t, class_labels=None):
        return self.teacher.exact_solution(z, t, T)


def euler_solution(teacher, grid, z):
    """Explicit Euler on the grid: x_{i+1} = x_i + (t_{i+1} − t_i)(x_i − D(x_i, t_i))/t_i; shape [N, B, ...]."""
    t = grid.sigmas
    xs = [z]
    for i in range(grid.num_points - 1):
        xs.append(xs[i] + (t[i + 1] - t[i]) * (xs[i] - teacher(xs[i], t[i])) / t[i])
    return torch.stack(xs)


def central_solution(teacher, grid, z, x_1):
    """The zero-residual solution of the central scheme: a two-step recursion on the grid.

    Zero Eq. 9 residual at an interior t_i, y_i − t_i (y_{i−1} − y_{i+1})/(t_{i−1} − t_{i+1}) = D(y_i, t_i),
    solved for y_{i+1}, gives the explicit two-step (leapfrog / explicit midpoint) recursion
        y_{i+1} = y_{i−1} − (t_{i−1} − t_{i+1}) · (y_i − D(y_i, t_i)) / t_i,     i = 1 … N − 2,
    with y_0 = z from the boundary. The loss has no equation at i = 0, so y_1 is left free: the
    zero-residual solutions form a one-parameter family, here started from `x_1`.
    """
    t = grid.sigmas
    xs = [z, x_1]
    for i in range(1, grid.num_points - 1):
        xs.append(xs[i - 1] - (t[i - 1] - t[i + 1]) * (xs[i] - teacher(xs[i], t[i])) / t[i])
    return torch.stack(xs)


def residuals_at_every_point(student, teacher, grid, z, derivative, form=ResidualForm.DENOISER):
    """Per-sample residual at each usable grid index: [N or N − 2, B]."""
    first, last = (1, grid.num_points - 2) if derivative is Derivative.CENTRAL else (0, grid.num_points - 1)
    return torch.stack([
        pid_residual(student, teacher, z, torch.full((z.shape[0],), i), grid=grid, metric=L2(),
                     derivative=derivative, form=form)
        for i in range(first, last + 1)])


def rms_error_at_eps(values, teacher, z):
    """Root-mean-square distance of the trajectories' last grid value to the exact x(ε)."""
    return (values[-1] - teacher.exact_solution(z, EPS, T)).square().mean().sqrt().item()


# ----------------------------------------------------------------------------------------------------------
# The exact teacher itself.

def test_gaussian_denoiser_is_tweedies_formula(teacher, z):
    # D(x, σ) = x + σ² ∇ log p_σ(x), with p_σ = N(μ, (s² + σ²) I) the noisy data density.
    sigma = torch.tensor([0.01, 1.0, 30.0], dtype=torch.float64)
    x = (teacher.mu + sigma.reshape(-1, 1, 1, 1) * z / T).requires_grad_(True)
    density = torch.distributions.Normal(teacher.mu, (S ** 2 + sigma ** 2).sqrt().reshape(-1, 1, 1, 1))
    (score,) = torch.autograd.grad(density.log_prob(x).sum(), x)
    expected = x + sigma.reshape(-1, 1, 1, 1) ** 2 * score
    assert torch.allclose(teacher(x.detach(), sigma), expected, rtol=1e-12, atol=1e-12)


def test_exact_solution_solves_the_probability_flow_ode(teacher, z):
    sigma = torch.tensor([0.002, 0.4, 10.0], dtype=torch.float64)
    x, dx_dsigma = torch.func.jvp(lambda s: teacher.exact_solution(z, s, T), (sigma,), (torch.ones_like(sigma),))
    drift = (x - teacher(x, sigma)) / sigma.reshape(-1, 1, 1, 1)
    assert torch.allclose(dx_dsigma, drift, rtol=1e-12, atol=1e-12)
    assert torch.allclose(teacher.exact_solution(z, T, T), z, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# Lemma 1: zero residual ⇔ the teacher's discretised ODE solution.

def test_euler_iterates_have_zero_first_order_residual(teacher, z):
    grid = KarrasGrid(20, RHO, EPS, T)
    euler = euler_solution(teacher, grid, z)
    student = LookupStudent(grid, z, euler)
    for form in ResidualForm:
        residual = residuals_at_every_point(student, teacher, grid, z, Derivative.FORWARD, form)
        # Every point with a forward neighbour: zero up to float64 rounding of values of size T.
        assert residual[:-1].max() < 1e-24
        # At i = N − 1 the official rule j = N − 2 asks for a backward step, which Euler does not satisfy.
        assert residual[-1].min() > 1e-12


def test_euler_iterates_have_zero_residual_in_float32(teacher, z):
    grid = KarrasGrid(20, RHO, EPS, T)
    euler = euler_solution(teacher, grid, z).to(torch.float32)
    student = LookupStudent(grid, z.to(torch.float32), euler)
    residual = residuals_at_every_point(student, teacher, grid, z.to(torch.float32), Derivative.FORWARD)
    assert residual[:-1].max() < 1e-6


@pytest.mark.parametrize("start", ["exact", "euler"])
def test_central_recursion_has_zero_central_residual(teacher, z, start):
    grid = KarrasGrid(20, RHO, EPS, T)
    x_1 = _central_start(teacher, grid, z, start)
    values = central_solution(teacher, grid, z, x_1)
    residual = residuals_at_every_point(LookupStudent(grid, z, values), teacher, grid, z, Derivative.CENTRAL)
    assert residual.max() < 1e-24


def test_exact_trajectory_has_zero_jvp_residual(teacher, z):
    grid = KarrasGrid(20, RHO, EPS, T)
    residual = residuals_at_every_point(ExactStudent(teacher), teacher, grid, z, Derivative.JVP)
    assert residual.max() < 1e-24


# ----------------------------------------------------------------------------------------------------------
# Orders of accuracy.

@pytest.mark.parametrize("derivative, order", [(Derivative.FORWARD, 1), (Derivative.CENTRAL, 2)])
def test_exact_trajectory_residual_shrinks_with_the_scheme_order(teacher, z, derivative, order):
    # Eq. 8 compares derivatives: its square root is the truncation error of the difference quotient.
    sizes = []
    for num_points in (20, 40, 80):
        grid = KarrasGrid(num_points, RHO, EPS, T)
        residual = residuals_at_every_point(ExactStudent(teacher), teacher, grid, z, derivative,
                                            ResidualForm.DERIVATIVE)
        sizes.append(residual.mean().sqrt().item())
    ratios = [sizes[0] / sizes[1], sizes[1] / sizes[2]]
    assert ratios == pytest.approx([2 ** order] * 2, rel=0.15), sizes


def test_euler_error_halves_like_the_reference(teacher, z):
    # docs/method.md §4 (d = 16, s = 0.4): 0.0781, 0.0396, 0.0199, 0.0064 at N = 20, 40, 80, 250. The error is
    # (z − μ) · δ(N) with a scalar δ, so its ratios do not depend on the normalisation of the reference.
    reference = {20: 0.0781, 40: 0.0396, 80: 0.0199, 250: 0.0064}
    errors = {n: rms_error_at_eps(euler_solution(teacher, KarrasGrid(n, RHO, EPS, T), z), teacher, z)
              for n in reference}
    for n in reference:
        assert errors[n] / errors[20] == pytest.approx(reference[n] / reference[20], rel=0.01), errors
    assert errors[20] / errors[40] == pytest.approx(2, rel=0.03)


@pytest.mark.parametrize("start", ["exact", "euler"])
def test_central_zero_residual_solution_is_second_order(teacher, z, start):
    errors = []
    for num_points in (20, 40, 80, 160):
        grid = KarrasGrid(num_points, RHO, EPS, T)
        values = central_solution(teacher, grid, z, _central_start(teacher, grid, z, start))
        errors.append(rms_error_at_eps(values, teacher, z))
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert ratios == pytest.approx([4] * 3, rel=0.1), errors


def _central_start(teacher, grid, z, start):
    """y_1 for the central recursion: the exact value, or one Euler step of the teacher."""
    t_0, t_1 = grid.sigmas[0], grid.sigmas[1]
    if start == "exact":
        return teacher.exact_solution(z, t_1, T)
    return z + (t_1 - t_0) * (z - teacher(z, t_0)) / t_0


# ----------------------------------------------------------------------------------------------------------
# Training: the residual loss alone (no data, no trajectories) teaches a network the teacher's trajectory.

TRAIN_NETWORK = {**TINY_SONG_UNET, "img_resolution": RESOLUTION, "img_channels": CHANNELS, "model_channels": 16,
                 "channel_mult": [1], "attn_resolutions": []}
TRAIN_POINTS, TRAIN_STEPS, TRAIN_BATCH, TRAIN_LR = 80, 400, 32, 3e-3


def test_training_a_small_student_approaches_the_exact_trajectory():
    mu = torch.linspace(-1, 1, CHANNELS * RESOLUTION ** 2).reshape(CHANNELS, RESOLUTION, RESOLUTION)
    teacher = GaussianTeacher(mu, S, CHANNELS, RESOLUTION)
    grid = KarrasGrid(TRAIN_POINTS, RHO, EPS, T)
    objective = PIDObjective(teacher, grid, L2())
    torch.manual_seed(0)
    student = PIDStudent(TRAIN_NETWORK, EPS, T, teacher.sigma_data)
    optimizer = torch.optim.Adam(student.parameters(), lr=TRAIN_LR)
    z = T * torch.randn(256, CHANNELS, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(123))

    def error_at_eps():
        with torch.no_grad():
            return (student(z, EPS) - teacher.exact_solution(z, EPS, T)).square().mean().sqrt().item()

    initial = error_at_eps()
    for step in range(TRAIN_STEPS):
        batch = objective.sample_batch(torch.Generator().manual_seed(step), TRAIN_BATCH)
        loss = objective(student, batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = error_at_eps()
    euler_floor = rms_error_at_eps(euler_solution(teacher, grid, z.to(torch.float64)), teacher, z.to(torch.float64))
    assert final < initial / 10, (initial, final, euler_floor)
