"""EDM teacher training on the generated shapes data set (the bundled small teacher): its configuration
sections, the objective and network assembled from them, and the export of a trained run as a teacher file.
The counterpart of distill.py for `pid-train-teacher`.

    config = resolve("default", {"train.steps": "100"})        # configs/teacher/default.json + overrides
    objective, net = build(config)
    training_loop(config, objective, net, sampler_preview(HeunSampler(), net, 64, config.train.seed, device))
    export_teacher(config, "model_zoo/my-teacher.pt", ema_rate=0.999)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from pid_diffusion.user_error import MissingFileError
from pid_diffusion import config_files
from pid_diffusion.training import checkpoint
from pid_diffusion.utils import fileio
from pid_diffusion.config import TrainingConfig, check
from pid_diffusion.edm_loss import EDMObjective, check_options
from pid_diffusion.networks import check_dropout
from pid_diffusion.networks.edm import EDMPrecond
from pid_diffusion.teacher import TeacherFormat, TeacherFile
from pid_diffusion.toydata import CHANNELS, Shape, ShapesSpec, make_shapes

__all__ = ["DataConfig", "EDMLossConfig", "NetworkConfig", "TASK", "TeacherTrainingConfig", "build",
           "export_teacher", "grid_path", "network_size", "resolve"]

TASK = "teacher"  # Its presets: configs/teacher/<name>.json.


# ----------------------------------------------------------------------------------------------------------
# Configuration.


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The generated shapes data set (toydata.ShapesSpec)."""

    num_images: int = 10_000  # Images drawn.
    seed: int = 0             # Seed of the drawing.
    resolution: int = 16      # Height and width in pixels.

    def __post_init__(self):
        check(self.num_images >= 1, "data.num_images", f"must be ≥ 1, got {self.num_images}")
        check(self.resolution >= 8, "data.resolution", f"must be ≥ 8, got {self.resolution}")

    def spec(self) -> ShapesSpec:
        return ShapesSpec(num_images=self.num_images, seed=self.seed, resolution=self.resolution)


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
    """The denoiser: EDMPrecond around a SongUNet (DDPM++), sized for a CPU."""

    model_channels: int = 32                   # Base channel count.
    channel_mult: tuple[int, ...] = (1, 2, 2)  # Channel multiplier per resolution (16, 8, 4 at 16×16).
    num_blocks: int = 1                        # Residual blocks per resolution.
    attn_resolutions: tuple[int, ...] = ()     # Resolutions with self-attention (the bottleneck always has one).
    dropout: float = 0.0                       # Dropout of the residual blocks.

    def __post_init__(self):
        check(self.model_channels >= 4 and self.model_channels % 4 == 0, "network.model_channels",
               f"must be a positive multiple of 4 (GroupNorm groups), got {self.model_channels}")
        check(len(self.channel_mult) >= 1 and all(m >= 1 for m in self.channel_mult), "network.channel_mult",
               f"must list positive multipliers, got {self.channel_mult}")
        check(self.num_blocks >= 1, "network.num_blocks", f"must be ≥ 1, got {self.num_blocks}")
        check_dropout(self.dropout)  # The network's own check (from_dict names the section).


@dataclasses.dataclass(frozen=True)
class EDMLossConfig:
    """EDM's training objective (Karras et al. 2022, Table 1)."""

    P_mean: float = -1.2       # Mean of ln σ.
    P_std: float = 1.2         # Standard deviation of ln σ.
    sigma_data: float = 0.5    # σ_d of the preconditioning and the loss weight.
    conditional: bool = False  # Condition on the shape class (label_dim = number of shapes).

    def __post_init__(self):
        check_options(self.P_std, self.sigma_data)  # EDMObjective's checks (from_dict names the section).


@dataclasses.dataclass(frozen=True)
class TeacherTrainingConfig(TrainingConfig):
    """An EDM teacher-training run."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    network: NetworkConfig = dataclasses.field(default_factory=NetworkConfig)
    edm: EDMLossConfig = dataclasses.field(default_factory=EDMLossConfig)


def resolve(preset: str = "default", overrides: Mapping[str, str] | None = None) -> TeacherTrainingConfig:
    """The teacher-training preset `preset` (configs/teacher/<preset>.json) with `overrides` applied."""
    return config_files.load(TeacherTrainingConfig, config_files.preset_file(TASK, preset), overrides)


# ----------------------------------------------------------------------------------------------------------
# The task.


def build(config: TeacherTrainingConfig) -> tuple[EDMObjective, EDMPrecond]:
    """The EDM objective on the generated data set and a freshly initialised denoiser."""
    data = make_shapes(config.data.spec())
    objective = EDMObjective(data, P_mean=config.edm.P_mean, P_std=config.edm.P_std,
                             sigma_data=config.edm.sigma_data, label_dim=_label_dim(config))
    torch.manual_seed(config.train.seed)  # The initial weights; DDP broadcasts rank 0's.
    return objective, _denoiser(config)


def network_size(config: TeacherTrainingConfig) -> tuple[int, str]:
    """Bytes of the denoiser's weights, for the launch check's disk estimate (`disk_plan`), and where they come
    from: counted on the network built on the meta device (no memory, no data drawn)."""
    with torch.device("meta"):
        net = _denoiser(config)
    size = sum(tensor.numel() * tensor.element_size() for tensor in net.state_dict().values())
    return size, f"the denoiser's {size / 1e6:.3g} MB of weights"


def _label_dim(config: TeacherTrainingConfig) -> int:
    return len(Shape) if config.edm.conditional else 0


def _denoiser(config: TeacherTrainingConfig) -> EDMPrecond:
    """The configured EDMPrecond around a SongUNet for the generated images, freshly initialised."""
    network = config.network
    return EDMPrecond(img_resolution=config.data.resolution, img_channels=CHANNELS, label_dim=_label_dim(config),
                      sigma_data=config.edm.sigma_data, model_type="SongUNet",
                      model_channels=network.model_channels, channel_mult=list(network.channel_mult),
                      num_blocks=network.num_blocks, attn_resolutions=list(network.attn_resolutions),
                      dropout=network.dropout)


def export_teacher(config: TeacherTrainingConfig, path: str, ema_rate: float) -> EDMPrecond:
    """Write the EMA network of the run's newest checkpoint as a teacher file; returns that network."""
    latest = checkpoint.latest_training_state(config.run.dir)
    if latest is None:
        raise MissingFileError(f"no checkpoint in {config.run.dir}: train first (run without --export)")
    _, source = latest
    net = checkpoint.load_network(source, ema_rate=ema_rate)
    teacher = TeacherFile(net.init_kwargs, net.state_dict(), TeacherFormat.CONVERTED)
    fileio.atomic_torch_save(teacher.to_file_dict(source=f"{source} (EMA {ema_rate})"), path)
    return net


def grid_path(teacher_path: str) -> str:
    """Where the Heun sample grid of a teacher file goes: beside it, `<name>-heun35.png`."""
    stem = teacher_path[:-len(".pt")] if teacher_path.endswith(".pt") else teacher_path
    return f"{stem}-heun35.png"
