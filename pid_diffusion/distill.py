"""PID distillation (docs/method.md §5): its configuration sections, and the frozen teacher, time grid, distance,
objective and student assembled from them.

    config = resolve("cifar10", {"train.lr": "1e-4"})          # configs/distill/cifar10.json + overrides
    objective, student = build(config, device)
    preview = sampler_preview(OneStepSampler(), student, config.run.image_count, config.train.seed, device)
    training_loop(config, objective, student, preview)

The dataclass defaults are the paper's CIFAR-10 run; the preset files hold what differs from them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from pid_diffusion.user_error import MissingFileError
from pid_diffusion import config_files, encoders, official
from pid_diffusion.guidance import GuidedDenoiser
from pid_diffusion.utils import fileio, hub, perf
from pid_diffusion.config import ConfigError, OnResume, TrainingConfig, check, setting
from pid_diffusion.grid import NUM_POINTS, RHO, SIGMA_MAX, SIGMA_MIN, KarrasGrid, check_grid
from pid_diffusion.loss import Derivative, PIDObjective, ResidualForm, StudentPrecision, check_options
from pid_diffusion.precision import check_recipe
from pid_diffusion.distances import Metric
from pid_diffusion.networks import check_dropout
from pid_diffusion.networks.edm import EDM_PRESETS, EDMPrecond
from pid_diffusion.networks.edm2 import EDM2_PRESETS, EDM2_RELEASE_URL, release_preset
from pid_diffusion.student import PIDStudent, StudentInit
from pid_diffusion.teacher import (EDM_RELEASE_URL, load_teacher, network_hash, read_teacher_file,
                                   require_teacher_file)

__all__ = ["DistillConfig", "PIDConfig", "StudentConfig", "TASK", "TeacherConfig", "build", "check_files",
           "fingerprints", "network_size", "release_url", "resolve", "vae_name", "weight_files"]

TASK = "distill"  # Its presets: configs/distill/<name>.json.
LATENT_CHANNELS = 4  # EDM2's ImageNet-512 nets denoise 4-channel latents of Stable Diffusion's VAE


# ----------------------------------------------------------------------------------------------------------
# Configuration.


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """The pretrained EDM teacher."""

    # Both may change on resume (a .pkl for its converted .pt) when the network they give hashes the same.
    path: str = setting("teachers/edm-cifar10-32x32-uncond-vp.pt", OnResume.CONTENT)  # Teacher file (converted .pt or EDM/EDM2 .pkl); local, gs:// or az://.
    preset: str | None = setting(None, OnResume.CONTENT)  # EDM network preset for weights-only files; None: read from the file.
    guide_path: str | None = setting(None, OnResume.CONTENT)  # Guide D_g (EDM2: autoguidance or the unconditional net); None: unguided.
    guidance: float = 1.0  # w of D_g + w (D − D_g) (EDM2's generator); 1: the teacher alone.

    def __post_init__(self):
        check(bool(self.path), "teacher.path", "must name the teacher file")
        check(self.guidance > 0, "teacher.guidance", f"must be > 0, got {self.guidance}")
        check((self.guide_path is None) == (self.guidance == 1), "teacher.guide_path",
              "a guide needs a guidance weight w ≠ 1 and w ≠ 1 needs a guide: set both teacher.guide_path and "
              f"teacher.guidance, or neither (guide_path {self.guide_path!r}, guidance {self.guidance})")


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    """The student x_θ(z, t): the teacher's architecture."""

    init: StudentInit = StudentInit.TEACHER  # Start from the teacher's weights, random (an ablation), or a file.
    path: str | None = None                  # init=file: an official PID student file (pid_cifar.pt, model/ema_*.pt).
    dropout: float = 0.0                     # Dropout of the student network (the paper uses 0).

    def __post_init__(self):
        check_dropout(self.dropout)  # The network's own check (from_dict names the section).
        check((self.path is not None) == (self.init is StudentInit.FILE), "student.path",
              f"names the file of init=file, and only then (init is {self.init.value}, path is {self.path})")


