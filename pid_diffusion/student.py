"""The PID student: a trajectory x_θ(z, t) with the boundary condition x_θ(z, T) = z built in (docs/method.md §2).

    x_θ(z, t) = (t / T) · z + (1 − t / T) · F_θ(c_in · z, c_noise(t), class_labels)
    c_in = 1 / sqrt(σ_d² + T²)   (constant: the image input is always z ~ N(0, T² I))
    c_noise(t) = ln(t) / 4

F_θ is the teacher's raw network with its architecture:
- an EDM teacher's (SongUNet or DhariwalUNet), less its augmentation input: PID never passes augment labels,
  so the student is built with augment_dim = 0 and has no `map_augment` layer (as in the official code). A
  layer that takes no part in the loss would get no gradient, and DDP stops at the second step when a
  parameter received none;
- an EDM2 teacher's magnitude-preserving `UNet` (without the `logvar` head, which only EDM2's training loss
  uses). Its MPConv layers keep EDM2's forced weight normalisation in train mode: before each training
  forward every weight is rescaled in place to unit norm per output channel. The network computes with the
  normalised weights either way, so this changes no output; it keeps the parameters on the unit sphere, where
  an Adam step of a given lr moves them by a fixed angle, as in the training the teacher came from (without it
  the weights' norms grow and the effective learning rate decays; EDM2 paper §2.4). Snapshots and EMAs
  therefore hold normalised weights.

A student of a latent teacher (EDM2's ImageNet-512, `encoder` a VAE) samples latents: they are never clamped
as pixels; `pid-sample`, `pid-fid` and the training preview decode them.
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pid_diffusion import encoders
from pid_diffusion.grid import check_noise_range
from pid_diffusion.networks.edm import EDMPrecond
from pid_diffusion.networks.edm2 import Precond

EDM_CLASS, EDM2_CLASS = "EDMPrecond", "Precond"  # the teacher classes a student is built from

AUGMENT_MAPPING = "map_augment."  # The raw network's augment-label layer (EDM's key names).


class StudentInit(enum.Enum):
    """Where the student network's weights come from."""

    TEACHER = "teacher"  # copy the teacher's F_φ (every paper run)
    RANDOM = "random"  # keep the network's own initialisation (the paper's ablation)
    FILE = "file"  # copy an official PID student file's weights (student.path; distill.build loads them)


