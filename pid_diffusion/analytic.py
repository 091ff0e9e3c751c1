"""An exact teacher for tests: the ideal denoiser of Gaussian data and its closed-form ODE solution.

For data N(μ, s² I) the noisy marginal at σ is N(μ, (s² + σ²) I), so (docs/method.md §4)

    D(x, σ) = (s² x + σ² μ) / (s² + σ²)
    x(σ)    = μ + (z − μ) · sqrt(s² + σ²) / sqrt(s² + T²)    solves dx/dσ = (x − D(x, σ)) / σ, x(T) = z.
"""

from __future__ import annotations

import torch
from torch import nn


class GaussianTeacher(nn.Module):
    """The ideal denoiser of N(μ, s² I) image data, called like `EDMPrecond` (D(x; σ), unconditional).

    Unlike EDMPrecond it computes in the dtype of its input (float64 stays float64), so that convergence
    tests can measure discretisation errors far below float32 rounding.
    """

    def __init__(self, mu: torch.Tensor | float, s: float, img_channels: int, img_resolution: int,
                 sigma_data: float = 0.5):
        super().__init__()
        if not s > 0:
            raise ValueError(f"s={s}: the data standard deviation must be positive")
        shape = (img_channels, img_resolution, img_resolution)
        mu = torch.as_tensor(mu, dtype=torch.float64)
        if mu.ndim and mu.shape != shape:
            raise ValueError(f"mu has shape {tuple(mu.shape)}; pass a scalar or a tensor of the image shape {shape}")
        self.register_buffer("mu", mu.expand(shape).clone())
        self.s = float(s)
        self.img_channels = img_channels
        self.img_resolution = img_resolution
        self.sigma_data = float(sigma_data)
        self.label_dim = 0

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None, force_fp32: bool = False) -> torch.Tensor:
        """D(x, σ) = (s² x + σ² μ) / (s² + σ²); σ is a scalar or one value per sample."""
        if class_labels is not None or augment_labels is not None:
            raise ValueError("GaussianTeacher is unconditional and unaugmented: pass no class or augment labels")
        sigma = self._per_sample(sigma, x)
        mu = self.mu.to(x.dtype)
        return (self.s ** 2 * x + sigma ** 2 * mu) / (self.s ** 2 + sigma ** 2)

    def exact_solution(self, z: torch.Tensor, sigma: torch.Tensor | float, sigma_max: float) -> torch.Tensor:
        """x(σ) = μ + (z − μ) · sqrt(s² + σ²) / sqrt(s² + T²): the probability-flow ODE solution from x(T) = z."""
        sigma = self._per_sample(sigma, z)
        mu = self.mu.to(z.dtype)
        return mu + (z - mu) * ((self.s ** 2 + sigma ** 2) / (self.s ** 2 + sigma_max ** 2)).sqrt()

    @staticmethod
    def _per_sample(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        """σ in x's dtype and device, shaped [B, 1, 1, 1] (or [1, 1, 1, 1]) to broadcast over images."""
        return torch.as_tensor(sigma, device=x.device).to(x.dtype).reshape(-1, 1, 1, 1)
