"""The frozen teacher D_φ(x; σ): reading its file in any accepted format, converting, loading.

Two families, told apart by the network class the file records: EDM's `EDMPrecond` (Karras et al. 2022) and
EDM2's `Precond` (Karras et al. 2024; `networks/edm2.py`), whose files also describe the latent encoder the
network was trained with (`TeacherFile.encoder`; `encoders.py`).

Accepted formats (`TeacherFormat`), told apart by content, not by file name:
- EDM's or EDM2's own `.pkl` (a release file or a network snapshot), read by `edm_pickle` without running code;
- this project's teacher file written by `convert_edm` (`torch.load(weights_only=True)`-readable);
- a plain state dict as the official PID code distributes its extracted teachers, plus an `EDM_PRESETS` name.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import itertools
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from pid_diffusion.user_error import MissingFileError
from pid_diffusion.user_error import UserError
from pid_diffusion.utils import fileio
from pid_diffusion.utils.values import plain
from pid_diffusion import encoders
from pid_diffusion.networks import check_dropout, edm, edm2
from pid_diffusion.edm_pickle import EDMPickleError, PickledModule, load_edm_pickle, state_dict_of
from pid_diffusion.networks.edm import EDMPrecond

__all__ = [
    "EDM_RELEASE_URL", "TeacherFormat", "TeacherFile", "TeacherFileError",
    "read_teacher_file", "check_state_dict", "convert_edm", "load_teacher", "network_hash", "require_teacher_file",
]

logger = logging.getLogger(__name__)

EDM_RELEASE_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"
TEACHER_CLASS = "EDMPrecond"  # EDM's denoiser wrapper; its VP/VE/iDDPM baselines are other classes.
# The denoisers PID distils, by the class name their files record (EDM's and EDM2's persistence, converted files).
NETWORK_CLASSES: dict[str, type[torch.nn.Module]] = {TEACHER_CLASS: EDMPrecond, "Precond": edm2.Precond}
FORMAT_TAG = "pid-diffusion/edm-teacher"
FORMAT_VERSION = 1

_MODEL_PREFIX = "model."  # EDMPrecond holds the raw network as `model`; it has no parameters of its own.
_AUGMENT_MAPPING_PREFIX = "model.map_augment."
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format.
_MAX_LISTED_KEYS = 20  # Per category in a mismatch report; a wrong architecture would list hundreds.


class TeacherFileError(UserError, ValueError):
    """A teacher file that cannot be read or does not fit the network it describes."""


class TeacherFormat(enum.Enum):
    """The teacher file layouts `read_teacher_file` accepts."""
    EDM_PICKLE = "EDM .pkl (release or network snapshot)"
    CONVERTED = "pid-diffusion teacher file"
    STATE_DICT = "plain state dict (official PID release) with a preset"


@dataclasses.dataclass(frozen=True)
class TeacherFile:
    """What rebuilds the teacher: `NETWORK_CLASSES[class_name](**network_kwargs)` loads `state_dict` (the
    family's key names) strictly; `encoder` describes the latent encoder (`encoders.describe`; None: EDM's
    pixels in [−1, 1])."""
    network_kwargs: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    source_format: TeacherFormat
    class_name: str = TEACHER_CLASS
    encoder: dict[str, Any] | None = None

    def to_file_dict(self, source: str) -> dict[str, Any]:
        """The payload `convert_edm` writes: plain types and tensors only, so weights_only loading reads it."""
        return dict(format=FORMAT_TAG, format_version=FORMAT_VERSION, class_name=self.class_name,
                    network_kwargs=self.network_kwargs, state_dict=self.state_dict, source=source,
                    source_format=self.source_format.name, encoder=self.encoder)


# ----------------------------------------------------------------------------------------------------------
# Reading.

def require_teacher_file(path: str) -> None:
    """A FileNotFoundError naming where EDM's teachers are, unless `path` exists (nothing is read)."""
    if not fileio.exists(path):
        raise MissingFileError(
            f"teacher file {path} not found. EDM's pretrained networks are at {EDM_RELEASE_URL}<name>.pkl "
            f"(<name> one of {', '.join(edm.EDM_PRESETS)}) and EDM2's at {edm2.EDM2_RELEASE_URL}<name>.pkl; "
            "download one and pass the .pkl directly, or "
            "convert it once with `pid-convert-edm SRC.pkl DST.pt` (see docs/teacher_checkpoints.md); "
            "`pid-fetch-weights` with the run's options does both for a release name")


