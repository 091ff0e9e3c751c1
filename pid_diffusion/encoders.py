"""Between pixels and the space a network denoises (EDM2's encoders, Karras et al. 2024; docs/edm2.md).

- `StandardRGBEncoder`: pixels in [−1, 1] (every EDM teacher and EDM2's ImageNet-64): uint8 x ↦ x/127.5 − 1,
  and back as x·127.5 + 128, clipped and truncated to uint8.
- `StabilityVAEEncoder`: Stable Diffusion's VAE (`stabilityai/sd-vae-ft-mse`, diffusers' `AutoencoderKL`) with
  EDM2's per-channel whitening, latent = raw·scale + bias. The VAE sees pixels in [0, 1] (uint8/255), not
  [−1, 1]; `encode_pixels` gives its posterior's mean and std (8 channels, as EDM2's data sets store them),
  `encode_latents` samples and whitens, `decode` undoes the whitening and decodes to uint8 in [0, 255].

A teacher file describes its encoder as plain data (`describe`, `check_description`): the class name, and for
the VAE its Hugging Face name and the whitening constants. `build(description)` makes the encoder. The VAE's
weights are read from the Hugging Face cache only (`vae_files`, `load_vae`); nothing is downloaded during a
run, and a missing file is an error naming each file and where it goes (`pid-fetch-weights` fetches them).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from pid_diffusion.images import to_uint8
from pid_diffusion.user_error import MissingFileError, UserError

__all__ = ["DIFFUSERS_MISSING", "SD_VAE", "DiffusersMissingError", "STABILITY_VAE", "STANDARD_RGB", "VAE_FILES", "MissingVAEError",
           "StabilityVAEEncoder", "StandardRGBEncoder", "build", "cache_dir", "check_description", "decoded_preview",
           "describe", "ImageDecoder",
           "fetch_vae", "is_latent", "load_vae", "require_vae", "vae_files"]

STANDARD_RGB = "StandardRGBEncoder"
STABILITY_VAE = "StabilityVAEEncoder"
SD_VAE = "stabilityai/sd-vae-ft-mse"  # EDM2's VAE
VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")  # what AutoencoderKL.from_pretrained reads
VAE_BATCH = 8  # images per VAE call (EDM2's default)
DIFFUSERS_MISSING = ("EDM2's latent teachers decode with diffusers' AutoencoderKL: install it with "
                     "`pip install \"pid-diffusion[edm2]\"` (or `pip install diffusers`)")


class MissingVAEError(MissingFileError):
    """The VAE's files are not in the Hugging Face cache (and nothing is downloaded during a run)."""


class DiffusersMissingError(UserError, ImportError):
    """diffusers, which runs EDM2's VAE, is not installed."""


# ----------------------------------------------------------------------------------------------------------
# Descriptions (what a teacher file records).

def describe(encoder: Any) -> dict[str, Any]:
    """The description of an encoder as EDM2's pickle records it (`edm_pickle.PickledModule`, or None when
    the file has none, which EDM2's generator reads as StandardRGBEncoder)."""
    if encoder is None:
        return {"class_name": STANDARD_RGB}
    class_name = getattr(encoder, "class_name", type(encoder).__name__)
    state = getattr(encoder, "state", {})
    if class_name == STANDARD_RGB:
        return {"class_name": STANDARD_RGB}
    if class_name == STABILITY_VAE:
        return check_description({"class_name": STABILITY_VAE, "vae_name": state.get("vae_name"),
                                  "scale": _floats(state.get("scale")), "bias": _floats(state.get("bias"))})
    raise ValueError(f"the encoder is a {class_name}; EDM2 teachers use {STANDARD_RGB} or {STABILITY_VAE}")


def _floats(values: Any) -> list[float] | None:
    return None if values is None else [float(value) for value in np.asarray(values, dtype=np.float32).reshape(-1)]


