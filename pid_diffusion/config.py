"""Typed, validated configuration: sections as frozen dataclasses, presets, command-line overrides.

A configuration is a tree of frozen dataclasses. Every task has the two sections the training loop reads
(`run`: where and how often to write; `train`: batch, optimizer, precision, EMA) and its own sections
(distillation: `teacher`, `student`, `pid`). Values pass one boundary, `from_dict`, which checks each
field's type, parses enum members from their string values and runs each section's range checks; presets
and stored configurations (`config.json`, checkpoints) go through the same boundary.

Overrides come from the command line as `--section.key=value`, or `--key=value` when the key names one
field of the whole tree. An unknown key is an error that lists the close matches.

    config = resolve("cifar10", parse_overrides(["--train.lr=1e-4", "--run.dir=runs/c10"]))

A second task (teacher training) subclasses `TrainingConfig` with its own sections and keeps its own
`Presets` registry; the training loop reads only `config.run` and `config.train`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import json
import math
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

import torch

from pid_diffusion import preemption
from pid_diffusion.loss import Derivative, ResidualForm
from pid_diffusion.metrics import Metric
from pid_diffusion.student import StudentInit

__all__ = [
    "ConfigError",
    "DISTILL_PRESETS",
    "DistillConfig",
    "LRDecay",
    "OptimizerKind",
    "PIDConfig",
    "Precision",
    "Presets",
    "RunConfig",
    "StudentConfig",
    "TeacherConfig",
    "TrainConfig",
    "TrainingConfig",
    "apply_overrides",
    "check",
    "diff",
    "from_dict",
    "parse_overrides",
    "resolve",
    "to_dict",
    "to_json",
]


class ConfigError(ValueError):
    """A configuration value or key that cannot be used; the message names the key and the fix."""


# ----------------------------------------------------------------------------------------------------------
# Choices of the training loop.


class OptimizerKind(enum.Enum):
    """The optimizer; no weight decay unless configured (docs/method.md §5)."""

    RADAM = "radam"
    ADAM = "adam"

    def build(self, params, train: TrainConfig) -> torch.optim.Optimizer:
        cls = {OptimizerKind.RADAM: torch.optim.RAdam, OptimizerKind.ADAM: torch.optim.Adam}[self]
        return cls(params, lr=train.lr, betas=train.betas, eps=train.eps, weight_decay=train.weight_decay)


class LRDecay(enum.Enum):
    """The learning rate after warm-up: constant (the paper), or decayed to 0 at the last step.

    A decay to zero helps a short run most (the final steps average out the gradient noise, as an EMA does);
    the paper's runs are long and keep it constant.
    """

    CONSTANT = "constant"
    COSINE = "cosine"  # lr · ½ (1 + cos(π p)), p the fraction of the post-warm-up steps done
    LINEAR = "linear"  # lr · (1 − p)

    def factor(self, progress: float) -> float:
        """The multiplier of the learning rate at `progress` ∈ [0, 1] of the post-warm-up steps."""
        if self is LRDecay.COSINE:
            return 0.5 * (1 + math.cos(math.pi * progress))
        if self is LRDecay.LINEAR:
            return 1 - progress
        return 1.0


class Precision(enum.Enum):
    """Arithmetic of the forward pass: fp32, fp16 autocast with dynamic loss scaling, or bf16 autocast."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {Precision.FP32: None, Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}[self]

    @property
    def needs_loss_scaling(self) -> bool:
        return self is Precision.FP16


# ----------------------------------------------------------------------------------------------------------
# Sections every training task shares.