class PIDStudent(nn.Module):
    """x_θ(z, t) = (t/T) z + (1 − t/T) F_θ(c_in z, ln(t)/4, labels); a sample is x_θ(z, ε) clamped to [−1, 1].

    `network_kwargs` are `EDMPrecond` constructor arguments (a teacher's `init_kwargs`); only its raw
    network `model` is kept, built with augment_dim = 0 whatever the teacher's (module docstring). As in EDMPrecond, the image path of F runs in float16 only on CUDA with
    `use_fp16`; the output is always float32.
    """

    def __init__(self, network_kwargs: Mapping[str, Any], sigma_min: float, sigma_max: float, sigma_data: float,
                 network_class: str = EDM_CLASS, encoder: Mapping[str, Any] | None = None):
        check_noise_range(sigma_min, sigma_max)
        if not sigma_data > 0:
            raise ValueError(f"sigma_data={sigma_data} must be positive")
        super().__init__()
        if network_class == EDM_CLASS:
            precond = EDMPrecond(**{**network_kwargs, "augment_dim": 0})
            self.model = precond.model
        elif network_class == EDM2_CLASS:
            precond = Precond(**network_kwargs)
            self.model = precond.unet
        else:
            raise ValueError(f"network_class={network_class!r}: a student is built from {EDM_CLASS} or {EDM2_CLASS}")
        self.encoder = encoders.check_description(encoder)
        self.init_kwargs = dict(network_kwargs=copy.deepcopy(precond.init_kwargs), sigma_min=float(sigma_min),
                                sigma_max=float(sigma_max), sigma_data=float(sigma_data))
        if network_class != EDM_CLASS:  # EDM students keep the checkpoint format they always had
            self.init_kwargs.update(network_class=network_class, encoder=copy.deepcopy(self.encoder))
        self.img_resolution = precond.img_resolution
        self.img_channels = precond.img_channels
        self.label_dim = precond.label_dim
        self.use_fp16 = precond.use_fp16
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.sigma_data = float(sigma_data)

    @classmethod
    def from_teacher(cls, teacher: nn.Module, sigma_min: float, sigma_max: float,
                     init: StudentInit = StudentInit.TEACHER,
                     network_overrides: Mapping[str, Any] | None = None) -> PIDStudent:
        """A student with the teacher's architecture (and weights, with `StudentInit.TEACHER`).

        `network_overrides` replace constructor arguments of the teacher, e.g. `{"dropout": 0.0}`: the
        released EDM teachers were trained with dropout, PID trains the student without (docs/method.md §5).
        Every teacher weight is copied except `map_augment`'s, which the student does not have; the
        teacher keeps its full EDM state dict.
        """
        teacher = getattr(teacher, "main", teacher)  # a guided teacher's architecture is its main network's
        network_class = type(teacher).__name__
        network_kwargs = {**teacher.init_kwargs, **(network_overrides or {})}
        student = cls(network_kwargs, sigma_min, sigma_max, teacher.sigma_data, network_class=network_class,
                      encoder=getattr(teacher, "encoder", None))
        if init is StudentInit.TEACHER:
            raw = teacher.model if network_class == EDM_CLASS else teacher.unet
            weights = {key: value.float() for key, value in raw.state_dict().items()
                       if not key.startswith(AUGMENT_MAPPING)}
            student.model.load_state_dict(weights)  # strict: any other difference is an error
        elif init is not StudentInit.RANDOM:
            raise TypeError(f"init={init!r}: pass StudentInit.TEACHER or RANDOM (a file's weights are loaded into "
                            "the built student: official.load_student_weights)")
        return student

    def forward(self, z: torch.Tensor, t: torch.Tensor | float, class_labels: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x_θ(z, t) for latents z ~ N(0, T² I) of shape [B, C, H, W]; t is a scalar or one time per sample."""
        out_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        z = z.to(out_dtype)
        batch = z.shape[0]
        t = torch.as_tensor(t, device=z.device).to(out_dtype).reshape(-1)
        if t.numel() not in (1, batch):
            raise ValueError(f"t has {t.numel()} values for a batch of {batch}; pass a scalar or one per sample")
        t = t.expand(batch).reshape(-1, 1, 1, 1)
        class_labels = self._check_labels(class_labels, batch)
        dtype = torch.float16 if self.use_fp16 and z.device.type == "cuda" else out_dtype

        c_in = 1 / (self.sigma_data ** 2 + self.sigma_max ** 2) ** 0.5
        c_noise = t.log() / 4
        F_z = self.model((c_in * z).to(dtype), c_noise.flatten(), class_labels)
        skip = t / self.sigma_max  # exactly 1 at t = T, so x_θ(z, T) = z holds bit for bit
        return skip * z + (1 - skip) * F_z.to(out_dtype)

    @torch.no_grad()
    def sample(self, z: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """One-step generation: x_θ(z, ε), clamped to the data range [−1, 1] for pixels; latents unclamped."""
        x = self(z, self.sigma_min, class_labels)
        return x if encoders.is_latent(self.encoder) else x.clamp(-1, 1)

    def _check_labels(self, class_labels: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """Class labels as float32 [B, label_dim], or None for an unconditional student."""
        if self.label_dim == 0:
            if class_labels is not None:
                raise ValueError("this student is unconditional (label_dim = 0): pass class_labels=None")
            return None
        if class_labels is None:
            raise ValueError(f"this student is class-conditional (label_dim = {self.label_dim}): pass one-hot "
                             f"class_labels of shape [B, {self.label_dim}]")
        class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        if class_labels.shape[0] != batch:
            raise ValueError(f"{class_labels.shape[0]} class labels for a batch of {batch} latents")
        return class_labels
