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
whole training state (the training loop calls it; resume.py reads it back); `load_generator` reads
either kind and needs nothing but the file: sampling and FID need neither the teacher nor the configuration.

A training state that does not load (truncated by a disk error or an interrupted copy, corrupt, not a
training state) is *damaged*: `newest_loadable` moves it aside to `<name>.damaged` (never deletes it) and
`resume.resume` falls back to the next older one.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from pid_diffusion import phema
from pid_diffusion.utils import dist, fileio
from pid_diffusion.utils.rng import capture_rng
from pid_diffusion.config import TrainingConfig, to_dict

__all__ = [
    "CheckpointWriteError",
    "DAMAGED_SUFFIX",
    "MODEL_CLASSES",
    "NoLoadableCheckpointError",
    "build_model",
    "checkpoint_path",
    "find_checkpoints",
    "find_snapshots",
    "find_weights",
    "latest_checkpoint",
    "load_generator",
    "model_spec",
    "newest_loadable",
    "prune_checkpoints",
    "read_checkpoint",
    "read_header",
    "save",
    "save_snapshot",
    "snapshot_path",
    "step_of",
]

# Classes a checkpoint can rebuild, as "module:attribute", imported only when needed (no import cycles).
MODEL_CLASSES: dict[str, str] = {
    "PIDStudent": "pid_diffusion.student:PIDStudent",
    "EDMPrecond": "pid_diffusion.networks.edm:EDMPrecond",
}

_TRAINING_STATE = re.compile(r"^checkpoint-(\d{8})\.pt$")
_SNAPSHOT = re.compile(r"^snapshot-(\d{8})\.pt$")
_KEYS = ("step", "config", "model_spec", "model", "ema", "optimizer", "scaler", "rng")  # Of a training state.
DAMAGED_SUFFIX = ".damaged"  # A training state that does not load is renamed <name>.damaged[.<n>].


class NoLoadableCheckpointError(RuntimeError):
    """A run folder has training states, but none of them loads."""


class CheckpointWriteError(RuntimeError):
    """Writing a training state failed (disk full, permissions, the blob store); the earlier ones are intact."""


def checkpoint_path(folder: str, step: int) -> str:
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


def find_checkpoints(folder: str) -> list[tuple[int, str]]:
    """Complete training states in `folder` as (step, path), oldest first; temporary files are skipped."""
    return _find(folder, _TRAINING_STATE)


def find_snapshots(folder: str) -> list[tuple[int, str]]:
    """Complete snapshots in `folder` as (step, path), oldest first."""
    return _find(folder, _SNAPSHOT)


def find_weights(folder: str) -> list[tuple[int, str]]:
    """One file per step that has trained weights, oldest first: its snapshot, or its training state where
    no snapshot was written (a folder of an older version, or with run.snapshot_every=0)."""
    by_step = dict(find_checkpoints(folder))
    by_step.update(find_snapshots(folder))
    return sorted(by_step.items())


def latest_checkpoint(folder: str) -> tuple[int, str] | None:
    """The newest complete training state in `folder`, or None."""
    found = find_checkpoints(folder)
    return found[-1] if found else None


def _prune(found: list[tuple[int, str]], keep: int) -> None:
    if keep > 0:
        for _, path in found[:-keep]:
            fileio.remove(path)


def prune_checkpoints(folder: str, keep: int) -> None:
    """Delete all but the newest `keep` training states (keep = 0 keeps all). Call after a new one is complete."""
    _prune(find_checkpoints(folder), keep)


def read_header(path: str) -> dict[str, Any]:
    """The small entries of a snapshot or training state (step, config, model_spec, the EMA names), without
    reading its weights where the file is local: a local file is memory-mapped."""
    try:
        data = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except (OSError, RuntimeError):  # A blob URL, or not torch.save's zip format: read it whole.
        data = fileio.torch_load(path)
    return {"step": data["step"], "config": data.get("config"), "model_spec": data["model_spec"],
            "ema": list(data["ema"]), "fingerprints": data.get("fingerprints", {})}
def read_checkpoint(path: str) -> dict[str, Any]:
    """The training checkpoint at `path`; raises (what torch.load raises, or a ValueError) if it does not load."""
    state = fileio.torch_load(path)
    if not isinstance(state, dict):
        raise ValueError(f"not a training checkpoint (a {type(state).__name__}, not a dictionary)")
    missing = [key for key in _KEYS if key not in state]
    if missing:
        raise ValueError(f"not a training checkpoint (no {', '.join(missing)})")
    return state


