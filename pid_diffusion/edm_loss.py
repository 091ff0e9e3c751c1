"""EDM's denoising objective (Karras et al. 2022, Sec. 5 and Table 1; NVlabs/edm `training/loss.py`
`EDMLoss`), as an `Objective` of the shared training loop: the task that trains the bundled teacher.

    σ ~ exp(N(P_mean, P_std²)),   y ~ data,   n ~ N(0, σ² I)
    loss = λ(σ) ‖D_θ(y + n; σ) − y‖²,   λ(σ) = (σ² + σ_d²) / (σ σ_d)²
"""

from __future__ import annotations

import torch
from torch import nn

from pid_diffusion.networks import one_hot
from pid_diffusion.toydata import ImageDataset

__all__ = ["EDMObjective", "check_options"]


def check_options(P_std: float, sigma_data: float) -> None:
    """The range checks of EDM's loss options, as ValueErrors naming the option."""
    if not P_std > 0:
        raise ValueError(f"P_std must be > 0, got {P_std}")
    if not sigma_data > 0:
        raise ValueError(f"sigma_data must be > 0, got {sigma_data}")


class EDMObjective:
    """Draws (image, σ, noise) from a seeded generator and scores a denoiser with EDM's weighted L2.

    The per-sample loss is the mean over pixels (EDM sums; the constant factor only rescales the learning
    rate of SGD and is invisible to Adam). `label_dim` > 0 trains a class-conditional denoiser on the data
    set's labels, one-hot encoded.
    """

    def __init__(self, dataset: ImageDataset, P_mean: float, P_std: float, sigma_data: float, label_dim: int = 0):
        check_options(P_std, sigma_data)
        if label_dim not in (0, dataset.num_classes):
            raise ValueError(f"label_dim={label_dim} does not match the data set's {dataset.num_classes} classes; "
                             f"use 0 (unconditional) or {dataset.num_classes}")
        self.dataset = dataset
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data
        self.label_dim = label_dim

    def sample_batch(self, generator: torch.Generator, batch_size: int) -> dict[str, torch.Tensor]:
        """Data indices, σ (log-normal) and unit noise, all drawn from `generator` in that order, on its device
        (the data set stays on the CPU; the chosen images are copied over)."""
        device = generator.device
        indices = torch.randint(len(self.dataset), [batch_size], generator=generator, device=device)
        images, labels = self.dataset.batch(indices.cpu())
        images, labels = images.to(device), labels.to(device)
        sigma = (torch.randn([batch_size], generator=generator, device=device) * self.P_std + self.P_mean).exp()
        noise = torch.randn(images.shape, generator=generator, device=device)
        batch = {"images": images, "sigma": sigma, "noise": noise}
        if self.label_dim:
            batch["class_labels"] = one_hot(labels, self.label_dim)
        return batch

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """λ(σ) = (σ² + σ_d²) / (σ σ_d)², which gives the network F a unit-variance target (EDM Eq. 8)."""
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2

    def __call__(self, net: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-sample weighted denoising loss [B] of the denoiser `net` (an `EDMPrecond`)."""
        images, sigma = batch["images"], batch["sigma"]
        noisy = images + batch["noise"] * sigma[:, None, None, None]
        denoised = net(noisy, sigma, batch.get("class_labels"))
        return self.weight(sigma) * (denoised - images).square().mean(dim=(1, 2, 3))
