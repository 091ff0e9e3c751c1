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

The base solvers are `samplers.euler` and `samplers.heun` themselves, run step by step with the adjusted
denoiser: a D-ODE sampler with λ = 0 reproduces `EulerSampler` / `HeunSampler` on EDM's schedule exactly.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pid_diffusion.user_error import FileFormatError, OptionError
from pid_diffusion.utils import fileio
from pid_diffusion.utils.values import parse_enum
from pid_diffusion.networks import one_hot
from pid_diffusion.samplers import Denoiser, HeunSampler, edm_sigmas, euler, heun

__all__ = [
    "DODEDenoiser",
    "DODEFit",
    "DODESampler",
    "Solver",
    "Trace",
    "fit_batch",
    "fit_dode",
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
# The adjusted denoiser.

@dataclass(frozen=True)
class Trace:
    """What a D-ODE denoiser remembers of the solve so far."""

    sigma: float  # σ of the last call
    output: torch.Tensor  # raw output D of the last call
    reference: torch.Tensor | None  # raw output of the latest call at a σ above `sigma` (None: no such call)


class DODEDenoiser:
    """One step of a D-ODE solve around a frozen denoiser: the step's completing call (its last of `num_calls`)
    returns D̃ = D + λ (D − D_ref), where D_ref is the raw output of the latest earlier call at a higher σ (the
    previous step's); the other calls return D. `trace` carries the memory from step to step; λ = None leaves
    the step as it is (a first step without an earlier output). Outputs are float64, as the integrators use."""

    def __init__(self, net: Denoiser, lam: float | None, num_calls: int, trace: Trace | None = None):
        self.net = net
        self.lam = lam
        self.num_calls = num_calls
        self.trace = trace
        self.calls_made = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float,
                 class_labels: torch.Tensor | None = None) -> torch.Tensor:
        sigma_value = float(sigma)  # the integrators call with one σ for the whole batch
        denoised = self.net(x, sigma, class_labels).to(torch.float64)
        reference = self._reference(sigma_value)
        self.trace = Trace(sigma_value, denoised, reference)
        self.calls_made += 1
        if self.calls_made < self.num_calls or self.lam is None:
            return denoised
        if reference is None:
            raise RuntimeError("the step's completing call has no earlier output to extrapolate from: give it "
                               "λ = None")
        return denoised + self.lam * (denoised - reference)

    def _reference(self, sigma: float) -> torch.Tensor | None:
        """D_ref for a call at σ, from the trace of the calls before it."""
        if self.trace is None:
            return None
        if sigma > self.trace.sigma:
            raise RuntimeError(f"σ rose from {self.trace.sigma} to {sigma} within a solve; D-ODE needs a "
                               "solver whose noise levels never increase")
        return self.trace.output if sigma < self.trace.sigma else self.trace.reference


def _step(solver: Solver, net: Denoiser, x: torch.Tensor, interval: torch.Tensor,
          class_labels: torch.Tensor | None, lam: float | None, final: bool,
          trace: Trace | None) -> tuple[torch.Tensor, Trace]:
    """One D-ODE step of `solver` from x at interval[0] to interval[1]: the new state and the trace."""
    denoiser = DODEDenoiser(net, lam, solver.calls_in_step(final), trace)
    x = solver.integrator(denoiser, x, interval, class_labels)
    # The λ must have acted on the step's last call: anything else means a solver this module does not know.
    if denoiser.calls_made != denoiser.num_calls:
        raise RuntimeError(f"a {solver.value} step made {denoiser.calls_made} network calls, not "
                           f"{denoiser.num_calls}")
    return x, denoiser.trace


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
        sigmas = self.sigmas.to(latents.device)
        x, trace = latents.to(torch.float64) * sigmas[0], None
        # Step by step, which computes exactly what one integrator call over the whole schedule would.
        for k, lam in enumerate(self.step_lambdas):
            x, trace = _step(self.solver, net, x, sigmas[k:k + 2], class_labels, lam, k == self.num_steps - 1, trace)
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


def _fit_lambdas(net: Denoiser, sampler: DODESampler, targets: list[torch.Tensor], x: torch.Tensor,
                 class_labels: torch.Tensor | None) -> tuple[list[float], torch.Tensor]:
    """λ's fitted greedily, step by step, to the teacher states `targets` (targets[k] at σ_k); also returns the
    fitted solve's output on the batch."""
    sigmas = sampler.sigmas.to(x.device)
    lambdas: list[float] = []
    trace = None  # the D-ODE denoiser's memory, carried from step to step
    for k in range(sampler.num_steps):
        interval, final = sigmas[k:k + 2], k == sampler.num_steps - 1
        lam = None
        if k >= sampler.solver.first_adjusted_step:
            # The step's result is affine in its λ: two probes give it exactly.
            a, _ = _step(sampler.solver, net, x, interval, class_labels, 0.0, final, trace)
            b, _ = _step(sampler.solver, net, x, interval, class_labels, 1.0, final, trace)
            lam = _least_squares(targets[k + 1], a, b - a)
            lambdas.append(lam)
        x, trace = _step(sampler.solver, net, x, interval, class_labels, lam, final, trace)
    return lambdas, x


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
    lambdas, output = _fit_lambdas(net, base, targets, x, class_labels)
    base_output = base.solver.integrator(net, x, base.sigmas.to(x.device), class_labels)
    record = DODEFit(multiplier=multiplier, num_samples=num_samples, seed=seed,
                     loss_base=_mse(base_output, targets[-1]), loss=_mse(output, targets[-1]))
    return dataclasses.replace(base, lambdas=tuple(lambdas), fit=record)
