"""`pid-train-teacher`: train an EDM teacher on the generated shapes data set (the bundled small teacher).

    pid-train-teacher                                            # the default preset, one process
    mpirun -np 2 pid-train-teacher --run.dir=runs/teacher        # two processes
    pid-train-teacher --dry-run                                  # print the resolved options
    pid-train-teacher --export=model_zoo/edm-shapes-16x16.pt     # then write the teacher file and its grid

The same training loop, launchers, checkpoints and configuration system as `pid-distill`, with EDM's
denoising objective (`EDMObjective`) instead of PID's. Re-running the same command resumes. With
`--export`, the EMA network of the last checkpoint is written in the teacher checkpoint format
(`teacher.load_teacher` reads it) together with a PNG grid of its Heun samples (35 network calls).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
from collections.abc import Sequence

import torch

from pid_diffusion import checkpoint, dist, fileio
from pid_diffusion.cli import errors
from pid_diffusion.config import (OptimizerKind, Presets, RunConfig, TrainConfig, TrainingConfig, check,
                                  to_json)
from pid_diffusion.edm_loss import EDMObjective
from pid_diffusion.networks import EDMPrecond
from pid_diffusion.samplers import HeunSampler
from pid_diffusion.teacher import CheckpointFormat, TeacherCheckpoint
from pid_diffusion.toydata import ShapesSpec, make_shapes
from pid_diffusion.train import sampler_preview, training_loop

# ----------------------------------------------------------------------------------------------------------
# Configuration of the teacher-training task (config.py: a task subclasses TrainingConfig).


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
        check(0 <= self.dropout < 1, "network.dropout", f"need 0 ≤ dropout < 1, got {self.dropout}")


@dataclasses.dataclass(frozen=True)
class EDMLossConfig:
    """EDM's training objective (Karras et al. 2022, Table 1)."""

    P_mean: float = -1.2       # Mean of ln σ.
    P_std: float = 1.2         # Standard deviation of ln σ.
    sigma_data: float = 0.5    # σ_d of the preconditioning and the loss weight.
    conditional: bool = False  # Condition on the shape class (label_dim = number of shapes).

    def __post_init__(self):
        check(self.P_std > 0, "edm.P_std", f"must be > 0, got {self.P_std}")
        check(self.sigma_data > 0, "edm.sigma_data", f"must be > 0, got {self.sigma_data}")


