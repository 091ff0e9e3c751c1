"""Stand-ins of Inception-like and VGG-like cost for machines without the pretrained files (timing only).

Random weights change no FLOP and no memory of a forward or backward pass, so the timings they give are the
timings of the real networks; the numbers they compute mean nothing.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterator

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from pid_diffusion.utils import hub
from pid_diffusion.inception import DETECTOR_FILENAME, Detector, load_detector

INCEPTION_RESOLUTION = 299  # Inception-v3's input size; EDM's detector resizes every image to it
UINT8_MIDPOINT = 128.0  # EDM's detector normalises uint8 values as (x − 128) / 128
LPIPS_CHANNELS = (64, 128, 256, 512, 512)  # VGG16 relu1_2 … relu5_3: piq's LPIPS layer weights


def _random_vgg16_state_dict() -> dict[str, torch.Tensor]:
    """Every key and shape of torchvision's VGG16: He-initialised weights (LPIPS activations stay finite
    through the 13 layers), zero biases."""
    state = {}
    for key, value in torchvision.models.vgg16().state_dict().items():
        if value.ndim > 1:
            state[key] = torch.randn(value.shape) * math.sqrt(2 / math.prod(value.shape[1:]))
        else:
            state[key] = torch.zeros(value.shape)
    return state


@contextlib.contextmanager
def lpips_weights() -> Iterator[str]:
    """Yields where LPIPS' weights come from: the real hub cache if it holds them, else a temporary
    TORCH_HOME with random VGG16 and piq weights (set for the duration of the block)."""
    needed = (hub.VGG16_IMAGENET, hub.PIQ_LPIPS_WEIGHTS)
    if all((hub.checkpoints_dir() / file.filename).is_file() for file in needed):
        yield f"pretrained VGG16 and piq weights from {hub.checkpoints_dir()}"
        return
    previous = os.environ.get("TORCH_HOME")
    with tempfile.TemporaryDirectory(prefix="benchmark_torch_home_") as home:
        os.environ["TORCH_HOME"] = home
        try:
            directory = hub.checkpoints_dir()
            directory.mkdir(parents=True)
            torch.save(_random_vgg16_state_dict(), directory / hub.VGG16_IMAGENET.filename)
            torch.save([torch.rand(1, c, 1, 1) for c in LPIPS_CHANNELS], directory / hub.PIQ_LPIPS_WEIGHTS.filename)
            yield "random VGG16 and piq weights (pretrained files absent; same cost)"
        finally:
            if previous is None:
                del os.environ["TORCH_HOME"]
            else:
                os.environ["TORCH_HOME"] = previous


class StandInInception(nn.Module):
    """torchvision's Inception-v3 with random weights behind EDM's detector interface: uint8 NCHW images at
    any size, resized to 299×299 (bilinear) and normalised as (x − 128) / 128, give [N, 2048] features."""

    def __init__(self):
        super().__init__()
        self.net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
        self.net.fc = nn.Identity()  # the 2048-d pool features, FID's space

    def forward(self, images: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        if not return_features:
            raise ValueError("the stand-in detector has no classifier: only return_features=True is timed")
        x = F.interpolate(images.float(), size=(INCEPTION_RESOLUTION, INCEPTION_RESOLUTION), mode="bilinear",
                          align_corners=False)
        return self.net((x - UINT8_MIDPOINT) / UINT8_MIDPOINT)


def detector(device: torch.device) -> tuple[Detector, str]:
    """EDM's Inception detector if the hub cache holds it, else the stand-in; and which one it is."""
    if (hub.checkpoints_dir() / DETECTOR_FILENAME).is_file():
        return load_detector(device=device), f"EDM's {DETECTOR_FILENAME}"
    return (Detector(StandInInception(), device),
            f"stand-in: torchvision inception_v3(weights=None) at 299×299 ({DETECTOR_FILENAME} absent; same cost)")