def check(condition: bool, key: str, message: str) -> None:
    """Raise ConfigError("<key>: <message>") unless `condition` holds: the range checks of every section."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Where the run writes and how often."""

    dir: str = "runs/default"       # Run folder (local path, gs:// or az://): config, checkpoints, logs, images.
    checkpoint_every: int = 10_000  # Steps between checkpoints (the last step always writes one).
    keep_checkpoints: int = 3       # Newest checkpoints kept (0: all); older ones go once a new one is complete.
    log_every: int = 100            # Steps between log lines (metrics.jsonl and the progress bar).
    image_every: int = 10_000       # Steps between one-step sample grids (samples-<step>.png); 0 never.
    image_count: int = 64           # Images in a sample grid (fixed noise, seeded by train.seed).
    sync_check_every: int = 1000    # Steps between checks that all ranks hold identical weights; 0 never.
    timeout_minutes: float = 10.0   # A collective waiting longer than this fails the job (a rank died).
    # Signals that stop the run after the step in flight, with a checkpoint and exit status 75 (preemption.py).
    preempt_signals: tuple[str, ...] = ("SIGTERM", "SIGINT", "SIGUSR1")

    def __post_init__(self):
        check(bool(self.dir), "run.dir", "must name a folder")
        for key in ("checkpoint_every", "log_every", "image_count"):
            check(getattr(self, key) >= 1, f"run.{key}", f"must be ≥ 1, got {getattr(self, key)}")
        for key in ("keep_checkpoints", "image_every", "sync_check_every"):
            check(getattr(self, key) >= 0, f"run.{key}", f"must be ≥ 0, got {getattr(self, key)}")
        check(self.timeout_minutes > 0, "run.timeout_minutes", f"must be > 0, got {self.timeout_minutes}")
        bad = preemption.check_signal_names(self.preempt_signals)
        check(not bad, "run.preempt_signals", f"{', '.join(bad)} cannot be caught here: name catchable signals "
              f"such as SIGTERM,SIGINT,SIGUSR1, or none (--run.preempt_signals=) to leave signals alone")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The optimisation: steps, batch, precision, optimizer, EMA."""

    seed: int = 0                                  # Step s draws its batch from a hash of (seed, s); seeds the RNGs.
    steps: int = 1000                              # Optimizer steps; the run stops after this many.
    batch: int = 32                                # Global batch: samples per step over all ranks.
    micro_batch: int | None = None                 # Samples per forward pass and rank; None: the rank's whole share.
    precision: Precision = Precision.FP32          # fp32, fp16 (dynamic loss scaling) or bf16 autocast.
    optimizer: OptimizerKind = OptimizerKind.RADAM  # radam or adam.
    lr: float = 2e-4                               # Learning rate after warm-up (peak, with a decay).
    betas: tuple[float, float] = (0.9, 0.999)      # Adam β1, β2.
    eps: float = 1e-8                              # Adam ε.
    weight_decay: float = 0.0                      # The optimizer's L2 weight decay (the paper uses none).
    warmup_steps: int = 0                          # Linear learning-rate warm-up from 0 over this many steps.
    lr_decay: LRDecay = LRDecay.CONSTANT           # After warm-up: constant, or cosine / linear decay to 0 at `steps`.
    grad_clip: float | None = None                 # Clip the global gradient norm to this value; None: no clipping.
    ema_rates: tuple[float, ...] = (0.999, 0.9999, 0.99995)  # EMA decay rates, kept side by side.
    activation_checkpointing: bool = False         # Recompute U-Net blocks (and LPIPS' VGG stages) in the backward pass.
    channels_last: bool = False                    # Channels-last memory format for the student and the teacher.
    compile: bool = False                          # torch.compile the model in place (state_dict keys unchanged).

    def __post_init__(self):
        check(0 <= self.seed < 2**32, "train.seed", f"must be in [0, 2^32), got {self.seed}")
        for key in ("steps", "batch"):
            check(getattr(self, key) >= 1, f"train.{key}", f"must be ≥ 1, got {getattr(self, key)}")
        check(self.steps < 2**32, "train.steps", f"must be < 2^32 (step seeds), got {self.steps}")
        check(self.micro_batch is None or 1 <= self.micro_batch <= self.batch, "train.micro_batch",
               f"must be None or between 1 and train.batch = {self.batch}, got {self.micro_batch}")
        check(self.lr > 0 and math.isfinite(self.lr), "train.lr", f"must be > 0, got {self.lr}")
        check(all(0 <= b < 1 for b in self.betas), "train.betas", f"need 0 ≤ β < 1, got {self.betas}")
        check(self.eps > 0, "train.eps", f"must be > 0, got {self.eps}")
        check(self.weight_decay >= 0, "train.weight_decay", f"must be ≥ 0, got {self.weight_decay}")
        check(self.warmup_steps >= 0, "train.warmup_steps", f"must be ≥ 0, got {self.warmup_steps}")
        check(self.grad_clip is None or self.grad_clip > 0, "train.grad_clip",
               f"must be > 0 (or none to disable clipping), got {self.grad_clip}")
        check(all(0 < r < 1 for r in self.ema_rates), "train.ema_rates", f"need 0 < rate < 1, got {self.ema_rates}")
        check(len(set(self.ema_rates)) == len(self.ema_rates), "train.ema_rates",
               f"rates must be distinct, got {self.ema_rates}")

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based): linear warm-up, then constant or decayed so that the
        step after the last would have lr 0 (the last step itself still moves)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        return self.lr * self.lr_decay.factor((step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """What the training loop reads; a task's configuration extends it with its own sections."""

    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------------------------------------