@dataclasses.dataclass(frozen=True)
class TeacherTrainingConfig(TrainingConfig):
    """An EDM teacher-training run."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    network: NetworkConfig = dataclasses.field(default_factory=NetworkConfig)
    edm: EDMLossConfig = dataclasses.field(default_factory=EDMLossConfig)


TEACHER_PRESETS: Presets[TeacherTrainingConfig] = Presets(TeacherTrainingConfig)


@TEACHER_PRESETS.register("default")
def _default() -> TeacherTrainingConfig:
    """The bundled teacher `model_zoo/edm-shapes-16x16.pt`: a 1.2M-parameter SongUNet on 16×16 shapes.

    Sized for a CPU: the bundled file took 65 minutes under `mpirun -np 2` on two cores shared with other
    jobs. Adam at 1e-3 with a short warm-up suits a network this small; EMA 0.999 averages the last ~1000
    steps (after 4000 steps, 0.999^4000 ≈ 2% of the initial weights remain in it).
    """
    return TeacherTrainingConfig(
        run=RunConfig(dir="runs/teacher-shapes16", checkpoint_every=500, log_every=50, image_every=500,
                      image_count=64, sync_check_every=100),
        train=TrainConfig(steps=4000, batch=64, optimizer=OptimizerKind.ADAM, lr=1e-3, warmup_steps=200,
                          ema_rates=(0.999,)),
    )


# ----------------------------------------------------------------------------------------------------------
# The task.


def build(config: TeacherTrainingConfig) -> tuple[EDMObjective, EDMPrecond]:
    """The EDM objective on the generated data set and a freshly initialised denoiser."""
    data = make_shapes(config.data.spec())
    label_dim = data.num_classes if config.edm.conditional else 0
    objective = EDMObjective(data, P_mean=config.edm.P_mean, P_std=config.edm.P_std,
                             sigma_data=config.edm.sigma_data, label_dim=label_dim)
    torch.manual_seed(config.train.seed)  # The initial weights; DDP broadcasts rank 0's.
    network = config.network
    net = EDMPrecond(img_resolution=data.resolution, img_channels=data.channels, label_dim=label_dim,
                     sigma_data=config.edm.sigma_data, model_type="SongUNet",
                     model_channels=network.model_channels, channel_mult=list(network.channel_mult),
                     num_blocks=network.num_blocks, attn_resolutions=list(network.attn_resolutions),
                     dropout=network.dropout)
    return objective, net


def export_teacher(config: TeacherTrainingConfig, path: str, ema_rate: float) -> EDMPrecond:
    """Write the EMA network of the run's newest checkpoint as a teacher file; returns that network."""
    latest = checkpoint.latest_checkpoint(config.run.dir)
    if latest is None:
        raise FileNotFoundError(f"no checkpoint in {config.run.dir}: train first (run without --export)")
    _, source = latest
    net = checkpoint.load_generator(source, ema_rate=ema_rate)
    teacher = TeacherCheckpoint(net.init_kwargs, net.state_dict(), CheckpointFormat.CONVERTED)
    fileio.atomic_torch_save(teacher.to_file_dict(source=f"{source} (EMA {ema_rate})"), path)
    return net


def save_grid(images: torch.Tensor, path: str) -> None:
    """Images in [−1, 1] as a PNG grid, 8 per row, written atomically."""
    import torchvision.utils  # Here: importing torchvision costs seconds at every launch.

    buffer = io.BytesIO()
    torchvision.utils.save_image((images + 1) / 2, buffer, format="png", nrow=8)
    fileio.atomic_write_bytes(buffer.getvalue(), path)


def grid_path(teacher_path: str) -> str:
    """Where the Heun sample grid of a teacher file goes: beside it, `<name>-heun35.png`."""
    stem = teacher_path[:-len(".pt")] if teacher_path.endswith(".pt") else teacher_path
    return f"{stem}-heun35.png"


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, TeacherTrainingConfig]:
    parser = TEACHER_PRESETS.argument_parser("pid-train-teacher", __doc__)
    parser.add_argument("--export", metavar="PATH",
                        help="after training, write the EMA teacher to PATH (and its Heun grid beside it)")
    parser.add_argument("--export-ema", type=float, metavar="RATE",
                        help="EMA rate to export (default: the first of train.ema_rates)")
    args, config = TEACHER_PRESETS.parse(parser, argv)
    if args.export_ema is not None and args.export_ema not in config.train.ema_rates:
        parser.error(f"--export-ema={args.export_ema} is not one of train.ema_rates {config.train.ema_rates}")
    return args, config


def main(argv: Sequence[str] | None = None) -> None:
    with dist.abort_on_error(), errors.reported("pid-train-teacher"):
        args, config = parse_args(argv)
        if args.dry_run:
            dist.print0(to_json(config), end="")
            return
        device = dist.device()
        objective, net = build(config)
        preview = sampler_preview(HeunSampler(), net, config.run.image_count, config.train.seed, device)
        training_loop(config, objective, net, preview)
        if args.export and dist.rank() == 0:
            rate = args.export_ema if args.export_ema is not None else config.train.ema_rates[0]
            teacher = export_teacher(config, args.export, rate)
            save_grid(preview(teacher.to(device)), grid_path(args.export))
            dist.print0(f"Wrote the teacher {args.export} (EMA {rate}) and its Heun grid {grid_path(args.export)}")
        dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main()
