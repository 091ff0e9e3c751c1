"""EDM2 test material: the fixtures' tiny VAE put into a Hugging Face cache folder as `stabilityai/sd-vae-ft-mse`,
and tiny EDM2 teacher files (converted format) with a latent or a pixel encoder."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pid_diffusion import encoders
from pid_diffusion.networks.edm2 import Precond
from pid_diffusion.teacher import TeacherFile, TeacherFormat
from pid_diffusion.utils import fileio

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "edm2"
_SNAPSHOT_REVISION = "0" * 40  # a cache folder's snapshot name: any commit hash


def vae_reference() -> dict:
    return torch.load(FIXTURES / "ref_vae_tiny.pt", weights_only=True)


def install_tiny_vae(cache: Path, vae_name: str = encoders.SD_VAE) -> Path:
    """The fixtures' tiny AutoencoderKL saved where the Hugging Face hub cache `cache` keeps `vae_name`
    (models--<org>--<name>/snapshots/<rev>/ and refs/main): set HF_HUB_CACHE=cache to read it."""
    from diffusers import AutoencoderKL
    ref = vae_reference()
    vae = AutoencoderKL(**ref["vae_config"])
    vae.load_state_dict({key: value.float() for key, value in ref["vae_state_dict"].items()})
    folder = cache / f"models--{vae_name.replace('/', '--')}"
    snapshot = folder / "snapshots" / _SNAPSHOT_REVISION
    vae.save_pretrained(snapshot, safe_serialization=True)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(_SNAPSHOT_REVISION)
    return cache


def sd_vae_description() -> dict:
    """EDM2's StabilityVAEEncoder as its pickles record it (sd-vae-ft-mse, EDM2's whitening)."""
    ref = vae_reference()
    return {"class_name": encoders.STABILITY_VAE, "vae_name": encoders.SD_VAE,
            "scale": ref["scale"].tolist(), "bias": ref["bias"].tolist()}


def write_teacher(path: Path, network_kwargs: dict, encoder: dict | None, seed: int = 0,
                  meta: bool = False) -> Path:
    """An EDM2 teacher file (pid-convert-edm's format) of random weights with every gain non-zero (a fresh
    EDM2 net has zero gains, so its output would not depend on its input)."""
    torch.manual_seed(seed)
    net = Precond(**network_kwargs)
    with torch.no_grad():
        for name, value in net.named_parameters():
            if value.ndim == 0:
                value.fill_(0.5)
    teacher = TeacherFile(net.init_kwargs, net.state_dict(), TeacherFormat.CONVERTED,
                          class_name="Precond", encoder=encoder)
    fileio.atomic_torch_save(teacher.to_file_dict(source="tests"), str(path))
    return path


class SystemCall:
    """An object whose unpickling runs `command` (os.system): what a safe reader must refuse."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)
