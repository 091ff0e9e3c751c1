"""The official PID code's files (github pantheon5100/pid_diffusion): its released students and its run folders,
read, sampled and scored as this project's own (docs/evaluation.md, "Evaluating the official PID release").

A *student file* of the official code is a flat state dict of the student's raw EDM network (EDM's key names,
with or without the `model.` prefix, no `map_augment`): the released `pid_cifar.pt`, and in a run folder
(`OPENAI_LOGDIR`) `model%06d.pt` (the trained weights) and `ema_<rate>_%06d.pt` (one per EMA rate) of each
saved step; `opt%06d.pt` (the optimizer), `progress.csv` and `log.txt` are not networks. The file does not
record its architecture, so an `EDM_PRESETS` name gives it; the student's parametrization is this project's
(`PIDStudent`, σ ∈ [ε, T] of the paper), so its one-step samples are the official `sample_oneshot`'s.

Files are told apart by content: a flat dict of tensors is a student file; a snapshot or training state of
this project records its own architecture (`checkpoint.load_network`); anything else is refused by name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from pid_diffusion.user_error import FileFormatError, OptionError
from pid_diffusion import evaluation, samplers
from pid_diffusion.training import checkpoint
from pid_diffusion.grid import SIGMA_MAX, SIGMA_MIN
from pid_diffusion.inception import Detector
from pid_diffusion.networks.edm import EDM_PRESETS, EDMPrecond
from pid_diffusion.student import AUGMENT_MAPPING, PIDStudent, StudentInit
from pid_diffusion.teacher import check_state_dict
from pid_diffusion.utils import fileio

__all__ = ["MODEL_PREFIX", "is_student_file", "load_network", "load_student", "load_student_weights",
           "run_files", "student_weights", "weights_of", "evaluate_file", "evaluate_run"]

MODEL_PREFIX = "model."  # The official trainer saves the wrapper's state dict; its evaluation strips this.
_MODEL_FILE = re.compile(r"^model(\d+)\.pt$")
_EMA_FILE = re.compile(r"^ema_(0?\.\d+)_(\d+)\.pt$")  # The official trainer writes rates as 0.9999.
_SNAPSHOT_KEYS = {"model_spec", "model", "ema"}  # What checkpoint.load_network reads.
_OPTIMIZER_KEYS = {"state", "param_groups"}  # torch.optim's state_dict: the official opt%06d.pt.


# ----------------------------------------------------------------------------------------------------------
# Reading a file: a student state dict, told apart by content.


def _peek(path: str) -> Any:
    """The file's content, memory-mapped where it is local (telling it apart reads no weights)."""
    try:
        return torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except (OSError, RuntimeError):  # A blob URL, or not torch.save's zip format: read it whole.
        return fileio.torch_load(path)


def _is_flat_state_dict(data: Any) -> bool:
    return isinstance(data, dict) and bool(data) and all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in data.items())


def _describe(data: Any, path: str) -> str:
    """Why `data` is neither kind of network file, naming what it is where it can tell."""
    if isinstance(data, dict) and _OPTIMIZER_KEYS <= data.keys():
        return (f"{path} is an optimizer state (an official run's opt<step>.pt), not a network: its weights are "
                "model<step>.pt and ema_<rate>_<step>.pt")
    found = sorted(map(str, data))[:10] if isinstance(data, dict) else type(data).__name__
    return (f"{path} is neither a snapshot or training state of this project (model_spec, model, ema) nor a "
            f"student state dict of the official PID code (named tensors); found {found} (a teacher file is read "
            "with --teacher)")


def is_student_file(path: str) -> bool:
    """Whether `path` holds an official student (a flat state dict of tensors). False for anything else,
    including a file that does not load: the reader of this project's files reports those."""
    try:
        return _is_flat_state_dict(_peek(path))
    except Exception:  # torch.load raises many kinds (zip, unpickling, EOF, OS errors).
        return False