def _preset_kwargs(preset: str) -> dict[str, Any]:
    try:
        return dict(edm.EDM_PRESETS[preset])
    except KeyError:
        raise TeacherFileError(
            f"unknown preset {preset!r}; choose one of {', '.join(edm.EDM_PRESETS)}") from None


def _plain(value: Any, name: str) -> Any:
    """A recorded constructor argument as plain data (NumPy scalars become numbers), or an error naming it."""
    try:
        return plain(value, name)
    except TypeError as error:
        raise TeacherFileError(f"constructor argument {error}: EDM records only plain data, so the file was "
                                     "modified") from None


def _from_edm_snapshot(data: Any, path: str) -> TeacherFile:
    """The `ema` network of EDM's `dict(ema, loss_fn, augment_pipe, dataset_kwargs)`."""
    if not (isinstance(data, dict) and "ema" in data):
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise TeacherFileError(f"{path}: expected EDM's dict(ema=..., loss_fn=..., ...), found {found}")
    network = data["ema"]
    if not isinstance(network, PickledModule) or network.class_name not in NETWORK_CLASSES:
        name = network.class_name if isinstance(network, PickledModule) else type(network).__name__
        raise TeacherFileError(f"{path}: the ema network is a {name}; PID distils "
                                   f"{' and '.join(NETWORK_CLASSES)} teachers (EDM's and EDM2's)")
    if network.state.get("_init_args"):
        raise TeacherFileError(f"{path}: the network was built with positional arguments; EDM passes "
                                     "keyword arguments only, so the file was modified")
    try:
        state_dict = state_dict_of(network)
    except EDMPickleError as error:
        raise TeacherFileError(f"{path}: {error}") from error
    if network.class_name == TEACHER_CLASS:
        return TeacherFile(_plain(network.init_kwargs, "network_kwargs"), state_dict,
                           TeacherFormat.EDM_PICKLE)
    try:
        encoder = encoders.describe(data.get("encoder"))
    except ValueError as error:
        raise TeacherFileError(f"{path}: {error}") from error
    state_dict = {key: value.float() if value.is_floating_point() else value for key, value in state_dict.items()}
    return TeacherFile(_plain(network.init_kwargs, "network_kwargs"), state_dict, TeacherFormat.EDM_PICKLE,
                       class_name=network.class_name, encoder=encoder)


def _from_official_pid(state_dict: dict[str, torch.Tensor], preset: str, path: str) -> TeacherFile:
    """PID's extracted teachers: keys without `model.` and without `map_augment`, which is restored as zeros.

    PID never passes augment labels, and EDMPrecond skips `map_augment` without them, so zeros change no
    output; they are only needed for strict loading.
    """
    kwargs = _preset_kwargs(preset)
    prefixed = [key.startswith(_MODEL_PREFIX) for key in state_dict]
    if any(prefixed) and not all(prefixed):
        raise TeacherFileError(f"{path}: some keys start with {_MODEL_PREFIX!r} and some do not")
    state_dict = state_dict if all(prefixed) else {_MODEL_PREFIX + key: value for key, value in state_dict.items()}
    filled = {key: torch.zeros(shape) for key, shape in _expected_shapes(kwargs, path).items()
              if key.startswith(_AUGMENT_MAPPING_PREFIX) and key not in state_dict}
    if filled:
        logger.info("%s: filled %s with zeros (PID passes no augment labels, so map_augment is unused)",
                    path, ", ".join(filled))
    return TeacherFile(kwargs, {**state_dict, **filled}, TeacherFormat.STATE_DICT)