@dataclasses.dataclass(frozen=True)
class PIDConfig:
    """The PID residual: time grid, distance, differentiation scheme (docs/method.md §3)."""

    num_points: int = NUM_POINTS                    # N, points of the Karras grid.
    rho: float = RHO                                # ρ of the Karras grid.
    sigma_min: float = SIGMA_MIN                    # ε = σ_min, the end of the trajectory.
    sigma_max: float = SIGMA_MAX                    # T = σ_max, where x_θ(z, T) = z.
    metric: Metric = Metric.LPIPS_PIQ               # Distance d(a, b).
    derivative: Derivative = Derivative.FORWARD     # forward (official), central, or jvp.
    form: ResidualForm = ResidualForm.DENOISER      # denoiser (Eq. 9, official) or derivative (Eq. 8).
    stop_neighbour_grad: bool = False               # Detach the neighbour evaluation y_j.
    pseudo_huber_c: float | None = None             # c of metric=pseudo_huber; None: iCT's 0.00054·sqrt(d).
    student_precision: StudentPrecision = StudentPrecision.TRAIN  # The student's passes: train (train.precision), fp32, or train_rounded_difference (docs/precision.md).

    def __post_init__(self):
        # The grid's and the residual's own checks (from_dict reports them under this section's name).
        check_grid(self.num_points, self.rho, self.sigma_min, self.sigma_max)
        check_options(self.derivative, self.form, self.stop_neighbour_grad)
        minimum = 3 if self.derivative is Derivative.CENTRAL else 2
        check(self.num_points >= minimum, "pid.num_points",
              f"the {self.derivative.value} scheme needs ≥ {minimum} grid points, got {self.num_points}")
        check(self.pseudo_huber_c is None or self.metric is Metric.PSEUDO_HUBER, "pid.pseudo_huber_c",
              f"applies to metric=pseudo_huber only (metric is {self.metric.value}); leave it none")
        check(self.pseudo_huber_c is None or self.pseudo_huber_c > 0, "pid.pseudo_huber_c",
              f"must be > 0, got {self.pseudo_huber_c}")

    def metric_options(self) -> dict[str, Any]:
        """Constructor options of the configured distance (`Metric.build`)."""
        return {"c": self.pseudo_huber_c} if self.metric is Metric.PSEUDO_HUBER else {}


@dataclasses.dataclass(frozen=True)
class DistillConfig(TrainingConfig):
    """A PID distillation run."""

    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    student: StudentConfig = dataclasses.field(default_factory=StudentConfig)
    pid: PIDConfig = dataclasses.field(default_factory=PIDConfig)

    def __post_init__(self):
        try:  # A 16-bit finite difference is rounded away near ε (docs/precision.md).
            check_recipe(self.train.precision, self.pid.derivative, self.pid.student_precision)
        except ValueError as error:
            raise ConfigError(f"pid.student_precision: {error}") from None
        # perf.RecomputedUNetBlock raises at the first step; a configuration should fail before the run starts.
        check(not (self.train.activation_checkpointing and self.pid.derivative is Derivative.JVP),
              "train.activation_checkpointing",
              "cannot combine with pid.derivative=jvp (recomputation drops forward-mode tangents): "
              "set it to false, or use derivative=forward or central")


def resolve(preset: str = "default", overrides: Mapping[str, str] | None = None) -> DistillConfig:
    """The distillation preset `preset` (configs/distill/<preset>.json) with `overrides` applied."""
    return config_files.load(DistillConfig, config_files.preset_file(TASK, preset), overrides)


# ----------------------------------------------------------------------------------------------------------
# Assembly.


def build(config: DistillConfig, device: torch.device) -> tuple[PIDObjective, PIDStudent]:
    """The frozen teacher's PID objective and the student it trains, on `device`."""
    pid = config.pid
    teacher = load_teacher(config.teacher.path, config.teacher.preset, device=device)
    if encoders.is_latent(teacher.encoder) and pid.metric.is_lpips:
        raise ConfigError(f"pid.metric: {pid.metric.value} compares pixels, but the teacher {config.teacher.path} "
                          "denoises VAE latents (decoding them in the loss costs more than the rest of the step); "
                          "use metric=l2 or metric=pseudo_huber, which compare latents")
    if config.train.activation_checkpointing and not isinstance(teacher, EDMPrecond):
        raise ConfigError("train.activation_checkpointing: applies to EDM's U-Nets only; an EDM2 student's forced "
                          "weight normalisation rewrites its weights at every forward, so a recomputed forward would "
                          "not be the one that was differentiated: set it to false")
    if config.teacher.guide_path is not None:
        guide = load_teacher(config.teacher.guide_path, device=device)
        try:
            teacher = GuidedDenoiser(teacher, guide, config.teacher.guidance)
        except ValueError as error:
            raise ConfigError(f"teacher.guide_path: {error}") from None
    grid = KarrasGrid(num_points=pid.num_points, rho=pid.rho, sigma_min=pid.sigma_min, sigma_max=pid.sigma_max)
    metric = pid.metric.build(**pid.metric_options()).to(device)
    # The training loop applies the speed options to the student; the teacher and the metric are built here.
    if config.train.channels_last:
        teacher.to(memory_format=torch.channels_last)
    if config.train.activation_checkpointing and pid.metric.is_lpips:
        perf.enable_lpips_recomputation(metric)
    objective = PIDObjective(teacher, grid, metric, derivative=pid.derivative, form=pid.form,
                             stop_neighbour_grad=pid.stop_neighbour_grad, student_precision=pid.student_precision)
    torch.manual_seed(config.train.seed)  # The random initialisation of the ablation; DDP broadcasts rank 0's.
    from_file = config.student.init is StudentInit.FILE
    # The recipe alone sets the student's arithmetic: never the teacher's own fp16 image path (ADM's use_fp16).
    student = PIDStudent.from_teacher(teacher, pid.sigma_min, pid.sigma_max,
                                      init=StudentInit.RANDOM if from_file else config.student.init,
                                      network_overrides={"dropout": config.student.dropout, "use_fp16": False})
    if from_file:  # The file's weights replace the network's own initialisation.
        official.load_student_weights(student, config.student.path)
    return objective, student.to(device)