def student_weights(state_dict: Mapping[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """The raw network's weights under EDM's names: the `model.` prefix removed where every key has it."""
    prefixed = [key.startswith(MODEL_PREFIX) for key in state_dict]
    if any(prefixed) and not all(prefixed):
        raise FileFormatError(f"{path}: some keys start with {MODEL_PREFIX!r} and some do not; a student file has "
                         "one spelling")
    return {key[len(MODEL_PREFIX):]: value for key, value in state_dict.items()} if all(prefixed) \
        else dict(state_dict)


def _check_fits(weights: Mapping[str, torch.Tensor], network: nn.Module, path: str, architecture: str) -> None:
    """One error listing every missing, unexpected and mis-shaped key (`teacher.check_state_dict`)."""
    expected = {key: value.shape for key, value in network.state_dict().items()}
    hint = ""
    if any(key.startswith(AUGMENT_MAPPING) for key in weights):
        hint = (f" ({AUGMENT_MAPPING}* is a teacher's augmentation layer, which a student does not have: "
                "a teacher's state dict is read with --teacher)")
    try:
        check_state_dict(weights, expected, path, network=architecture)
    except ValueError as error:
        raise FileFormatError(f"{error}{hint}") from None


def _preset_student(preset: str) -> PIDStudent:
    """The student of an `EDM_PRESETS` architecture as the official code builds it (dropout 0, no
    augmentation input), on the meta device: every tensor then comes from the file."""
    if preset not in EDM_PRESETS:
        raise OptionError(f"unknown preset {preset!r}; choose one of {', '.join(EDM_PRESETS)}")
    with torch.device("meta"):
        teacher = EDMPrecond(**EDM_PRESETS[preset])
        return PIDStudent.from_teacher(teacher, SIGMA_MIN, SIGMA_MAX, init=StudentInit.RANDOM,
                                       network_overrides={"dropout": 0.0})


def load_student(path: str, preset: str, device: torch.device | str = "cpu", data: Any = None) -> PIDStudent:
    """The official student in `path` with the architecture of `preset`, in eval mode, frozen, on `device`."""
    data = _peek(path) if data is None else data
    if not _is_flat_state_dict(data):
        raise FileFormatError(_describe(data, path))
    weights = student_weights(data, path)
    student = _preset_student(preset)
    _check_fits(weights, student.model, path, f"the student of preset {preset}")
    student.model.load_state_dict(weights, strict=True, assign=True)
    return student.to(device).eval().requires_grad_(False)


def load_network(path: str, preset: str | None = None, ema_rate: float | str | None = None,
                 device: torch.device | str = "cpu") -> nn.Module:
    """The network of a model file, told apart by content: a snapshot or training state (its EMA at `ema_rate`,
    or its trained weights; `preset` must be None), or an official student file (`preset` names its
    architecture; the file holds one set of weights, so `ema_rate` must be None)."""
    try:
        data = _peek(path)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch.load raises many kinds (zip, unpickling, EOF, OS errors).
        raise checkpoint.damaged(path, error) from error
    if _is_flat_state_dict(data):
        if preset is None:
            raise FileFormatError(f"{path} is a plain state dict (a student of the official PID code), which does not "
                             f"record its architecture: name it with --preset, one of {', '.join(EDM_PRESETS)}")
        if ema_rate is not None:
            raise FileFormatError(f"{path} holds one network (the official code writes each EMA rate to its own "
                             "ema_<rate>_<step>.pt): drop --ema and pass that file")
        return load_student(path, preset, device, data)
    if not (isinstance(data, dict) and _SNAPSHOT_KEYS <= data.keys()):
        raise FileFormatError(_describe(data, path))
    if preset is not None:
        raise OptionError(f"{path} is a snapshot or training state, which records its own architecture: drop "
                         f"--preset {preset}")
    del data
    return checkpoint.load_network(path, ema_rate=ema_rate, device=device)


def load_student_weights(student: PIDStudent, path: str) -> None:
    """Copy an official student file's weights into `student` (the teacher's architecture): `student.init=file`,
    which continues an official run or fine-tunes the release here."""
    data = fileio.torch_load(path)
    if not _is_flat_state_dict(data):
        raise FileFormatError(f"student.path: {_describe(data, path)}")
    weights = student_weights(data, path)
    _check_fits(weights, student.model, path, "the student of the teacher's architecture")
    student.model.load_state_dict(weights)


# ----------------------------------------------------------------------------------------------------------
# Run folders: model%06d.pt, ema_<rate>_%06d.pt, opt%06d.pt.


def weights_of(path: str) -> tuple[int | None, str]:
    """(step, weights) an official file's name gives: `model<step>.pt` → the trained weights
    (evaluation.NO_EMA), `ema_<rate>_<step>.pt` → the rate as this project's EMA names write it;
    (None, "") for another name (a released file: which weights it holds is not recorded)."""
    name = path.rsplit("/", 1)[-1]
    if match := _MODEL_FILE.match(name):
        return int(match[1]), evaluation.NO_EMA
    if match := _EMA_FILE.match(name):
        return int(match[2]), str(float(match[1]))
    return None, ""


def run_files(folder: str) -> dict[int, dict[str, str]]:
    """Per step, oldest first, the student files of an official run folder: {weights: path} with weights
    evaluation.NO_EMA (model<step>.pt) or an EMA rate (ema_<rate>_<step>.pt); opt<step>.pt and the
    logs are not networks and are left out."""
    steps: dict[int, dict[str, str]] = {}
    if not fileio.exists(folder):
        return steps
    for name in sorted(fileio.listdir(folder)):
        step, weights = weights_of(name)
        if step is not None:
            steps.setdefault(step, {})[weights] = fileio.join(folder, name)
    return dict(sorted(steps.items()))


def _loader(path: str, preset: str, device: torch.device) -> Callable[[], nn.Module]:
    return lambda: load_student(path, preset, device)


def evaluate_file(path: str, preset: str, table: evaluation.ResultsTable, seed_ranges: dict[str, list[int]],
                  detector: Detector, reference: tuple[np.ndarray, np.ndarray], reference_name: str, *,
                  sampler: samplers.Sampler, batch_size: int,
                  on_result: Callable[[evaluation.Result], None] = lambda result: None,
                  fd_dinov2: evaluation.FDDINOv2 | None = None) -> None:
    """Every missing seed range of one official student file; its row's step and weights come from its name
    (`weights_of`); `fd_dinov2`: FD_DINOv2 as well."""
    name = path.rsplit("/", 1)[-1]
    step, weights = weights_of(name)
    evaluation.evaluate_weights(table, {weights: (name, _loader(path, preset, detector.device))}, name, step, None,
                                sampler, seed_ranges, detector, reference, reference_name, batch_size=batch_size,
                                on_result=on_result, fd_dinov2=fd_dinov2)


def evaluate_run(run_dir: str, preset: str, table: evaluation.ResultsTable, seed_ranges: dict[str, list[int]],
                 detector: Detector, reference: tuple[np.ndarray, np.ndarray], reference_name: str, *,
                 weights: Sequence[str] | None, sampler: samplers.Sampler, batch_size: int,
                 on_result: Callable[[evaluation.Result], None] = lambda result: None,
                 fd_dinov2: evaluation.FDDINOv2 | None = None) -> None:
    """`evaluate_file` on every student file of an official run folder, oldest step first, the rows as for a
    run of this project: one per (file, seed range), `weights` (EMA names and/or NO_EMA; None: all
    a step has) restricting them; a requested rate a step lacks gets a row with the error."""
    for step, files in run_files(run_dir).items():
        loaders = {rate: (path.rsplit("/", 1)[-1], _loader(path, preset, detector.device))
                   for rate, path in files.items()}
        fallback = next(iter(loaders.values()))[0]
        evaluation.evaluate_weights(table, loaders, fallback, step, weights, sampler, seed_ranges, detector,
                                    reference, reference_name, batch_size=batch_size, on_result=on_result,
                                    fd_dinov2=fd_dinov2)
