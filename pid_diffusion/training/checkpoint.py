"""Snapshots and training states: the file formats, finding them, writing, pruning, reading, and rebuilding a
model for inference.

Two kinds of file live in a run folder, as in EDM: a *snapshot* `snapshot-<step:08d>.pt` holds what FID and
sampling need, every `run.snapshot_every` steps and all kept by default (FID against the step); a *training
state* `checkpoint-<step:08d>.pt` holds everything resume needs, every `run.checkpoint_every` steps, the
newest `run.keep_checkpoints` kept. Each is one `torch.save`d dictionary written to a temporary name and
renamed (fileio), so a file with its name is always complete:

    step          optimizer steps done                                      snapshot  training state
    config        the resolved configuration (config.to_dict)                  ✓           ✓
    model_spec    {"class": "PIDStudent" | "EDMPrecond", "kwargs": ...}         ✓           ✓
    model         model state_dict                                             ✓           ✓
    ema           {"0.999": state_dict, ...}, one per EMA rate                 ✓           ✓
                  and {"std-0.050": ...} per power-function EMA (phema.py)
    optimizer     optimizer state_dict                                                     ✓
    scaler        GradScaler state_dict (fp16 loss scaling)                                ✓
    rng           one entry per rank: {"torch", "cuda", "numpy", "python"}                 ✓
    fingerprints  {"teacher.path": sha256, ...}: hashes of the files CONTENT fields name   ✓

Every entry holds only tensors and plain Python values, so it loads with `weights_only=True`. `save` writes the
whole training state (the training loop calls it; resume.py reads it back); `load_network` reads
either kind and needs nothing but the file: sampling and FID need neither the teacher nor the configuration.

A snapshot or training state that does not load (truncated by a disk error or an interrupted copy, corrupt,
a file of another kind under its name) is *damaged*, and every reader treats it alike: one line names the file
and the reason (`skip_note`), the newest one that loads is used instead, and nothing is deleted. The launch
check and `--dry-run` only report (`newest_header`); `resume.resume` moves a damaged training state aside to
`<name>.damaged` (out of pruning's and the next write's way) and falls back to the next older one; pid-fid
records a row with the reason; pid-sample given a run folder samples its newest loadable file.
"""

from __future__ import annotations

import errno
import importlib
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from pid_diffusion.user_error import FileFormatError, OptionError
from pid_diffusion.training import phema
from pid_diffusion.utils import dist, fileio
from pid_diffusion.utils.rng import capture_rng
from pid_diffusion.config import TrainingConfig, to_dict
from pid_diffusion.networks.edm import EDMPrecond
from pid_diffusion.student import PIDStudent

__all__ = [
    "TrainingStateWriteError",
    "DAMAGED_SUFFIX",
    "DamagedCheckpointError",
    "MODEL_CLASSES",
    "NoLoadableTrainingStateError",
    "build_model",
    "damaged",
    "training_state_path",
    "find_training_states",
    "find_snapshots",
    "find_weights",
    "latest_training_state",
    "load_network",
    "model_spec",
    "newest_generator",
    "newest_header",
    "newest_loadable",
    "prune_training_states",
    "read_training_state",
    "read_header",
    "save",
    "save_snapshot",
    "skip_note",
    "snapshot_path",
    "step_of",
    "write_failure",
]

# The classes a snapshot or training state can rebuild, by the name its model_spec records.
MODEL_CLASSES: dict[str, type[nn.Module]] = {cls.__name__: cls for cls in (PIDStudent, EDMPrecond)}

_TRAINING_STATE = re.compile(r"^checkpoint-(\d{8})\.pt$")
_SNAPSHOT = re.compile(r"^snapshot-(\d{8})\.pt$")
_KEYS = ("step", "config", "model_spec", "model", "ema", "optimizer", "scaler", "rng")  # Of a training state.
DAMAGED_SUFFIX = ".damaged"  # A training state that does not load is renamed <name>.damaged[.<n>].


class DamagedCheckpointError(FileFormatError):
    """A snapshot or training state that does not load; the message names the file and the reason."""


class NoLoadableTrainingStateError(DamagedCheckpointError):
    """A run folder has training states, but none of them loads."""


