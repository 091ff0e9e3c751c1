"""Noise schedules and samplers with one calling convention.

Every sampler is called as `sampler(net, latents, class_labels=None) -> images` (float32, nominally in
[−1, 1]) with `latents ~ N(0, I)` *unscaled*, exactly as EDM's `generate.py` calls its samplers: the sampler
scales them by its first σ. For the multi-step samplers `net(x, sigma, class_labels)` is a denoiser D(x; σ)
(`EDMPrecond`, `GaussianTeacher`); for `OneStepSampler` it is a PID student. The integrators below follow
k-diffusion's convention instead: `heun(denoiser, x, sigmas, class_labels)` starts from x already at
σ = sigmas[0], so any schedule works with any integrator.
"""

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from pid_diffusion.grid import NUM_POINTS, RHO, SIGMA_MAX, SIGMA_MIN, KarrasGrid, check_grid

__all__ = [
    "Denoiser",
    "EulerSampler",
    "HeunSampler",
    "OneStepSampler",
    "Sampler",
    "EDM2_HEUN_STEPS",
    "edm_sigmas",
    "euler",
    "heun",
]


class Denoiser(Protocol):
    """D(x; σ): the teacher's estimate of the clean image (EDM's `EDMPrecond.forward` signature)."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor,
                 class_labels: torch.Tensor | None = None) -> torch.Tensor: ...


class Sampler(Protocol):
    """What the sampling CLI and FID evaluation know about a sampler."""

    @property
    def num_network_calls(self) -> int: ...

    def __call__(self, net: torch.nn.Module, latents: torch.Tensor,
                 class_labels: torch.Tensor | None = None) -> torch.Tensor: ...


# ----------------------------------------------------------------------------------------------------------
# Schedules.

def edm_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """EDM's schedule (Karras et al. 2022, Eq. 5) in float64: `num_steps` Karras points from σ_max down to
    σ_min, then the final σ = 0. EDM also passes the points through `net.round_sigma`, the identity for
    EDMPrecond, so nothing is rounded here."""
    karras = KarrasGrid(num_points=num_steps, rho=rho, sigma_min=sigma_min, sigma_max=sigma_max).sigmas
    return torch.cat([karras.to(torch.float64), torch.zeros(1, dtype=torch.float64)])


def _validated_sigmas(sigmas: torch.Tensor | tuple[float, ...], device: torch.device) -> torch.Tensor:
    """`sigmas` as a float64 tensor on `device`, after checking that it is a usable decreasing schedule."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D schedule of at least 2 noise levels, got shape "
                         f"{tuple(sigmas.shape)}")
    if not torch.isfinite(sigmas).all() or sigmas[-1] < 0 or not (sigmas[1:] < sigmas[:-1]).all():
        raise ValueError(f"sigmas must be finite, strictly decreasing and end at σ ≥ 0 (σ = 0 only as the "
                         f"last entry), got {sigmas.tolist()}")
    return sigmas.to(device)


# ----------------------------------------------------------------------------------------------------------
# Integrators of the probability-flow ODE dx/dσ = (x − D(x; σ)) / σ, state kept in float64 as EDM does.

