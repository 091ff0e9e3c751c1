"""Typed, validated configuration: sections as frozen dataclasses, preset files, command-line overrides.

A configuration is a tree of frozen dataclasses. Every task has the two sections the training loop reads
(`run`: where and how often to write; `train`: batch, optimizer, precision, EMA) and adds its own (distill.py:
`teacher`, `student`, `pid`; teacher_training.py: `data`, `network`, `edm`). The defaults are the paper's
CIFAR-10 run. Values pass one boundary, `from_dict`, which checks each field's type, parses enum members from
their string values and runs each section's range checks; a section that checks its values with the checks of
the object it configures (a grid, a loss) lets their ValueError through, and `from_dict` reports it as a
ConfigError naming the section. Preset files, stored configurations (`config.json`, training states) and
command-line overrides all go through it.

Presets are JSON files holding only what differs from these defaults (configs/). Overrides
come as `--section.key=value`, or `--key=value` when the key names one field of the whole tree; an unknown
key is an error that lists the close matches.

    config = apply_overrides(DistillConfig, {"train": {"batch": 64}}, parse_overrides(["--train.lr=1e-4"]))
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import math
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

from pid_diffusion.user_error import UserError
from pid_diffusion.training import phema
from pid_diffusion.utils import preemption
from pid_diffusion.utils.values import parse_enum, plain

__all__ = ["ConfigError", "LRDecay", "OnResume", "OptimizerKind", "Precision", "RunConfig", "TrainConfig",
           "TrainingConfig", "apply_overrides", "check", "diff", "flatten", "from_dict", "leaf_fields",
           "leaf_keys", "on_resume", "parse_overrides", "resume_classes", "setting", "to_dict", "to_json"]


class ConfigError(UserError, ValueError):
    """A configuration value or key that cannot be used; the message names the key and the fix."""


# ----------------------------------------------------------------------------------------------------------
# What may change when a run is resumed: a property of each field, declared beside it.


class OnResume(enum.Enum):
    """How a field may differ between a run's stored configuration and the command that resumes it.

    A field is MATCH unless its declaration says otherwise (`setting(default, OnResume.FREE)`), so a new
    field is safe until someone decides it is not part of the run's maths.
    """

    MATCH = "must match"       # Defines the run's maths: a resumed run must use the stored value.
    FREE = "may change"        # Where and how often the run writes, how far it goes: the weights never see it.
    NUMERICS = "may change (same maths, other rounding)"  # The same sums in another order or memory layout.
    CONTENT = "may change if the file's weights are equal"  # A file compared by the hash of what it holds.
    SCHEDULE = "may change (the lr of the steps to come)"  # schedule.py: given explicitly, shown by the dry-run.


_ON_RESUME = "on_resume"  # The field-metadata key.


def setting(default: Any = dataclasses.MISSING, resume: OnResume = OnResume.MATCH, *,
            default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its resume class in the field's metadata."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_ON_RESUME: resume})


def on_resume(field: dataclasses.Field) -> OnResume:
    return field.metadata.get(_ON_RESUME, OnResume.MATCH)


# ----------------------------------------------------------------------------------------------------------
# Choices of the training loop.


class OptimizerKind(enum.Enum):
    """The optimizer; no weight decay unless configured (docs/method.md §5)."""

    RADAM = "radam"
    ADAM = "adam"


class LRDecay(enum.Enum):
    """The learning rate after warm-up: constant (the paper), or decayed to 0 at the last step (schedule.lr_at).

    A decay to zero helps a short run most (the final steps average out the gradient noise, as an EMA does);
    the paper's runs are long and keep it constant.
    """

    CONSTANT = "constant"
    COSINE = "cosine"  # lr · ½ (1 + cos(π p)), p the fraction of the post-warm-up steps done
    LINEAR = "linear"  # lr · (1 − p)


class Precision(enum.Enum):
    """Arithmetic of the forward pass: fp32, fp16 autocast with dynamic loss scaling, or bf16 autocast
    (train.AUTOCAST_DTYPES, train.loss_scaler)."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