# Distillation (docs/method.md §5).


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """The pretrained EDM teacher."""

    path: str = "model_zoo/edm-shapes-16x16.pt"  # Teacher file (converted .pt or EDM .pkl); local, gs:// or az://.
    preset: str | None = None                    # EDM network preset for weights-only files; None: read from the file.

    def __post_init__(self):
        check(bool(self.path), "teacher.path", "must name the teacher file")


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    """The student x_θ(z, t): the teacher's architecture."""

    init: StudentInit = StudentInit.TEACHER  # Start from the teacher's weights, or random (an ablation).
    dropout: float = 0.0                     # Dropout of the student network (the paper uses 0).

    def __post_init__(self):
        check(0 <= self.dropout < 1, "student.dropout", f"need 0 ≤ dropout < 1, got {self.dropout}")


@dataclasses.dataclass(frozen=True)
class PIDConfig:
    """The PID residual: time grid, distance, differentiation scheme (docs/method.md §3)."""

    num_points: int = 250                           # N, points of the Karras grid.
    rho: float = 7.0                                # ρ of the Karras grid.
    sigma_min: float = 0.002                        # ε = σ_min, the end of the trajectory.
    sigma_max: float = 80.0                         # T = σ_max, where x_θ(z, T) = z.
    metric: Metric = Metric.LPIPS_PIQ               # Distance d(a, b).
    derivative: Derivative = Derivative.FORWARD     # forward (official), central, or jvp.
    form: ResidualForm = ResidualForm.DENOISER      # denoiser (Eq. 9, official) or derivative (Eq. 8).
    stop_neighbour_grad: bool = False               # Detach the neighbour evaluation y_j.
    pseudo_huber_c: float | None = None             # c of metric=pseudo_huber; None: iCT's 0.00054·sqrt(d).

    def __post_init__(self):
        minimum = 3 if self.derivative is Derivative.CENTRAL else 2
        check(self.num_points >= minimum, "pid.num_points",
               f"the {self.derivative.value} scheme needs ≥ {minimum} grid points, got {self.num_points}")
        check(self.rho > 0, "pid.rho", f"must be > 0, got {self.rho}")
        check(0 < self.sigma_min < self.sigma_max, "pid.sigma_min",
               f"need 0 < sigma_min < sigma_max, got {self.sigma_min} and {self.sigma_max}")
        check(not (self.stop_neighbour_grad and self.derivative is Derivative.JVP), "pid.stop_neighbour_grad",
               "applies to finite differences only; set it to false with derivative=jvp")
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
        # perf.CheckpointedUNetBlock raises at the first step; a configuration should fail before the run starts.
        check(not (self.train.activation_checkpointing and self.pid.derivative is Derivative.JVP),
              "train.activation_checkpointing",
              "cannot combine with pid.derivative=jvp (checkpointing does not recompute forward-mode tangents): "
              "set it to false, or use derivative=forward or central")