def _move_aside(path: str) -> str:
    """Rename a damaged checkpoint to a free `<path>.damaged[.<n>]` name, out of `find_checkpoints`' sight."""
    target, count = path + DAMAGED_SUFFIX, 1
    while fileio.exists(target):
        target, count = f"{path}{DAMAGED_SUFFIX}.{count}", count + 1
    fileio.rename(path, target)
    return target


def _reason(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else 'no message'}"


def newest_loadable(folder: str, log=print) -> tuple[str, dict[str, Any]] | None:
    """The newest checkpoint of `folder` that loads, as (path, state); None when there is no checkpoint.

    Each newer one that does not load is moved aside, with one line through `log` naming the file and the
    reason; when none loads, NoLoadableCheckpointError names them all. Call it on one process only.
    """
    damaged = []
    for _, path in reversed(find_checkpoints(folder)):
        try:
            return path, read_checkpoint(path)
        except Exception as error:  # torch.load raises many kinds (zip, unpickling, EOF, OS errors).
            aside = _move_aside(path)
            log(f"Skipping damaged checkpoint {path} ({_reason(error)}); moved to {aside}")
            damaged.append(aside)
    if damaged:
        raise NoLoadableCheckpointError(
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
    module, attribute = MODEL_CLASSES[spec["class"]].split(":")
    return getattr(importlib.import_module(module), attribute)(**spec["kwargs"])


def load_generator(path: str, ema_rate: float | str | None = None, device: torch.device | str = "cpu") -> nn.Module:
    """The trained model of a snapshot or training state (its EMA at `ema_rate`, a power-function EMA or
    post-hoc reconstruction named 'std-<σ_rel>', or the raw weights), in eval mode, frozen."""
    checkpoint = fileio.torch_load(path)
    if not (isinstance(checkpoint, dict) and {"model_spec", "model", "ema"} <= checkpoint.keys()):
        found = sorted(map(str, checkpoint))[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path} is not a snapshot or training state (model_spec, model, ema), found {found}; a "
                         "teacher file is read with --teacher (pid-sample), a run folder's weights are "
                         "snapshot-<step>.pt and checkpoint-<step>.pt")
    model = build_model(checkpoint["model_spec"])
    if ema_rate is None:
        state = checkpoint["model"]
    else:
        names = {phema.average_key(key): key for key in checkpoint["ema"]}
        wanted = phema.average_key(ema_rate)
        if wanted not in names:
            what = f"at rate {ema_rate}" if wanted[0] == "rate" else ema_rate
            raise ValueError(f"{path} has no EMA {what}; it has {', '.join(checkpoint['ema']) or 'none'}")
        state = checkpoint["ema"][names[wanted]]
    model.load_state_dict(state)
    return model.eval().requires_grad_(False).to(device)


# ----------------------------------------------------------------------------------------------------------
# The training state: written and resumed by the training loop.


def save_snapshot(config: TrainingConfig, step: int, model: nn.Module, ema) -> str | None:
    """Write snapshot `step` (rank 0): the trained weights and every EMA, for FID and sampling; prunes to
    `run.keep_snapshots`. Returns its path on rank 0."""
    if dist.rank() != 0:
        return None
    path = snapshot_path(config.run.dir, step)
    fileio.atomic_torch_save({"step": step, "config": to_dict(config), "model_spec": model_spec(model),
                              "model": model.state_dict(), "ema": ema.state_dict()}, path)
    _prune(find_snapshots(config.run.dir), config.run.keep_snapshots)
    return path


def save(config: TrainingConfig, step: int, model: nn.Module, ema, optimizer: torch.optim.Optimizer,
         scaler: torch.amp.GradScaler, fingerprints: Mapping[str, str] | None = None) -> str:
    """Write training state `step` (rank 0, with every rank's RNG state), prune old ones; returns its path.
    Call on every rank: the RNG states are gathered."""
    states = [None] * dist.world_size() if dist.rank() == 0 else None
    torch_dist.gather_object(capture_rng(), states, dst=0)
    path = checkpoint_path(config.run.dir, step)
    if dist.rank() == 0:
        try:
            fileio.atomic_torch_save({
                "step": step,
                "config": to_dict(config),
                "model_spec": model_spec(model),
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": states,
                "fingerprints": dict(fingerprints or {}),
            }, path)
        except Exception as error:
            earlier = ", ".join(p for _, p in find_checkpoints(config.run.dir)) or "none"
            raise CheckpointWriteError(
                f"could not write checkpoint {path} ({type(error).__name__}: {error}); nothing was left in its "
                f"place and the earlier checkpoints are intact ({earlier}). Fix the cause (disk space, "
                f"permissions, the blob store), then re-run the same command to resume") from error
        prune_checkpoints(config.run.dir, config.run.keep_checkpoints)
    dist.barrier()
    return path