class TrainingStateWriteError(RuntimeError):
    """Writing a snapshot or training state failed (disk full, permissions, the blob store); the earlier ones are
    intact."""


def training_state_path(folder: str, step: int) -> str:
    """The training state of `step` in `folder`."""
    return fileio.join(folder, f"checkpoint-{step:08d}.pt")


def snapshot_path(folder: str, step: int) -> str:
    """The snapshot of `step` in `folder`."""
    return fileio.join(folder, f"snapshot-{step:08d}.pt")


def _find(folder: str, pattern: re.Pattern) -> list[tuple[int, str]]:
    if not fileio.exists(folder):
        return []
    found = []
    for name in fileio.listdir(folder):
        match = pattern.match(name)
        if match:
            found.append((int(match.group(1)), fileio.join(folder, name)))
    return sorted(found)


def step_of(path: str) -> int | None:
    """The step a snapshot's or training state's file name carries, or None for another name."""
    name = path.rsplit("/", 1)[-1]
    match = _TRAINING_STATE.match(name) or _SNAPSHOT.match(name)
    return int(match.group(1)) if match else None


def find_training_states(folder: str) -> list[tuple[int, str]]:
    """Complete training states in `folder` as (step, path), oldest first; temporary files are skipped."""
    return _find(folder, _TRAINING_STATE)


def find_snapshots(folder: str) -> list[tuple[int, str]]:
    """Complete snapshots in `folder` as (step, path), oldest first."""
    return _find(folder, _SNAPSHOT)


def find_weights(folder: str) -> list[tuple[int, str]]:
    """One file per step that has trained weights, oldest first: its snapshot, or its training state where
    no snapshot was written (a folder of an older version, or with run.snapshot_every=0)."""
    by_step = dict(find_training_states(folder))
    by_step.update(find_snapshots(folder))
    return sorted(by_step.items())


def latest_training_state(folder: str) -> tuple[int, str] | None:
    """The newest complete training state in `folder`, or None."""
    found = find_training_states(folder)
    return found[-1] if found else None


def _prune(found: list[tuple[int, str]], keep: int) -> None:
    if keep > 0:
        for _, path in found[:-keep]:
            fileio.remove(path)


def prune_training_states(folder: str, keep: int) -> None:
    """Delete all but the newest `keep` training states (keep = 0 keeps all). Call after a new one is complete."""
    _prune(find_training_states(folder), keep)


def read_header(path: str) -> dict[str, Any]:
    """The small entries of a snapshot or training state (step, config, model_spec, the EMA names), without
    reading its weights where the file is local: a local file is memory-mapped. A missing file raises
    FileNotFoundError; one that does not load, DamagedCheckpointError."""
    if not fileio.exists(path):
        raise FileNotFoundError(f"No such file: {path}")
    try:
        try:
            data = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
        except (OSError, RuntimeError):  # A blob URL, or not torch.save's zip format: read it whole.
            data = fileio.torch_load(path)
        _require_keys(data, ("step", "model_spec", "model", "ema"), "snapshot or training state")
    except Exception as error:  # torch.load raises many kinds (zip, unpickling, EOF, OS errors).
        raise DamagedCheckpointError(f"{path} does not load ({_reason(error)})") from error
    return {"step": data["step"], "config": data.get("config"), "model_spec": data["model_spec"],
            "ema": list(data["ema"]), "fingerprints": data.get("fingerprints", {})}


def _require_keys(data: Any, keys: tuple[str, ...], kind: str) -> None:
    if not isinstance(data, dict):
        raise FileFormatError(f"not a {kind} (a {type(data).__name__}, not a dictionary)")
    missing = [key for key in keys if key not in data]
    if missing:
        raise FileFormatError(f"not a {kind} (no {', '.join(missing)})")


def skip_note(path: str, error: BaseException) -> str:
    """The one line every reader prints for a damaged file it skips: the file and the reason."""
    kind = "snapshot" if _SNAPSHOT.match(path.rsplit("/", 1)[-1]) else "checkpoint"
    reason = error.__cause__ if isinstance(error, DamagedCheckpointError) and error.__cause__ else error
    return f"Skipping damaged {kind} {path} ({_reason(reason)})"


