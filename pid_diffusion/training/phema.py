"""Post-hoc EMA (Karras et al. 2024, *Analyzing and Improving the Training Dynamics of Diffusion Models*, §3 and
Appendix C): power-function EMAs kept during training, and the average of any other length reconstructed from
their snapshots after training.

A power-function EMA at time t averages the trajectory θ(τ), τ ≤ t, with the profile
p_t(τ) = (γ + 1) / t · (τ / t)^γ: a fixed fraction of training, so its *relative standard deviation* σ_rel (the
std of the profile over t) is the same at every t (Eq. 123). The trainer keeps two of them (σ_rel 0.050 and 0.100
in EDM2) and stores them in every snapshot; a snapshot's EMA is one profile, and since the profiles of all
snapshots span a useful space, the least-squares combination of the stored EMAs that best matches the profile
of any other σ_rel at any snapshot time gives that average without training again (Algorithm 3).

Time is counted in images seen, nimg = step · train.batch, as EDM2 counts it; the reconstruction is the same
in any unit (the solution is invariant to scaling time).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from pid_diffusion.user_error import OptionError

__all__ = ["MAX_STD", "PREFIX", "Averages", "PowerFunctionEMA", "average_key", "exp_to_std", "is_std_name", "power_function_beta",
           "power_function_correlation", "power_function_response", "reconstruct", "solve_posthoc_coefficients",
           "std_name", "std_of", "std_to_exp", "update_average"]

PREFIX = "std-"  # A checkpoint's `ema` entry of a power-function EMA at σ_rel s is named f"std-{s:.3f}".
MAX_STD = float(np.sqrt(1 / 12))  # σ_rel of the flat profile (γ = 0); γ > 0 needs σ_rel below it (Eq. 123).


# ----------------------------------------------------------------------------------------------------------
# The profile functions (Appendix C.2).


def exp_to_std(exp) -> np.ndarray:
    """σ_rel of the power-function profile with exponent γ: sqrt((γ + 1) / ((γ + 2)² (γ + 3))) (Eq. 123)."""
    exp = np.asarray(exp, dtype=np.float64)
    return np.sqrt((exp + 1) / ((exp + 2) ** 2 * (exp + 3)))


def std_to_exp(std) -> np.ndarray:
    """The exponent γ of σ_rel: the largest real root of γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²) = 0, which is
    Eq. 123 solved for γ (Eq. 126)."""
    std = np.asarray(std, dtype=np.float64)
    inverse_square = std.reshape(-1) ** -2
    roots = [np.roots([1.0, 7.0, 16.0 - q, 12.0 - q]).real.max() for q in inverse_square]
    return np.asarray(roots, dtype=np.float64).reshape(std.shape)


def power_function_response(ofs, std, length: int, axis: int = 0) -> np.ndarray:
    """The profiles of EMAs ending at times `ofs` with σ_rel `std`, sampled at t = 0, 1, …, length − 1 along a new
    axis `axis`: p(t) = (γ + 1) / ofs · (t / ofs)^γ for t ≤ ofs, 0 after, each normalised to sum 1 (Eq. 121)."""
    ofs, std = np.broadcast_arrays(np.asarray(ofs, dtype=np.float64), np.asarray(std, dtype=np.float64))
    ofs, exp = np.expand_dims(ofs, axis), np.expand_dims(std_to_exp(std), axis)
    shape = [1] * ofs.ndim
    shape[axis] = length
    t = np.arange(length, dtype=np.float64).reshape(shape)
    profile = np.where(t <= ofs, (t / ofs) ** exp, 0.0) * (exp + 1) / ofs
    return profile / profile.sum(axis=axis, keepdims=True)


def power_function_correlation(a_ofs, a_std, b_ofs, b_std) -> np.ndarray:
    """The inner product ∫ p_a(t) p_b(t) dt of two power-function profiles (Eq. 151):
    (γa + 1)(γb + 1) / ((γa + γb + 1) · max(ta, tb)) · (ta / tb)^(γb if ta < tb else −γa)."""
    a_exp, b_exp = std_to_exp(a_std), std_to_exp(b_std)
    a_ofs, b_ofs = np.asarray(a_ofs, dtype=np.float64), np.asarray(b_ofs, dtype=np.float64)
    ratio_exp = np.where(a_ofs < b_ofs, b_exp, -a_exp)
    return (a_exp + 1) * (b_exp + 1) * (a_ofs / b_ofs) ** ratio_exp / ((a_exp + b_exp + 1) * np.maximum(a_ofs, b_ofs))


def power_function_beta(std, t_next, t_delta) -> np.ndarray:
    """The decay β of the update that moves a power-function EMA from t_next − t_delta to t_next:
    (1 − t_delta / t_next)^(γ + 1) (Eq. 127); 0 on the first update (t_delta = t_next), which copies the weights."""
    return (1 - np.asarray(t_delta, dtype=np.float64) / np.asarray(t_next, dtype=np.float64)) ** (std_to_exp(std) + 1)


def solve_posthoc_coefficients(in_ofs, in_std, out_ofs, out_std) -> np.ndarray:
    """Coefficients [inputs, outputs]: output j ≈ Σᵢ coefs[i, j] · input i, the least-squares fit of output j's
    profile by the input profiles (normal equations A x = b with A, b the profiles' inner products), each column
    normalised to sum 1 (Algorithm 3)."""
    in_ofs, in_std = (np.asarray(v, dtype=np.float64).reshape(-1, 1) for v in np.broadcast_arrays(in_ofs, in_std))
    out_ofs, out_std = (np.asarray(v, dtype=np.float64).reshape(1, -1) for v in np.broadcast_arrays(out_ofs, out_std))
    gram = power_function_correlation(in_ofs, in_std, in_ofs.T, in_std.T)
    target = power_function_correlation(in_ofs, in_std, out_ofs, out_std)
    coefs = np.linalg.solve(gram, target)
    return coefs / coefs.sum(axis=0)


# ----------------------------------------------------------------------------------------------------------
# Names of the averages in a checkpoint's `ema` entry.


def std_name(std: float) -> str:
    """The `ema` entry of σ_rel `std`: 'std-0.050' (EDM2's file-name suffix), with more digits when needed."""
    short = f"{std:.3f}"
    return PREFIX + (short if float(short) == std else repr(float(std)))


def is_std_name(name: str) -> bool:
    return name.startswith(PREFIX)


def std_of(name: str) -> float:
    """σ_rel of an `ema` entry named by `std_name`."""
    return float(name[len(PREFIX):])


def average_key(name: float | str) -> tuple[str, float]:
    """What identifies an `ema` entry however it is written: ('rate', 0.9999) for '0.9999', 0.9999 or
    '0.99990'; ('std', 0.05) for 'std-0.050' or 'std-0.05'. Raises ValueError for anything else."""
    if isinstance(name, str) and is_std_name(name):
        return "std", std_of(name)
    return "rate", float(name)


# ----------------------------------------------------------------------------------------------------------
# Training: the averages the loop keeps.


@torch.no_grad()
def update_average(average: nn.Module, model: nn.Module, beta: float) -> None:
    """One EMA step of `average` towards `model`: θ_ema ← β θ_ema + (1 − β) θ; buffers are copied."""
    torch._foreach_lerp_(list(average.parameters()), list(model.parameters()), 1.0 - beta)
    for mine, theirs in zip(average.buffers(), model.buffers()):
        mine.copy_(theirs)


class PowerFunctionEMA:
    """Power-function EMAs of a model's parameters at several σ_rel, updated after each optimizer step from the
    number of images seen; buffers are copied."""

    def __init__(self, model: nn.Module, stds: Sequence[float]):
        self.stds = tuple(stds)
        self.models = {std: copy.deepcopy(model).eval().requires_grad_(False) for std in self.stds}

    def update(self, model: nn.Module, nimg: int, batch: int) -> None:
        """After the step that brought the images seen to `nimg`, `batch` of them in that step."""
        for std, average in self.models.items():
            update_average(average, model, float(power_function_beta(std, nimg, batch)))

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {std_name(std): average.state_dict() for std, average in self.models.items()}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        missing = [std_name(std) for std in self.stds if std_name(std) not in state]
        if missing:
            raise OptionError(f"the checkpoint has no power-function EMA {', '.join(missing)}; it has "
                             f"{', '.join(state) or 'none'}")
        for std, average in self.models.items():
            average.load_state_dict(state[std_name(std)])


class Averages:
    """The training loop's averages: the fixed-rate EMAs (`fixed`, with update(model), state_dict and
    load_state_dict keyed by rate) and the power-function EMAs, side by side in a checkpoint's `ema` entry."""

    def __init__(self, fixed, power: PowerFunctionEMA):
        self.fixed, self.power = fixed, power

    def update(self, model: nn.Module, nimg: int, batch: int, skipped: bool) -> None:
        """After a step: a step skipped by loss scaling leaves the fixed-rate EMAs alone, but the power-function
        EMAs still advance in time (their weights at that step are the unchanged ones)."""
        if not skipped:
            self.fixed.update(model)
        self.power.update(model, nimg, batch)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {**self.fixed.state_dict(), **self.power.state_dict()}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        self.fixed.load_state_dict({name: value for name, value in state.items() if not is_std_name(name)})
        self.power.load_state_dict({name: value for name, value in state.items() if is_std_name(name)})


# ----------------------------------------------------------------------------------------------------------
# After training: the reconstruction.


@torch.no_grad()
def reconstruct(inputs: Iterable[tuple[int, float, dict[str, torch.Tensor]]], coefs: np.ndarray,
                buffers: Iterable[str]) -> list[dict[str, torch.Tensor]]:
    """The averages Σᵢ coefs[i, j] · inputᵢ, one state dict per column j, reading the inputs (nimg, σ_rel,
    state dict) once and in order, as `solve_posthoc_coefficients` listed them. Parameters accumulate in float32
    (float64 for float64 ones) in input order and return in their stored dtype, as EDM2's reconstruction sums
    them; `buffers` (names) are copied from the last input."""
    buffers = set(buffers)
    outputs: list[dict[str, torch.Tensor]] | None = None
    count = 0
    for index, (_, _, state) in enumerate(inputs):
        if outputs is None:
            dtypes = {name: tensor.dtype for name, tensor in state.items()}
            outputs = [{name: torch.zeros_like(tensor, dtype=torch.promote_types(tensor.dtype, torch.float32))
                        for name, tensor in state.items()} for _ in range(coefs.shape[1])]
        for j, output in enumerate(outputs):
            for name, tensor in state.items():
                if name in buffers:
                    output[name] = tensor.clone()
                else:
                    output[name] += tensor.to(output[name].dtype) * float(coefs[index, j])
        count += 1
    if count != coefs.shape[0]:
        raise ValueError(f"the reconstruction has {coefs.shape[0]} coefficients per output but read {count} inputs")
    return [{name: tensor.to(dtypes[name]) for name, tensor in output.items()} for output in outputs]
