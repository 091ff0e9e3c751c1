"""Distilled ODE solvers (D-ODE; Kim, Tang & Yu, "Distilling ODE Solvers of Diffusion Models into Smaller Steps",
arXiv 2309.16421): few-step baselines that keep the teacher exactly as it is.

D-ODE keeps an existing solver and the frozen denoiser and changes one thing: the denoiser output that
completes a step (Euler's only call, Heun's corrector) is extrapolated from the previous step's output, with one
scalar per step (§3 of the paper),

    D̃_k = D_k + λ_k (D_k − D_ref),

where D_ref is the output of the latest earlier call at a higher σ (for Euler the previous call). With λ = 0 it
is the base solver. The λ's are distilled from the same solver run with C times finer steps: the teacher solve
takes C·(K − 1) + 1 Karras steps, so that every C-th of its σ's is one of the K-step schedule's. Step by step,
λ_k is the least-squares fit, over a batch of latents, of the step's result to the fine solve's state at the
same σ. The result is affine in λ_k, so each fit is exact in closed form and the whole distillation costs a few
solves of the batch.

Two choices differ from the official code, which fits one λ per network call and always extrapolates from
the previous call. (1) Heun's first call of a step follows the corrector of the step before at the same σ, so
that D − D_ref is nearly zero and its λ ill-conditioned (|λ| up to 10⁹ in our runs); here D_ref skips calls at
an equal σ. (2) A λ on Heun's predictor, fitted greedily to the teacher's state, made the result worse (an early
snapshot of the bundled teacher, 4 steps: RMSE 0.19 to the many-step solution against 0.07 without), so only
completing calls get one.

`sample_dode` is the one solver loop, written out as k-diffusion writes its samplers: Euler's and Heun's steps
(EDM's arithmetic, so that λ = 0 reproduces `EulerSampler` / `HeunSampler` on EDM's schedule bit for bit) with
the extrapolated output completing each step. The fit runs the same loop, choosing each λ as it goes.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pid_diffusion.user_error import FileFormatError, OptionError
from pid_diffusion.utils import fileio
from pid_diffusion.utils.values import parse_enum
from pid_diffusion.networks import one_hot
from pid_diffusion.samplers import Denoiser, HeunSampler, _validated_sigmas, edm_sigmas, euler, heun

__all__ = [
    "DODEFit",
    "DODESampler",
    "Solver",
    "fit_batch",
    "fit_dode",
    "sample_dode",
]

Integrator = Callable[[Denoiser, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]

_FILE_FORMAT = "pid-diffusion/dode-sampler"  # tag of a saved sampler, checked on load
_FILE_VERSION = 1


class Solver(enum.Enum):
    """A base solver that D-ODE extends: one of the integrators of `samplers`."""

    EULER = "euler"
    HEUN = "heun"

    @property
    def integrator(self) -> Integrator:
        return _INTEGRATORS[self]

    def calls_in_step(self, final: bool) -> int:
        """Network calls of one step; the final step, to σ = 0, is a plain Euler step for both solvers."""
        return 1 if final else _CALLS_PER_STEP[self]

    def num_network_calls(self, num_steps: int) -> int:
        return (num_steps - 1) * self.calls_in_step(final=False) + self.calls_in_step(final=True)

    @property
    def first_adjusted_step(self) -> int:
        """The first step whose completing call has an earlier output to extrapolate from: Euler's first step
        makes a single call, Heun's corrector follows the step's own first call."""
        return 1 if self.calls_in_step(final=False) == 1 else 0

    def num_lambdas(self, num_steps: int) -> int:
        return num_steps - self.first_adjusted_step


_INTEGRATORS: dict[Solver, Integrator] = {Solver.EULER: euler, Solver.HEUN: heun}
_CALLS_PER_STEP: dict[Solver, int] = {Solver.EULER: 1, Solver.HEUN: 2}


# ----------------------------------------------------------------------------------------------------------
# The solver loop.

Callback = Callable[[dict[str, Any]], None]


@torch.no_grad()
def sample_dode(net: Denoiser, x: torch.Tensor, sigmas: torch.Tensor | tuple[float, ...], solver: Solver,
                lambdas: Sequence[float | None], class_labels: torch.Tensor | None = None, *,
                targets: Sequence[torch.Tensor] | None = None,
                callback: Callback | None = None) -> tuple[torch.Tensor, list[float | None]]:
    """D-ODE `solver` from x at σ = sigmas[0] down to sigmas[-1] = 0 (k-diffusion's convention: any decreasing
    schedule). Step k completes with D̃ = D + λ_k (D − D_ref), λ_k = lambdas[k] (None: the base solver's step).
    Returns the final state (float64) and the λ of every step.

    With `targets` (targets[k]: the state step k should reach, at sigmas[k + 1]), the λ of every step that
    `lambdas` adjusts is fitted instead: the least-squares fit over the batch of the step's result to its target.
    `callback`, k-diffusion's hook, is called after each step with the step's index `i`, its start `x` and
    `sigma`, the completing output `denoised` (D̃) and its `reference` (D_ref, None for a step without one)."""
    sigmas = _validated_sigmas(sigmas, torch.device("cpu"))  # checked on the host: the loop never waits on it
    if sigmas[-1] != 0 or len(lambdas) != len(sigmas) - 1:
        raise ValueError(f"a D-ODE solve needs a schedule ending at σ = 0 and one λ (or None) per step, got "
                         f"{len(lambdas)} for {sigmas.tolist()}")
    sigmas, x = sigmas.to(x.device), x.to(torch.float64)
    previous = None  # raw output of the previous step's first call, at the step's σ
    used: list[float | None] = []
    for k, lam in enumerate(lambdas):
        sigma, sigma_next = sigmas[k], sigmas[k + 1]
        denoised = net(x, sigma, class_labels).to(torch.float64)
        d_cur = (x - denoised) / sigma
        if solver is Solver.HEUN and k < len(lambdas) - 1:
            # Heun's corrector completes the step; the step's own first call, at a higher σ, is its D_ref.
            x_pred = x + (sigma_next - sigma) * d_cur
            completing, reference = net(x_pred, sigma_next, class_labels).to(torch.float64), denoised

            def advance(output: torch.Tensor) -> torch.Tensor:
                return x + (sigma_next - sigma) * ((d_cur + (x_pred - output) / sigma_next) / 2)
        else:
            # An Euler step, and the last step of both solvers (to σ = 0, never corrected): its only call
            # completes it. The call before it, if Heun's corrector, shares its σ: D_ref is the previous step's
            # first call.
            completing, reference = denoised, previous

            def advance(output: torch.Tensor) -> torch.Tensor:
                return x + (sigma_next - sigma) * ((x - output) / sigma)

        if lam is not None and reference is None:
            raise RuntimeError(f"step {k} has no earlier output to extrapolate from: give it λ = None")
        if lam is not None and targets is not None:
            # The step's result is affine in λ: its values at λ = 0 and 1 give the exact least-squares λ.
            base, unit = advance(completing), advance(completing + (completing - reference))
            lam = _least_squares(targets[k], base, unit - base)
        if lam is not None:
            completing = completing + lam * (completing - reference)
        if callback is not None:
            callback({"i": k, "x": x, "sigma": sigma, "denoised": completing, "reference": reference})
        x, previous = advance(completing), denoised
        used.append(lam)
    return x, used


# ----------------------------------------------------------------------------------------------------------
# The sampler and its file.

@dataclass(frozen=True)
class DODEFit:
    """How a sampler's λ's were distilled, kept with them so that the fit can be repeated."""

    multiplier: int  # C: the teacher solve takes C·(K − 1) + 1 steps of the same solver
    num_samples: int  # B: latents in the fitting batch
    seed: int  # the batch is drawn by `fit_batch(net, num_samples, seed)`
    loss_base: float  # MSE of the base K-step solve to the teacher solve on the batch (λ = 0)
    loss: float  # the same for the fitted solve: the fit's final loss


@dataclass(frozen=True)
class DODESampler:
    """A D-ODE solver on EDM's schedule: the base solver's K steps, each completed by an extrapolated denoiser
    output with its own λ (Euler's first step has nothing to extrapolate from). Called like every sampler of
    `samplers` (latents ~ N(0, I) unscaled); `fit_dode` makes one."""

    solver: Solver
    num_steps: int  # K: Karras points before the final σ = 0, as in HeunSampler
    lambdas: tuple[float, ...]  # one per adjusted step, in order: Euler K − 1 (steps 1 … K−1), Heun K
    sigma_min: float = HeunSampler.sigma_min  # ε
    sigma_max: float = HeunSampler.sigma_max  # T
    rho: float = HeunSampler.rho  # ρ of the Karras schedule
    fit: DODEFit | None = None  # how the λ's were distilled; None for λ's set by hand

    def __post_init__(self) -> None:
        object.__setattr__(self, "solver", parse_enum(Solver, self.solver, "solver"))
        object.__setattr__(self, "lambdas", tuple(float(lam) for lam in self.lambdas))
        edm_sigmas(self.num_steps, self.sigma_min, self.sigma_max, self.rho)  # checks K ≥ 2 and the σ range
        expected = self.solver.num_lambdas(self.num_steps)
        if len(self.lambdas) != expected:
            raise FileFormatError(f"D-ODE {self.solver.value} with {self.num_steps} steps needs {expected} λ's, got "
                             f"{len(self.lambdas)}; fit them with `pid-fit-dode` for this solver and step count")
        if not all(math.isfinite(lam) for lam in self.lambdas):
            raise FileFormatError(f"λ's must be finite, got {self.lambdas}")

    @classmethod
    def base(cls, solver: Solver | str, num_steps: int, **schedule: float) -> DODESampler:
        """The base solver itself (every λ = 0)."""
        solver = parse_enum(Solver, solver, "solver")
        return cls(solver, num_steps, (0.0,) * solver.num_lambdas(num_steps), **schedule)

    @property
    def sigmas(self) -> torch.Tensor:
        """The schedule, float64, ending with σ = 0."""
        return edm_sigmas(self.num_steps, self.sigma_min, self.sigma_max, self.rho)

    @property
    def num_network_calls(self) -> int:
        return self.solver.num_network_calls(self.num_steps)

    @property
    def step_lambdas(self) -> tuple[float | None, ...]:
        """λ of every step; None for a step left as it is."""
        return (None,) * self.solver.first_adjusted_step + self.lambdas

    def __call__(self, net: Denoiser, latents: torch.Tensor,
                 class_labels: torch.Tensor | None = None) -> torch.Tensor:
        sigmas = self.sigmas
        x, _ = sample_dode(net, latents.to(torch.float64) * sigmas[0], sigmas, self.solver, self.step_lambdas,
                           class_labels)
        return x.to(torch.float32)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values only, so `torch.load(weights_only=True)` reads the file."""
        return {"format": _FILE_FORMAT, "version": _FILE_VERSION,
                **dataclasses.asdict(self), "solver": self.solver.value, "lambdas": list(self.lambdas)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "the data") -> DODESampler:
        if not isinstance(data, dict) or data.get("format") != _FILE_FORMAT:
            raise FileFormatError(f"{source} is not a D-ODE sampler file (no format tag {_FILE_FORMAT!r}); "
                             f"make one with `pid-fit-dode`")
        if data.get("version") != _FILE_VERSION:
            raise FileFormatError(f"{source} is a version {data.get('version')} D-ODE sampler file; this code reads "
                             f"version {_FILE_VERSION}: fit it again with `pid-fit-dode`")
        fields = {key: value for key, value in data.items() if key not in ("format", "version")}
        known = {field.name for field in dataclasses.fields(cls)}
        if unknown := sorted(set(fields) - known):
            raise FileFormatError(f"{source} has unknown entries {unknown}; it was written by other code")
        fit = fields.get("fit")
        return cls(**{**fields, "fit": None if fit is None else DODEFit(**fit)})

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (local path or blob URL)."""
        fileio.atomic_torch_save(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> DODESampler:
        return cls.from_dict(fileio.torch_load(path), str(path))


# ----------------------------------------------------------------------------------------------------------
# Distillation.

def fit_batch(net: torch.nn.Module, num_samples: int, seed: int,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fitting batch for a denoiser with EDMPrecond's attributes (img_channels, img_resolution, label_dim):
    latents ~ N(0, I) and, for a conditional net, one-hot classes drawn uniformly, all from one CPU generator
    seeded with `seed` (the same batch on every device)."""
    if num_samples < 1:
        raise OptionError(f"num_samples must be positive, got {num_samples}")
    generator = torch.Generator().manual_seed(seed)
    shape = (num_samples, net.img_channels, net.img_resolution, net.img_resolution)
    latents = torch.randn(shape, generator=generator)
    labels = None
    if net.label_dim:
        classes = torch.randint(net.label_dim, (num_samples,), generator=generator)
        labels = one_hot(classes, net.label_dim).to(device)
    return latents.to(device), labels


def _teacher_states(net: Denoiser, sampler: DODESampler, multiplier: int, x: torch.Tensor,
                    class_labels: torch.Tensor | None) -> list[torch.Tensor]:
    """The solver with C·(K − 1) + 1 steps from x, at the K-step schedule's σ's: states[k] lies at σ_k."""
    fine = edm_sigmas(multiplier * (sampler.num_steps - 1) + 1, sampler.sigma_min, sampler.sigma_max, sampler.rho)
    # The Karras spacing is uniform in σ^(1/ρ), so σ_k of K steps is the fine σ_{C k}; both schedules then end
    # with one step from ε to 0.
    knots = [multiplier * k for k in range(sampler.num_steps)] + [len(fine) - 1]
    states = [x]
    for start, end in zip(knots[:-1], knots[1:]):
        states.append(sampler.solver.integrator(net, states[-1], fine[start:end + 1], class_labels))
    return states


def _least_squares(target: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """argmin_λ ‖target − (a + λ b)‖² over the whole batch (0 when b = 0)."""
    return ((target - a) * b).sum().div((b * b).sum().clamp_min(torch.finfo(torch.float64).tiny)).item()


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).square().mean().item()


@torch.no_grad()
def fit_dode(net: torch.nn.Module, solver: Solver | str, num_steps: int, *, multiplier: int, num_samples: int,
             seed: int = 0, sigma_min: float = HeunSampler.sigma_min, sigma_max: float = HeunSampler.sigma_max,
             rho: float = HeunSampler.rho, device: torch.device | str = "cpu") -> DODESampler:
    """Distill the K-step D-ODE `solver` from the same solver with C·(K − 1) + 1 steps on the batch
    `fit_batch(net, num_samples, seed)`; the network stays frozen."""
    if multiplier < 2:
        raise OptionError(f"multiplier must be at least 2 (the teacher solve takes C times finer steps), "
                         f"got {multiplier}")
    base = DODESampler.base(solver, num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    latents, class_labels = fit_batch(net, num_samples, seed, device)
    x = latents.to(torch.float64) * sigma_max
    targets = _teacher_states(net, base, multiplier, x, class_labels)
    output, lambdas = sample_dode(net, x, base.sigmas, base.solver, base.step_lambdas, class_labels,
                                  targets=targets[1:])
    base_output = base.solver.integrator(net, x, base.sigmas.to(x.device), class_labels)
    record = DODEFit(multiplier=multiplier, num_samples=num_samples, seed=seed,
                     loss_base=_mse(base_output, targets[-1]), loss=_mse(output, targets[-1]))
    return dataclasses.replace(base, lambdas=tuple(lambdas[base.solver.first_adjusted_step:]), fit=record)