def newest_header(folder: str) -> tuple[tuple[int, str, dict[str, Any]] | None, list[str]]:
    """The newest training state of `folder` whose header loads, as (step, path, header), or None; and one
    `skip_note` line per newer one that does not load. Reads no weights and changes nothing (the launch check)."""
    notes = []
    for step, path in reversed(find_training_states(folder)):
        try:
            return (step, path, read_header(path)), notes
        except DamagedCheckpointError as error:
            notes.append(skip_note(path, error))
    return None, notes


def read_training_state(path: str) -> dict[str, Any]:
    """The training state at `path`; raises (what torch.load raises, or a ValueError) if it does not load."""
    state = fileio.torch_load(path)
    _require_keys(state, _KEYS, "training checkpoint")
    return state


def _move_aside(path: str) -> str:
    """Rename a damaged training state to a free `<path>.damaged[.<n>]` name, out of `find_training_states`' sight."""
    target, count = path + DAMAGED_SUFFIX, 1
    while fileio.exists(target):
        target, count = f"{path}{DAMAGED_SUFFIX}.{count}", count + 1
    fileio.rename(path, target)
    return target


def _reason(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else 'no message'}"


def newest_loadable(folder: str, log=print) -> tuple[str, dict[str, Any]] | None:
    """The newest training state of `folder` that loads, as (path, state); None when there is none.

    Each newer one that does not load is moved aside, with one line through `log` naming the file and the
    reason; when none loads, NoLoadableTrainingStateError names them all. Call it on one process only.
    """
    damaged = []
    for _, path in reversed(find_training_states(folder)):
        try:
            return path, read_training_state(path)
        except Exception as error:  # torch.load raises many kinds (zip, unpickling, EOF, OS errors).
            aside = _move_aside(path)
            log(f"{skip_note(path, error)}; moved to {aside}")
            damaged.append(aside)
    if damaged:
        raise NoLoadableTrainingStateError(
            f"no checkpoint in {folder} loads; the damaged ones were moved aside: {', '.join(damaged)}. "
            f"Restore a good checkpoint into the folder, or start a new run folder")
    return None


def model_spec(model: nn.Module) -> dict[str, Any]:
    """What `build_model` needs to construct `model` again: its class name and constructor arguments."""
    name = type(model).__name__
    if name not in MODEL_CLASSES:
        raise TypeError(f"cannot checkpoint a {name}: add it to checkpoint.MODEL_CLASSES")
    if not hasattr(model, "init_kwargs"):
        raise TypeError(f"{name} has no init_kwargs: store the constructor arguments as self.init_kwargs")
    return {"class": name, "kwargs": model.init_kwargs}


def build_model(spec: dict[str, Any]) -> nn.Module:
    """A freshly initialised model from a `model_spec`."""
    if spec["class"] not in MODEL_CLASSES:
        raise ValueError(f"checkpoint model class {spec['class']!r} is unknown; known: {', '.join(MODEL_CLASSES)}")
    return MODEL_CLASSES[spec["class"]](**spec["kwargs"])


def load_network(path: str, ema_rate: float | str | None = None, device: torch.device | str = "cpu") -> nn.Module:
    """The trained network of a snapshot or training state, whatever it is (a PID student, or the EDM denoiser
    of a teacher-training run): its EMA at `ema_rate`, a power-function EMA or post-hoc reconstruction named
    'std-<σ_rel>', or the raw weights, in eval mode, frozen. A file that does not load raises
    DamagedCheckpointError naming it and the reason."""
    try:
        data = fileio.torch_load(path)
        _require_keys(data, ("model_spec", "model", "ema"), "snapshot or training state")
    except FileNotFoundError:
        raise
    except Exception as error:  # torch.load raises many kinds (zip, unpickling, EOF, OS errors).
        raise damaged(path, error) from error
    model = build_model(data["model_spec"])
    if ema_rate is None:
        state = data["model"]
    else:
        names = {phema.average_key(key): key for key in data["ema"]}
        wanted = phema.average_key(ema_rate)
        if wanted not in names:
            what = f"at rate {ema_rate}" if wanted[0] == "rate" else ema_rate
            raise OptionError(f"{path} has no EMA {what}; it has {', '.join(data['ema']) or 'none'}")
        state = data["ema"][names[wanted]]
    model.load_state_dict(state)
    return model.eval().requires_grad_(False).to(device)