# ----------------------------------------------------------------------------------------------------------
# Sections every training task shares.


def check(condition: bool, key: str, message: str) -> None:
    """Raise ConfigError("<key>: <message>") unless `condition` holds: the range checks of every section."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Where the run writes and how often."""

    dir: str = setting("runs/default", OnResume.FREE)       # Run folder (local path, gs:// or az://): config, snapshots, training states, logs.
    snapshot_every: int = setting(10_000, OnResume.FREE)    # Steps between snapshots (student and EMA weights, for FID); 0 never.
    keep_snapshots: int = setting(0, OnResume.FREE)         # Newest snapshots kept (0: all, for FID against the step).
    checkpoint_every: int = setting(10_000, OnResume.FREE)  # Steps between training states (resume); the last step always writes one.
    keep_checkpoints: int = setting(2, OnResume.FREE)       # Newest training states kept (0: all); older ones go once a new one is complete.
    log_every: int = setting(100, OnResume.FREE)            # Steps between log records (metrics.jsonl, the progress line).
    image_every: int = setting(10_000, OnResume.FREE)       # Steps between one-step sample grids (samples-<step>.png); 0 never.
    image_count: int = setting(64, OnResume.FREE)           # Images in a sample grid (fixed noise, seeded by train.seed).
    sync_check_every: int = setting(1000, OnResume.FREE)    # Steps between checks that all ranks hold identical weights; 0 never.
    timeout_minutes: float = setting(10.0, OnResume.FREE)   # A collective waiting longer than this fails the job (a rank died).
    tensorboard: bool = setting(False, OnResume.FREE)       # Also write TensorBoard event files to the run folder (pip install tensorboard).
    preempt_signals: tuple[str, ...] = setting(preemption.STOP_SIGNALS, OnResume.FREE)  # Signals that stop the run after the step in flight, with a training state and exit status 75.

    def __post_init__(self):
        check(bool(self.dir), "run.dir", "must name a folder")
        for key in ("checkpoint_every", "log_every", "image_count"):
            check(getattr(self, key) >= 1, f"run.{key}", f"must be ≥ 1, got {getattr(self, key)}")
        for key in ("snapshot_every", "keep_snapshots", "keep_checkpoints", "image_every", "sync_check_every"):
            check(getattr(self, key) >= 0, f"run.{key}", f"must be ≥ 0, got {getattr(self, key)}")
        check(self.timeout_minutes > 0, "run.timeout_minutes", f"must be > 0, got {self.timeout_minutes}")
        bad = preemption.check_signal_names(self.preempt_signals)
        check(not bad, "run.preempt_signals", f"{', '.join(bad)} cannot be caught here: name catchable signals "
              f"such as SIGTERM,SIGINT,SIGUSR1, or none (--run.preempt_signals=) to leave signals alone")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The optimisation: steps, batch, precision, optimizer, EMA."""

    seed: int = 0                                  # Step s draws its batch from a hash of (seed, s); seeds the RNGs.
    steps: int = setting(800_000, OnResume.FREE)   # Optimizer steps; the run stops after this many.
    batch: int = 512                               # Global batch: samples per step over all ranks.
    micro_batch: int | None = setting(None, OnResume.NUMERICS)  # Samples per forward pass and rank; None: the rank's whole share.
    precision: Precision = Precision.FP32          # fp32, fp16 (dynamic loss scaling) or bf16 autocast.
    optimizer: OptimizerKind = OptimizerKind.RADAM  # radam or adam.
    lr: float = 2e-4                               # Learning rate after warm-up (peak, with a decay).
    betas: tuple[float, float] = (0.9, 0.999)      # Adam β1, β2.
    eps: float = 1e-8                              # Adam ε.
    weight_decay: float = 0.0                      # The optimizer's L2 weight decay (the paper uses none).
    warmup_steps: int = 0                          # Linear learning-rate warm-up from 0 over this many steps.
    lr_decay: LRDecay = LRDecay.CONSTANT           # After warm-up: constant, or cosine / linear decay to 0 at `steps`.
    lr_decay_steps: int | None = setting(None, OnResume.SCHEDULE)  # Horizon of the decay; None: `steps` (later steps keep its final lr).
    grad_clip: float | None = None                 # Clip the global gradient norm to this value; None: no clipping.
    ema_rates: tuple[float, ...] = (0.999, 0.9999, 0.99995)  # EMA decay rates, kept side by side.
    phema_stds: tuple[float, ...] = ()             # Power-function EMAs at these relative stds, for post-hoc EMA (pid-phema); EDM2 keeps 0.050,0.100.
    activation_checkpointing: bool = setting(False, OnResume.NUMERICS)  # Recompute U-Net blocks (and LPIPS' VGG stages) in the backward pass.
    channels_last: bool = setting(False, OnResume.NUMERICS)  # Channels-last memory format for the student and the teacher.
    compile: bool = setting(False, OnResume.NUMERICS)  # torch.compile the model in place (state_dict keys unchanged).

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
        check(self.lr_decay_steps is None or (self.lr_decay is not LRDecay.CONSTANT
                                               and self.lr_decay_steps > self.warmup_steps), "train.lr_decay_steps",
              f"applies to a decay (lr_decay is {self.lr_decay.value}) and must exceed warmup_steps = "
              f"{self.warmup_steps}, got {self.lr_decay_steps}")
        check(self.grad_clip is None or self.grad_clip > 0, "train.grad_clip",
               f"must be > 0 (or none to disable clipping), got {self.grad_clip}")
        check(all(0 < r < 1 for r in self.ema_rates), "train.ema_rates", f"need 0 < rate < 1, got {self.ema_rates}")
        check(len(set(self.ema_rates)) == len(self.ema_rates), "train.ema_rates",
               f"rates must be distinct, got {self.ema_rates}")
        check(all(0 < s < phema.MAX_STD for s in self.phema_stds) and len(set(self.phema_stds)) == len(self.phema_stds),
              "train.phema_stds", f"need distinct relative stds in (0, {phema.MAX_STD:.4f}), got {self.phema_stds}")


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """What the training loop reads; a task's configuration extends it with its own sections."""

    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------------------------------------