def check_description(description: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """`description` as a validated plain dict (None stays None: an EDM teacher, pixels in [−1, 1])."""
    if description is None:
        return None
    description = dict(description)
    class_name = description.get("class_name")
    if class_name == STANDARD_RGB and set(description) == {"class_name"}:
        return description
    if class_name == STABILITY_VAE and set(description) == {"class_name", "vae_name", "scale", "bias"}:
        if not isinstance(description["vae_name"], str) or not description["vae_name"]:
            raise ValueError(f"encoder vae_name {description['vae_name']!r} must name a Hugging Face model")
        for key in ("scale", "bias"):
            values = description[key]
            if not (isinstance(values, list) and values and all(isinstance(v, float) and math.isfinite(v)
                                                                for v in values)):
                raise ValueError(f"encoder {key} must be a list of finite floats, got {values!r}")
        if len(description["scale"]) != len(description["bias"]) or not all(description["scale"]):
            raise ValueError("encoder scale and bias must have one non-zero scale per latent channel")
        return description
    raise ValueError(f"unknown encoder description {description!r}; expected {STANDARD_RGB} or {STABILITY_VAE} "
                     "with vae_name, scale and bias")


def is_latent(description: Mapping[str, Any] | None) -> bool:
    """Whether the network denoises a VAE's latents (so that samples are decoded, never clamped as pixels)."""
    return description is not None and description["class_name"] == STABILITY_VAE


def build(description: Mapping[str, Any] | None, device: torch.device | str = "cpu"
          ) -> StandardRGBEncoder | StabilityVAEEncoder:
    """The encoder a description names (None: EDM's pixels, the same as StandardRGBEncoder)."""
    description = check_description(description)
    if not is_latent(description):
        return StandardRGBEncoder()
    return StabilityVAEEncoder(description["vae_name"], description["scale"], description["bias"],
                               vae=load_vae(description["vae_name"], device))


class ImageDecoder:
    """A network's samples → uint8 NHWC images: EDM's quantisation of pixels in [−1, 1], or the VAE's decoder
    (loaded once, at construction) for latents."""

    def __init__(self, description: Mapping[str, Any] | None, device: torch.device | str = "cpu"):
        self.encoder = build(description, device) if is_latent(description) else None

    def __call__(self, samples: torch.Tensor) -> torch.Tensor:
        if self.encoder is None:
            return to_uint8(samples)
        return self.encoder.decode(samples).permute(0, 2, 3, 1)

    def image_shape(self, channels: int, resolution: int) -> tuple[int, int, int]:
        """(H, W, C) of the images of samples [N, channels, resolution, resolution]."""
        if self.encoder is None:
            return resolution, resolution, channels
        scale = self.encoder.upscale
        return resolution * scale, resolution * scale, self.encoder.vae.config.out_channels


def decoded_preview(preview: Callable[[torch.nn.Module], torch.Tensor], description: Mapping[str, Any] | None,
                    device: torch.device | str = "cpu") -> Callable[[torch.nn.Module], torch.Tensor]:
    """A training preview (model → samples) whose latents are decoded to pixels in [−1, 1] (exact uint8 levels,
    so the grid quantises them back to the decoded image); pixel previews are returned unchanged."""
    if not is_latent(description):
        return preview
    decode = ImageDecoder(description, device)
    return lambda model: decode(preview(model)).permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1


# ----------------------------------------------------------------------------------------------------------
# Encoders.

class StandardRGBEncoder:
    """Pixels in [−1, 1]: EDM's convention, also EDM2's for ImageNet-64."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] → float32 in [−1, 1]."""
        return images.to(torch.float32) / 127.5 - 1

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """float [N, 3, H, W] → uint8 [N, 3, H, W] (x·127.5 + 128, clipped, truncated)."""
        return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)