def fingerprints(objective: PIDObjective) -> dict[str, str]:
    """Hashes of what the CONTENT fields name (`training_loop`'s fingerprints): the teacher's network, the
    same whichever file (EDM .pkl, converted .pt, state dict with a preset) holds it."""
    teacher = objective.teacher
    if isinstance(teacher, GuidedDenoiser):
        digest = network_hash(teacher.main)
        return {"teacher.path": digest, "teacher.preset": digest,
                "teacher.guide_path": network_hash(teacher.guide)}
    digest = network_hash(teacher)
    return {"teacher.path": digest, "teacher.preset": digest}


# ----------------------------------------------------------------------------------------------------------
# The files a run reads: checked by --dry-run, fetched by pid-fetch-weights.


def weight_files(config: DistillConfig) -> tuple[hub.WeightFile, ...]:
    """The pretrained files of torch hub's cache the run reads (the distance's)."""
    return config.pid.metric.weight_files


def release_url(path: str | None) -> str | None:
    """The URL of EDM's or EDM2's release file that a teacher path names (`.../edm-cifar10-32x32-uncond-vp.pkl`,
    `.../edm2-img512-s-2147483-0.070.pkl`, or the `.pt` converted from one); None for a file of another origin."""
    if path is None:
        return None
    stem, _, suffix = path.rsplit("/", 1)[-1].rpartition(".")
    if suffix not in ("pkl", "pt"):
        return None
    if stem in EDM_PRESETS:
        return f"{EDM_RELEASE_URL}{stem}.pkl"
    return f"{EDM2_RELEASE_URL}{stem}.pkl" if release_preset(stem) is not None else None


def vae_name(config: DistillConfig) -> str | None:
    """The VAE a latent teacher decodes with: read from the teacher file when it is there, else known from an EDM2
    ImageNet-512 release name (sd-vae-ft-mse); None for a pixel teacher or an unknown file not yet present."""
    path = config.teacher.path
    if fileio.exists(path):
        encoder = read_teacher_file(path, config.teacher.preset).encoder
        return encoder["vae_name"] if encoders.is_latent(encoder) else None
    preset = release_preset(path)
    return encoders.SD_VAE if preset is not None and EDM2_PRESETS[preset]["img_channels"] == LATENT_CHANNELS else None


def check_files(config: DistillConfig) -> list[str]:
    """Check, without reading them, that the teacher and the pretrained weight files exist: the error the run
    would give otherwise (FileNotFoundError, hub.MissingWeightsError), or one line per file found."""
    require_teacher_file(config.teacher.path)
    if config.teacher.guide_path is not None:
        require_teacher_file(config.teacher.guide_path)
    if config.student.init is StudentInit.FILE and not fileio.exists(config.student.path):
        raise MissingFileError(f"student.path {config.student.path}: no such file (init=file starts the student "
                                "from it)")
    hub.require_present(*weight_files(config))
    found = [f"teacher {config.teacher.path}: found ({_size(config.teacher.path)})"]
    if config.teacher.guide_path is not None:
        found.append(f"guide {config.teacher.guide_path}: found ({_size(config.teacher.guide_path)})")
    if config.student.init is StudentInit.FILE:
        found.append(f"student {config.student.path}: found ({_size(config.student.path)})")
    found += [f"{file.filename} ({file.used_by}): found in {hub.checkpoints_dir()}" for file in weight_files(config)]
    return found


def network_size(config: DistillConfig) -> tuple[int, str]:
    """Bytes of one network's weights, for the launch check's disk estimate (`disk_plan`), and where they come
    from: the teacher file's size (the student is the teacher's architecture; a converted teacher or a state
    dict holds just its weights, an EDM .pkl a little more)."""
    size = fileio.size(config.teacher.path)
    return size, f"the teacher file's {size / 1e6:.3g} MB"


def _size(path: str) -> str:
    try:
        return f"{fileio.size(path) / 2**20:.1f} MiB"
    except (OSError, AttributeError):
        return "size unknown"