def _is_state_dict(data: Any) -> bool:
    return isinstance(data, dict) and bool(data) and all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in data.items())


def _from_torch_file(data: Any, path: str, preset: str | None) -> TeacherFile:
    if isinstance(data, dict) and {"network_kwargs", "state_dict"} <= data.keys():
        if preset is not None:
            raise TeacherFileError(f"{path} records its own network_kwargs; drop the preset {preset!r}")
        if not _is_state_dict(data["state_dict"]):
            raise TeacherFileError(f"{path}: state_dict is not a dict of named tensors")
        class_name = data.get("class_name", TEACHER_CLASS)
        if class_name not in NETWORK_CLASSES:
            raise TeacherFileError(f"{path}: network class {class_name!r} is not one of {list(NETWORK_CLASSES)}")
        try:
            encoder = encoders.check_description(data.get("encoder"))
        except ValueError as error:
            raise TeacherFileError(f"{path}: {error}") from error
        return TeacherFile(_plain(data["network_kwargs"], "network_kwargs"), dict(data["state_dict"]),
                           TeacherFormat.CONVERTED, class_name=class_name, encoder=encoder)
    if _is_state_dict(data):
        if preset is None:
            raise TeacherFileError(
                f"{path} is a plain state dict, which does not record its architecture; name it with a preset "
                f"(--preset / preset=), one of {', '.join(edm.EDM_PRESETS)}")
        return _from_official_pid(data, preset, path)
    found = sorted(map(str, data))[:_MAX_LISTED_KEYS] if isinstance(data, dict) else type(data).__name__
    raise TeacherFileError(f"{path}: neither a teacher file (network_kwargs, state_dict) nor a plain "
                                 f"state dict of tensors; found {found}")


def _torch_load(file: Any, path: str) -> Any:
    try:
        return torch.load(file, weights_only=True, map_location="cpu")
    except Exception as error:  # weights_only refusals and corrupt archives; name the file, keep the cause.
        first = str(error).split(". ")[0]  # torch's advice about corrupted files follows; the cause stays chained
        raise TeacherFileError(f"{path}: torch.load(weights_only=True) failed: {first}; is the file complete "
                               f"(compare its size with the original's)?") from error


def read_teacher_file(path: str | os.PathLike, preset: str | None = None) -> TeacherFile:
    """Read a teacher file in any `TeacherFormat` from a local path or blob URL; runs no stored code.

    `preset` (an `EDM_PRESETS` name) is required for, and only accepted with, a plain state dict.
    """
    path = str(path)
    require_teacher_file(path)
    with fileio.open_read(path) as file:
        is_zip = file.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
        file.seek(0)
        if is_zip:
            return _from_torch_file(_torch_load(file, path), path, preset)
        try:
            data = load_edm_pickle(file)
        except EDMPickleError as error:
            raise TeacherFileError(f"{path}: {error}") from error
        if isinstance(data, int) and data == torch.serialization.MAGIC_NUMBER:  # torch.save's legacy format.
            file.seek(0)
            return _from_torch_file(_torch_load(file, path), path, preset)
    if preset is not None:
        raise TeacherFileError(f"{path} is an EDM pickle, which records its own network_kwargs; drop the "
                                     f"preset {preset!r}")
    return _from_edm_snapshot(data, path)


# ----------------------------------------------------------------------------------------------------------
# Checking against the architecture.

def _build(network_kwargs: Mapping[str, Any], device: torch.device | str, path: str,
           class_name: str = TEACHER_CLASS) -> torch.nn.Module:
    try:
        with torch.device(device):
            return NETWORK_CLASSES[class_name](**network_kwargs)
    except (TypeError, ValueError) as error:
        raise TeacherFileError(f"{path}: {class_name} rejects the recorded network_kwargs "
                                     f"{dict(network_kwargs)}: {error}") from error


def _shapes(network: torch.nn.Module) -> dict[str, torch.Size]:
    return {key: value.shape for key, value in network.state_dict().items()}