# ----------------------------------------------------------------------------------------------------------
# The boundary: dictionaries and strings in, typed and validated dataclasses out.


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-able dictionary of a configuration (enums as their values, tuples as lists)."""
    return {field.name: _plain(getattr(config, field.name)) for field in dataclasses.fields(config)}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return to_dict(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def to_json(config: Any) -> str:
    return json.dumps(to_dict(config), indent=2) + "\n"


C = TypeVar("C")


def from_dict(cls: type[C], data: Mapping[str, Any], prefix: str = "") -> C:
    """Build `cls` from a (possibly partial) dictionary, converting and validating every value.

    Strings are parsed according to the field's type, so command-line values and JSON values share this
    path. Missing keys keep their defaults; unknown keys are an error.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a section (a mapping), got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [field.name for field in dataclasses.fields(cls)]
    unknown = [key for key in data if key not in names]
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}: {cls.__name__} has {', '.join(names)}")
    values = {key: _convert(value, hints[key], prefix + key) for key, value in data.items()}
    try:
        return cls(**values)
    except TypeError as error:  # A missing required field.
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {error}") from None


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
_NONE = ("none", "null")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert `value` (a JSON value or a command-line string) to type `tp`, or raise naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [arg for arg in args if arg is not type(None)]
        if len(inner) != 1 or len(args) != 2:
            raise TypeError(f"{key}: only `X | None` unions are supported by the configuration boundary")
        if value is None or (isinstance(value, str) and value.lower() in _NONE):
            return None
        return _convert(value, inner[0], key)
    if origin is tuple:
        items = [item.strip() for item in value.split(",") if item.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{key}: expected a list (comma-separated on the command line), got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(item, args[0], f"{key}[{i}]") for i, item in enumerate(items))
        if len(items) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(items)} ({value!r})")
        return tuple(_convert(item, arg, f"{key}[{i}]") for i, (item, arg) in enumerate(zip(items, args)))
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, prefix=key + ".")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        try:
            return tp(value)
        except ValueError:
            choices = ", ".join(str(member.value) for member in tp)
            raise ConfigError(f"{key}: {value!r} is not one of {choices}") from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, str):
            try:
                value = int(value) if tp is int else float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (tp is int and not isinstance(value, int)):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
        return tp(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: fields of type {tp!r} are not supported by the configuration boundary")


def _leaf_keys(cls: type, prefix: str = "") -> Iterator[str]:
    """Dotted names of every field of a configuration class, sections expanded."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            yield from _leaf_keys(hints[field.name], f"{prefix}{field.name}.")
        else:
            yield prefix + field.name


def parse_overrides(args: Sequence[str]) -> dict[str, str]:
    """`["--train.lr=1e-4", "--batch=64"]` → `{"train.lr": "1e-4", "batch": "64"}` (values still strings)."""
    overrides = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"cannot read argument {arg!r}: write overrides as --key=value or --section.key=value")
        key, value = arg[2:].split("=", 1)
        if key in overrides:
            raise ConfigError(f"--{key} is given twice")
        overrides[key] = value
    return overrides


def apply_overrides(cls: type[C], base: Mapping[str, Any], overrides: Mapping[str, str]) -> C:
    """`base` (a dictionary of `cls`) with `overrides` applied, converted and validated."""
    leaves = list(_leaf_keys(cls))
    data = json.loads(json.dumps(base))  # A deep copy.
    for key, value in overrides.items():
        path = _full_key(key, leaves)
        section = data
        *parents, name = path.split(".")
        for parent in parents:
            section = section.setdefault(parent, {})
        section[name] = value
    return from_dict(cls, data)


def _full_key(key: str, leaves: list[str]) -> str:
    if key in leaves:
        return key
    matches = [leaf for leaf in leaves if leaf.endswith("." + key)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError(f"--{key} is ambiguous: write one of {', '.join('--' + m for m in matches)}")
    close = difflib.get_close_matches(key, leaves, n=3) or difflib.get_close_matches(
        key, [leaf.split(".")[-1] for leaf in leaves], n=3)
    hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
    raise ConfigError(f"unknown option --{key}{hint}")


def diff(a: Any, b: Any) -> list[str]:
    """Dotted keys whose values differ between two configurations of the same class."""
    flat_a, flat_b = _flatten(to_dict(a)), _flatten(to_dict(b))
    return sorted(key for key in flat_a.keys() | flat_b.keys() if flat_a.get(key) != flat_b.get(key))


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


# ----------------------------------------------------------------------------------------------------------
# Presets.


class Presets(Generic[C]):
    """Named configurations of one task, each a function returning its configuration."""

    def __init__(self, schema: type[C]):
        self.schema = schema
        self._makers: dict[str, Callable[[], C]] = {}

    def register(self, name: str) -> Callable[[Callable[[], C]], Callable[[], C]]:
        def decorate(maker: Callable[[], C]) -> Callable[[], C]:
            if name in self._makers:
                raise ValueError(f"preset {name!r} is registered twice")
            self._makers[name] = maker
            return maker

        return decorate

    def names(self) -> list[str]:
        return list(self._makers)

    def resolve(self, name: str, overrides: Mapping[str, str] | None = None) -> C:
        """Preset `name` with `overrides` (dotted or unique bare keys to strings) applied and validated."""
        if name not in self._makers:
            raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(self._makers)}")
        return apply_overrides(self.schema, to_dict(self._makers[name]()), overrides or {})

    def argument_parser(self, prog: str, description: str | None) -> argparse.ArgumentParser:
        """A command-line parser with the options every training command shares: --preset and --dry-run.

        Commands add their own arguments; `parse` then reads the configuration overrides from the rest.
        """
        parser = argparse.ArgumentParser(
            prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
            allow_abbrev=False, epilog="Configuration options: --section.key=value (all of them: --dry-run).")
        parser.add_argument("--preset", default="default", choices=self.names(),
                            help="the configuration to start from (default: %(default)s)")
        parser.add_argument("--dry-run", action="store_true", help="print the resolved configuration and exit")
        return parser

    def parse(self, parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> tuple[argparse.Namespace, C]:
        """The parsed arguments and the preset they name with the remaining `--key=value` overrides applied;
        a configuration error exits through `parser.error`, naming the key."""
        args, rest = parser.parse_known_args(argv)
        try:
            return args, self.resolve(args.preset, parse_overrides(rest))
        except ConfigError as error:
            parser.error(str(error))


DISTILL_PRESETS: Presets[DistillConfig] = Presets(DistillConfig)


def resolve(preset: str, overrides: Mapping[str, str] | None = None) -> DistillConfig:
    """The distillation configuration of `preset` with `overrides` applied."""
    return DISTILL_PRESETS.resolve(preset, overrides)


_PAPER_EMA_RATES = (0.999, 0.9999, 0.99995)


@DISTILL_PRESETS.register("default")
def _default() -> DistillConfig:
    """The CPU default on the bundled 16×16 teacher: the whole `pid-demo` job in under 6 minutes on two cores.

    Tuned by measurement (README, "The bundled default"): 40 grid points instead of 250 give each point
    six times the samples of a short run (its zero-residual solution, Euler on 40 Karras points, is still
    close to the teacher), and L2 needs no pretrained weights. A peak lr of 6e-3 decayed to 0 by a cosine
    trains fastest in a short run: at 300 steps of 32 it reaches 22.3 dB PSNR to the teacher (3e-3: 21.4),
    what 500 steps at a constant 1e-3 reached; 1200 steps (25.7 dB) fill the job's 6 minutes on two idle
    cores (docs/trends.md, "The demo's budget"). At the end of the decay the raw weights match the best EMA
    (the EMAs still average early, far weights), so the demo evaluates the raw ones.
    """
    return DistillConfig(
        run=RunConfig(dir="runs/pid-default", checkpoint_every=250, log_every=10, image_every=250,
                      image_count=64, sync_check_every=100),
        train=TrainConfig(steps=1200, batch=32, lr=6e-3, lr_decay=LRDecay.COSINE, ema_rates=(0.99, 0.999)),
        teacher=TeacherConfig(path="model_zoo/edm-shapes-16x16.pt"),
        pid=PIDConfig(num_points=40, metric=Metric.L2),
    )


@DISTILL_PRESETS.register("cifar10")
def _cifar10() -> DistillConfig:
    """The paper's CIFAR-10 run (docs/method.md §5): EDM DDPM++ teacher, LPIPS, RAdam 2e-4, batch 512, 800k steps."""
    return DistillConfig(
        run=RunConfig(dir="runs/pid-cifar10", checkpoint_every=10_000, image_every=10_000),
        train=TrainConfig(steps=800_000, batch=512, precision=Precision.FP32, optimizer=OptimizerKind.RADAM,
                          lr=2e-4, eps=1e-8, ema_rates=_PAPER_EMA_RATES),
        teacher=TeacherConfig(path="teachers/edm-cifar10-32x32-uncond-vp.pt"),
        pid=PIDConfig(metric=Metric.LPIPS_PIQ),
    )


@DISTILL_PRESETS.register("imagenet64")
def _imagenet64() -> DistillConfig:
    """The paper's ImageNet-64 run: EDM ADM teacher, RAdam 1e-4, batch 2048 in micro-batches of 32, fp16."""
    return DistillConfig(
        run=RunConfig(dir="runs/pid-imagenet64", checkpoint_every=10_000, image_every=10_000),
        train=TrainConfig(steps=400_000, batch=2048, micro_batch=32, precision=Precision.FP16,
                          optimizer=OptimizerKind.RADAM, lr=1e-4, eps=1e-8, ema_rates=_PAPER_EMA_RATES),
        teacher=TeacherConfig(path="teachers/edm-imagenet-64x64-cond-adm.pt"),
        pid=PIDConfig(metric=Metric.LPIPS_PIQ),
    )


def _central(config: DistillConfig, suffix: str) -> DistillConfig:
    """The same run with the second-order central difference (docs/method.md §3, variants)."""
    return dataclasses.replace(
        config, run=dataclasses.replace(config.run, dir=config.run.dir + suffix),
        pid=dataclasses.replace(config.pid, derivative=Derivative.CENTRAL))


DISTILL_PRESETS.register("cifar10-central")(lambda: _central(_cifar10(), "-central"))
DISTILL_PRESETS.register("imagenet64-central")(lambda: _central(_imagenet64(), "-central"))