@torch.no_grad()
def euler(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor | tuple[float, ...],
          class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Explicit Euler from x at σ = sigmas[0] to sigmas[-1]: one denoiser call per step (float64 result).
    On PID's grid this is the trajectory that a zero-residual PID student reproduces (docs/method.md §4)."""
    sigmas = _validated_sigmas(sigmas, x.device)
    x = x.to(torch.float64)
    for t_cur, t_next in zip(sigmas[:-1], sigmas[1:]):
        d_cur = (x - denoiser(x, t_cur, class_labels).to(torch.float64)) / t_cur
        x = x + (t_next - t_cur) * d_cur
    return x


@torch.no_grad()
def heun(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor | tuple[float, ...],
         class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """EDM Algorithm 2 without churn: an Euler step, then the trapezoidal (2nd-order) correction on every
    step whose target σ is not 0. On EDM's schedule that is 2·num_steps − 1 calls (float64 result)."""
    sigmas = _validated_sigmas(sigmas, x.device)
    x = x.to(torch.float64)
    # A step ending at σ = 0 cannot be corrected (D would be evaluated at σ = 0): EDM's "i < N − 1".
    corrected = [t_next > 0 for t_next in sigmas[1:].tolist()]
    for t_cur, t_next, correct in zip(sigmas[:-1], sigmas[1:], corrected):
        d_cur = (x - denoiser(x, t_cur, class_labels).to(torch.float64)) / t_cur
        x_next = x + (t_next - t_cur) * d_cur
        if correct:
            d_prime = (x_next - denoiser(x_next, t_next, class_labels).to(torch.float64)) / t_next
            x_next = x + (t_next - t_cur) * ((d_cur + d_prime) / 2)
        x = x_next
    return x


# ----------------------------------------------------------------------------------------------------------
# Samplers: the schedule and its paper constants bundled with an integrator.

EDM2_HEUN_STEPS = 32  # EDM2's generate_images.py default (63 network calls)


@dataclass(frozen=True)
class HeunSampler:
    """EDM's deterministic sampler (`generate.py`, S_churn = 0) on EDM's schedule; the defaults are EDM's
    CIFAR-10 setting (35 network calls)."""

    num_steps: int = 18  # Karras points before the final σ = 0
    sigma_min: float = SIGMA_MIN  # ε
    sigma_max: float = SIGMA_MAX  # T
    rho: float = RHO  # ρ of the Karras schedule

    def __post_init__(self) -> None:
        check_grid(self.num_steps, self.rho, self.sigma_min, self.sigma_max, count="num_steps")

    @property
    def sigmas(self) -> torch.Tensor:
        """The schedule, float64, ending with σ = 0."""
        return edm_sigmas(self.num_steps, self.sigma_min, self.sigma_max, self.rho)

    @property
    def num_network_calls(self) -> int:
        return 2 * self.num_steps - 1

    def __call__(self, net: Denoiser, latents: torch.Tensor,
                 class_labels: torch.Tensor | None = None) -> torch.Tensor:
        sigmas = self.sigmas.to(latents.device)
        return heun(net, latents.to(torch.float64) * sigmas[0], sigmas, class_labels).to(torch.float32)


@dataclass(frozen=True)
class EulerSampler:
    """Explicit Euler on any schedule; `EulerSampler.on_grid(...)` is the teacher's Euler solver on PID's
    grid, the ceiling a PID student trained with that grid can reach (docs/method.md §4, §6)."""

    sigmas: tuple[float, ...]  # decreasing noise levels, sigmas[0] scales the latents

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigmas", tuple(float(s) for s in self.sigmas))
        _validated_sigmas(self.sigmas, torch.device("cpu"))

    @classmethod
    def on_grid(cls, num_points: int = NUM_POINTS, rho: float = RHO, sigma_min: float = SIGMA_MIN,
                sigma_max: float = SIGMA_MAX) -> "EulerSampler":
        """Euler through PID's Karras grid from T down to ε (no step to σ = 0, like the student)."""
        grid = KarrasGrid(num_points=num_points, rho=rho, sigma_min=sigma_min, sigma_max=sigma_max)
        return cls(tuple(grid.sigmas.tolist()))

    @property
    def num_network_calls(self) -> int:
        return len(self.sigmas) - 1

    def __call__(self, net: Denoiser, latents: torch.Tensor,
                 class_labels: torch.Tensor | None = None) -> torch.Tensor:
        sigmas = _validated_sigmas(self.sigmas, latents.device)
        return euler(net, latents.to(torch.float64) * sigmas[0], sigmas, class_labels).to(torch.float32)


@dataclass(frozen=True)
class OneStepSampler:
    """PID's sampler: one student call x_θ(z, ε) with z = T · latents (docs/method.md §2, §6); the student owns T
    (`student.sigma_max`), ε and the clamp to [−1, 1] (`student.sample`)."""

    num_network_calls: ClassVar[int] = 1

    @torch.no_grad()
    def __call__(self, student: torch.nn.Module, latents: torch.Tensor,
                 class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return student.sample(student.sigma_max * latents, class_labels).to(torch.float32)