def _expected_shapes(network_kwargs: Mapping[str, Any], path: str, class_name: str = TEACHER_CLASS
                     ) -> dict[str, torch.Size]:
    """state_dict shapes of the network, built on the meta device (no memory, no init)."""
    return _shapes(_build(network_kwargs, "meta", path, class_name))


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    return shown + (f", ... ({len(keys) - _MAX_LISTED_KEYS} more)" if len(keys) > _MAX_LISTED_KEYS else "")


def check_state_dict(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], path: str,
                     network: str = "EDMPrecond(**network_kwargs)") -> None:
    """Raise one error listing every missing, unexpected and mis-shaped key, instead of torch's first failure."""
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    misshaped = [f"{key} {list(state_dict[key].shape)} (network {list(shape)})" for key, shape in expected.items()
                 if key in state_dict and state_dict[key].shape != shape]
    if missing or unexpected or misshaped:
        problems = [f"{label} ({len(keys)}): {_listed(keys)}" for label, keys in
                    (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
        raise TeacherFileError(f"{path} does not fit {network}: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------------------
# Public entry points.

def convert_edm(src: str | os.PathLike, dst: str | os.PathLike, preset: str | None = None) -> TeacherFile:
    """Convert an EDM `.pkl` (or a PID state dict + `preset`) into a teacher file at `dst`, atomically.

    The result is checked against the architecture it records before anything is written.
    """
    src, dst = str(src), str(dst)
    teacher = read_teacher_file(src, preset)
    check_state_dict(teacher.state_dict, _expected_shapes(teacher.network_kwargs, src, teacher.class_name), src,
                     f"{teacher.class_name}(**network_kwargs)")
    fileio.atomic_torch_save(teacher.to_file_dict(source=src), dst)
    return teacher


def load_teacher(path: str | os.PathLike, preset: str | None = None, dropout: float = 0.0,
                 device: torch.device | str = "cpu") -> torch.nn.Module:
    """The frozen teacher D_φ (an `EDMPrecond` or EDM2's `Precond`): eval mode, no gradients, built with
    `dropout` (PID runs it at 0) on `device`; `.encoder` holds its encoder's description (None for EDM's).

    `path`: a converted teacher file, an EDM or EDM2 `.pkl`, or a plain state dict with `preset`; local or blob URL.
    """
    check_dropout(dropout)  # The network's own check, before a bad argument could be blamed on the file.
    path = str(path)
    file = read_teacher_file(path, preset)
    # Dropout is a constructor argument that EDM copies into every block, so override it before building.
    # Built on the meta device: every tensor then comes from the file, with no random initialisation.
    network = _build({**file.network_kwargs, "dropout": dropout}, "meta", path, file.class_name)
    check_state_dict(file.state_dict, _shapes(network), path, f"{file.class_name}(**network_kwargs)")
    network.load_state_dict(file.state_dict, strict=True, assign=True)
    unfilled = [name for name, tensor in itertools.chain(network.named_parameters(), network.named_buffers())
                if tensor.is_meta]
    if unfilled:  # State outside the state_dict (non-persistent buffers) would need the initialisation skipped.
        raise RuntimeError(f"{file.class_name} holds tensors its state_dict does not save "
                           f"({', '.join(unfilled)}); load_teacher cannot fill them from a teacher file")
    network.encoder = file.encoder
    return network.to(device).eval().requires_grad_(False)


def network_hash(model: torch.nn.Module) -> str:
    """SHA-256 of a network's class, constructor arguments and every tensor of its state_dict (names, dtypes,
    shapes, values): equal for an EDM .pkl and the .pt converted from it, different for any other weights."""
    digest = hashlib.sha256()
    spec = {"class": type(model).__name__, "kwargs": getattr(model, "init_kwargs", None)}
    digest.update(json.dumps(spec, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        # Memory format is not content. `.contiguous()` is not enough: a channels-last [O, I, 1, 1] weight counts
        # as contiguous yet keeps strides (I, 1, I, I), which a byte view refuses; flattening gives stride 1.
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
