"""A guided teacher (EDM2's generator; Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of
Itself"): D(x; σ) = D_g(x; σ) + w (D_main(x; σ) − D_g(x; σ)) at every σ, with the same labels for both.

The guide D_g is a second frozen denoiser of the same data space: the unconditional model (classifier-free
guidance) or a smaller, less-trained model of the same family (autoguidance). w = 1 is the main network alone.
PID distils the guided teacher as it would any other: the guide is one more frozen forward per sample, never
differentiated.
"""

from __future__ import annotations

import torch
from torch import nn

from pid_diffusion.user_error import OptionError

__all__ = ["GuidedDenoiser"]


class GuidedDenoiser(nn.Module):
    """D_g + w (D_main − D_g), called like the main network; its attributes (shape, labels, σ_d, encoder) are
    the main network's."""

    def __init__(self, main: nn.Module, guide: nn.Module, guidance: float):
        super().__init__()
        if not guidance > 0:
            raise OptionError(f"guidance={guidance} must be positive (1: the main network alone)")
        if type(guide) is not type(main):
            raise OptionError(f"the guide's class is {type(guide).__name__}, the main network's {type(main).__name__}: "
                              "give a guide of the main network's family (autoguidance: a smaller, less-trained one; "
                              "classifier-free guidance: its unconditional model)")
        if guide.label_dim not in (0, main.label_dim):
            raise OptionError(f"the guide's label_dim is {guide.label_dim}, the main network's {main.label_dim}: a "
                              "guide takes the main network's labels, or none (an unconditional guide)")
        for name in ("img_channels", "img_resolution"):
            if getattr(main, name) != getattr(guide, name):
                raise OptionError(f"the guide's {name} is {getattr(guide, name)}, the main network's "
                                   f"{getattr(main, name)}: a guide must denoise the same space")
        if getattr(main, "encoder", None) != getattr(guide, "encoder", None):
            raise OptionError(f"the guide's encoder {getattr(guide, 'encoder', None)} differs from the main "
                               f"network's {getattr(main, 'encoder', None)}: a guide must denoise the same space")
        self.main = main
        self.guide = guide
        self.guidance = float(guidance)
        self.img_channels = main.img_channels
        self.img_resolution = main.img_resolution
        self.label_dim = main.label_dim
        self.sigma_data = main.sigma_data
        self.encoder = getattr(main, "encoder", None)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None
                ) -> torch.Tensor:
        # An unconditional guide (classifier-free guidance) ignores the labels.
        guide_labels = class_labels if self.guide.label_dim else None
        denoised = self.main(x, sigma, class_labels).to(torch.float32)
        return self.guide(x, sigma, guide_labels).to(torch.float32).lerp(denoised, self.guidance)