def damaged(path: str, error: BaseException) -> DamagedCheckpointError:
    """The error of a model file that does not load: the file, the reason, and what to pass instead."""
    return DamagedCheckpointError(
        f"{path} does not load ({_reason(error)}): name another snapshot or training state of the run, or the run "
        "folder itself to use its newest loadable one (a teacher file is read with --teacher)")


def newest_generator(folder: str, ema_rate: float | None = None, device: torch.device | str = "cpu",
                     log=print) -> tuple[str, nn.Module]:
    """The newest file of a run folder that loads, as (path, `load_network`'s model): the newest step's snapshot,
    else its training state, else the step before; each damaged one tried is skipped with one `skip_note` line
    through `log` and left in place."""
    # Newest step first; at one step the snapshot (written first, the smaller file), then the training state.
    found = sorted([(step, 1, path) for step, path in find_snapshots(folder)] +
                   [(step, 0, path) for step, path in find_training_states(folder)], reverse=True)
    if not found:
        raise FileNotFoundError(f"no snapshot-<step>.pt or checkpoint-<step>.pt files in {folder}")
    skipped = []
    for _, _, path in found:
        try:
            return path, load_network(path, ema_rate, device)
        except DamagedCheckpointError as error:
            log(skip_note(path, error))
            skipped.append(path)
    raise DamagedCheckpointError(f"no snapshot or training state in {folder} loads ({', '.join(skipped)}); "
                                 "restore a good one into the folder")


# ----------------------------------------------------------------------------------------------------------
# The training state: written and resumed by the training loop.


def save_snapshot(config: TrainingConfig, step: int, model: nn.Module, ema) -> str | None:
    """Write snapshot `step` (rank 0): the trained weights and every EMA, for FID and sampling; prunes to
    `run.keep_snapshots`. Returns its path on rank 0."""
    if dist.rank() != 0:
        return None
    path = snapshot_path(config.run.dir, step)
    _write(config.run.dir, {"step": step, "config": to_dict(config), "model_spec": model_spec(model),
                            "model": model.state_dict(), "ema": ema.state_dict()}, path, "snapshot")
    _prune(find_snapshots(config.run.dir), config.run.keep_snapshots)
    return path


def save(config: TrainingConfig, step: int, model: nn.Module, ema, optimizer: torch.optim.Optimizer,
         scaler: torch.amp.GradScaler, fingerprints: Mapping[str, str] | None = None) -> str:
    """Write training state `step` (rank 0, with every rank's RNG state), prune old ones; returns its path.
    Call on every rank: the RNG states are gathered."""
    states = [None] * dist.world_size() if dist.rank() == 0 else None
    torch_dist.gather_object(capture_rng(), states, dst=0)
    path = training_state_path(config.run.dir, step)
    if dist.rank() == 0:
        _write(config.run.dir, {
            "step": step,
            "config": to_dict(config),
            "model_spec": model_spec(model),
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": states,
            "fingerprints": dict(fingerprints or {}),
        }, path, "checkpoint")
        prune_training_states(config.run.dir, config.run.keep_checkpoints)
    dist.barrier()
    return path


def write_failure(folder: str, error: BaseException, what: str) -> TrainingStateWriteError:
    """The error that ends a run whose write of `what` failed: the cause, that nothing half-written is left, the
    newest complete training state, and how to go on."""
    newest = latest_training_state(folder)
    intact = f"the newest complete training state, {newest[1]}, is intact" if newest else \
        "no training state was complete yet"
    full = isinstance(error, OSError) and error.errno == errno.ENOSPC
    fix = ("Free space on that disk, or keep fewer snapshots (run.keep_snapshots) or write them less often "
           "(run.snapshot_every)" if full else "Fix the cause (disk space, permissions, the blob store)")
    return TrainingStateWriteError(f"could not write {what} ({type(error).__name__}: {error}); nothing was left in its "
                                f"place and {intact}. {fix}, then re-run the same command to resume")


def _write(folder: str, state: dict[str, Any], path: str, kind: str) -> None:
    try:
        fileio.atomic_torch_save(state, path)
    except Exception as error:
        raise write_failure(folder, error, f"{kind} {path}") from error
