"""PID's discretisation of the trajectory: the Karras time grid and the sampling of grid indices.

    t_i = ( T^(1/ρ) + i/(N−1) · (ε^(1/ρ) − T^(1/ρ)) )^ρ,   i = 0 … N−1   (index 0 at T, N−1 at ε)

The grid is computed in float64; callers cast the values they use to their working dtype. Its table is copied
once to each device that asks (`sigmas_on`), and indices are checked where they are created or enter from
outside (`check_indices`), not at every lookup: the training step reads nothing back from the device for them.
"""

from __future__ import annotations

import torch

from pid_diffusion.user_error import OptionError

# The paper constants, defined here once (EDM's schedule; PID's grid of N points, docs/method.md §5).
SIGMA_MIN = 0.002  # ε, the end of the trajectory.
SIGMA_MAX = 80.0   # T, where x_θ(z, T) = z.
RHO = 7.0          # ρ, the Karras exponent.
NUM_POINTS = 250   # N, points of PID's grid.


def check_noise_range(sigma_min: float, sigma_max: float) -> None:
    """The range check of every (ε, T) pair: grids, samplers and students."""
    if not 0 < sigma_min < sigma_max:
        raise OptionError(f"sigma_min={sigma_min}, sigma_max={sigma_max}: need 0 < sigma_min < sigma_max")


def check_grid(num_points: int, rho: float, sigma_min: float, sigma_max: float, count: str = "num_points") -> None:
    """The range checks of a Karras grid or schedule, as ValueErrors naming the parameter (`count`: the name of
    the number of points at the caller)."""
    if num_points < 2:
        raise OptionError(f"{count}={num_points}: the grid needs at least 2 points (N ≥ 2)")
    check_noise_range(sigma_min, sigma_max)
    if not rho > 0:
        raise OptionError(f"rho={rho}: the Karras exponent must be positive")


class KarrasGrid:
    """N points from T = σ_max down to ε = σ_min, spaced as in Karras et al. (2022) with exponent ρ."""

    def __init__(self, num_points: int, rho: float, sigma_min: float, sigma_max: float):
        check_grid(num_points, rho, sigma_min, sigma_max)
        self.num_points = int(num_points)
        self.rho = float(rho)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        u = torch.arange(self.num_points, dtype=torch.float64) / (self.num_points - 1)
        first, last = self.sigma_max ** (1 / self.rho), self.sigma_min ** (1 / self.rho)
        sigmas = (first + u * (last - first)) ** self.rho
        # Pin the end points: rounding in the power must not move the boundary x_θ(z, T) = z or ε.
        sigmas[0], sigmas[-1] = self.sigma_max, self.sigma_min
        self.sigmas = sigmas
        self._tables = {sigmas.device: sigmas}  # The table on each device it was asked for: copied there once.

    def __repr__(self) -> str:
        return (f"KarrasGrid(num_points={self.num_points}, rho={self.rho}, sigma_min={self.sigma_min}, "
                f"sigma_max={self.sigma_max})")

    def sigmas_on(self, device: torch.device) -> torch.Tensor:
        """The float64 table of t_i on `device`, copied there on the first call only."""
        table = self._tables.get(device)
        if table is None:
            table = self._tables[device] = self.sigmas.to(device)
        return table

    def times(self, indices: torch.Tensor) -> torch.Tensor:
        """t_i at `indices` (float64, on the indices' device); the indices are trusted (`check_indices`)."""
        return self.sigmas_on(indices.device)[indices]

    def sample_indices(self, n: int, generator: torch.Generator, interior_only: bool = False) -> torch.Tensor:
        """n indices drawn uniformly from 0 … N−1, or from 1 … N−2 with `interior_only` (central differences)."""
        low, high = (1, self.num_points - 1) if interior_only else (0, self.num_points)
        if low >= high:
            raise OptionError(f"a grid of {self.num_points} points has no interior points; use num_points ≥ 3")
        return torch.randint(low, high, (n,), generator=generator, device=generator.device)

    def forward_neighbours(self, indices: torch.Tensor) -> torch.Tensor:
        """j = i + 1, except j = N − 2 at i = N − 1 (a backward difference at ε, as the official code does).
        The indices are trusted: `check_indices` where they come from outside `sample_indices`."""
        last = self.num_points - 1
        return torch.where(indices == last, last - 1, indices + 1)

    def central_neighbours(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(i − 1, i + 1) for interior indices i = 1 … N − 2 (trusted, as in `forward_neighbours`)."""
        return indices - 1, indices + 1

    def check_indices(self, indices: torch.Tensor, interior_only: bool = False) -> None:
        """Raise a clear error unless `indices` are integer grid indices (interior ones when asked). It reads the
        indices' range on the host (a device sync on CUDA): call it where indices enter from outside, not on
        those `sample_indices` draws, which are in range by construction."""
        if indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise TypeError(f"grid indices must be an integer tensor, got {indices.dtype}")
        low, high = (1, self.num_points - 2) if interior_only else (0, self.num_points - 1)
        if indices.numel() and (indices.min() < low or indices.max() > high):
            where = "interior indices 1 … N−2 (the central difference needs both neighbours)" if interior_only \
                else "indices 0 … N−1"
            raise ValueError(f"grid indices range over [{indices.min().item()}, {indices.max().item()}]; "
                             f"a grid of N = {self.num_points} points takes {where}")