class StabilityVAEEncoder:
    """Stable Diffusion's VAE with EDM2's whitening of its latents: latent = raw·scale + bias per channel."""

    def __init__(self, vae_name: str, scale: Sequence[float], bias: Sequence[float], vae: torch.nn.Module,
                 batch_size: int = VAE_BATCH):
        self.vae_name = vae_name
        self.scale = torch.tensor(scale, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.bias = torch.tensor(bias, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.vae = vae
        self.batch_size = batch_size
        self.upscale = 2 ** (len(vae.config.block_out_channels) - 1)  # each block but the last halves H and W

    @staticmethod
    def whitening(raw_mean: Sequence[float], raw_std: Sequence[float], final_mean: float = 0,
                  final_std: float = 0.5) -> tuple[list[float], list[float]]:
        """EDM2's scale = final_std/raw_std and bias = final_mean − raw_mean·scale, in float32."""
        scale = np.float32(final_std) / np.asarray(raw_std, dtype=np.float32)
        bias = np.float32(final_mean) - np.asarray(raw_mean, dtype=np.float32) * scale
        return _floats(scale), _floats(bias)

    def encode_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] → the VAE posterior's mean and std, concatenated [N, 2C, H/8, W/8]."""
        x = images.to(torch.float32) / 255
        parts = []
        for batch in x.split(self.batch_size):
            posterior = self.vae.encode(batch).latent_dist
            parts.append(torch.cat([posterior.mean, posterior.std], dim=1))
        return torch.cat(parts)

    def encode_latents(self, mean_std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A posterior sample, whitened: (mean + n·std)·scale + bias with n ~ N(0, I) from `generator`."""
        mean, std = mean_std.to(torch.float32).chunk(2, dim=1)
        noise = torch.empty_like(mean).normal_(generator=generator)  # in mean's memory order, as randn_like
        return (mean + noise * std) * self.scale.to(mean.device) + self.bias.to(mean.device)

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.encode_latents(self.encode_pixels(images), generator)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents [N, C, h, w] → uint8 [N, 3, 8h, 8w]: unwhiten, decode, clamp to [0, 1], ×255, truncate."""
        x = (x.to(torch.float32) - self.bias.to(x.device)) / self.scale.to(x.device)
        images = torch.cat([self.vae.decode(batch).sample for batch in x.split(self.batch_size)])
        return images.clamp(0, 1).mul(255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------------------
# The VAE's files in the Hugging Face cache.

def _hub():
    try:
        import diffusers  # noqa: F401  (huggingface_hub comes with it)
        import huggingface_hub
    except ImportError:
        raise DiffusersMissingError(DIFFUSERS_MISSING) from None
    return huggingface_hub


def vae_files(vae_name: str) -> list[tuple[str, str | None]]:
    """(file, path in the Hugging Face cache or None when absent) for each file `load_vae` reads."""
    hub = _hub()
    return [(name, _cached(hub, vae_name, name)) for name in VAE_FILES]


def _cached(hub: Any, vae_name: str, filename: str) -> str | None:
    path = hub.try_to_load_from_cache(vae_name, filename, cache_dir=cache_dir())
    return path if isinstance(path, str) else None


def cache_dir() -> str:
    """The Hugging Face hub cache ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub), read from
    the environment at each call (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def require_vae(vae_name: str) -> None:
    """A MissingVAEError naming each missing file, its URL and the cache it goes to, unless all are cached."""
    missing = [name for name, path in vae_files(vae_name) if path is None]
    if missing:
        urls = ", ".join(f"https://huggingface.co/{vae_name}/resolve/main/{name}" for name in missing)
        raise MissingVAEError(
            f"the VAE {vae_name} is not in the Hugging Face cache {cache_dir()} (missing {', '.join(missing)}; "
            f"from {urls}); on a machine with network access run `pid-fetch-weights` with the run's options, or "
            f"`huggingface-cli download {vae_name} {' '.join(VAE_FILES)}`, and copy the cache folder "
            f"models--{vae_name.replace('/', '--')} here (set HF_HOME or HF_HUB_CACHE to use another cache)")


def load_vae(vae_name: str, device: torch.device | str = "cpu") -> torch.nn.Module:
    """diffusers' AutoencoderKL `vae_name` from the Hugging Face cache (never downloaded here), frozen, float32."""
    require_vae(vae_name)
    from diffusers import AutoencoderKL
    with warnings.catch_warnings():  # diffusers passes huggingface_hub an argument it has deprecated
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        vae = AutoencoderKL.from_pretrained(vae_name, cache_dir=cache_dir(), local_files_only=True,
                                            torch_dtype=torch.float32, low_cpu_mem_usage=False)
    return vae.eval().requires_grad_(False).to(device)


def fetch_vae(vae_name: str) -> list[str]:
    """Download the VAE's files into the Hugging Face cache (network needed); their paths."""
    hub = _hub()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return [hub.hf_hub_download(vae_name, name, cache_dir=cache_dir()) for name in VAE_FILES]