# The boundary: dictionaries and strings in, typed and validated dataclasses out.


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-able dictionary of a configuration (enums as their values, tuples as lists)."""
    return plain(config, "config")


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
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:  # A missing required field, or the checks of an object it builds.
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
        try:
            return parse_enum(tp, value, key)
        except ValueError as error:
            raise ConfigError(str(error)) from None
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


def leaf_fields(cls: type, prefix: str = "") -> Iterator[tuple[str, type, dataclasses.Field]]:
    """(dotted name, section class, field) of every field of a configuration class, sections expanded."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            yield from leaf_fields(hints[field.name], f"{prefix}{field.name}.")
        else:
            yield prefix + field.name, cls, field


def leaf_keys(cls: type, prefix: str = "") -> Iterator[str]:
    """Dotted names of every field of a configuration class, sections expanded."""
    return (key for key, _, _ in leaf_fields(cls, prefix))


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
    leaves = list(leaf_keys(cls))
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
    flat_a, flat_b = flatten(to_dict(a)), flatten(to_dict(b))
    return sorted(key for key in flat_a.keys() | flat_b.keys() if flat_a.get(key) != flat_b.get(key))


def resume_classes(cls: type) -> dict[str, OnResume]:
    """The resume class of every dotted key of a configuration class (`OnResume`, declared per field)."""
    return {key: on_resume(field) for key, _, field in leaf_fields(cls)}


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat
