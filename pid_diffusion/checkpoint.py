"""Training checkpoints: the file format, finding the newest, pruning, and rebuilding a model for inference.

A checkpoint `checkpoint-<step:08d>.pt` in the run folder is one `torch.save`d dictionary, written to a
temporary name and renamed (fileio), so a file with that name is always complete:

    step        optimizer steps done
    config      the resolved configuration (config.to_dict)
    model_spec  {"class": "PIDStudent" | "EDMPrecond", "kwargs": model.init_kwargs}
    model       model state_dict
    ema         {"0.999": state_dict, ...}, one per EMA rate
    optimizer   optimizer state_dict
    scaler      GradScaler state_dict (fp16 loss scaling)
    rng         one entry per rank: {"torch", "cuda", "numpy", "python"} generator states

Every entry holds only tensors and plain Python values, so it loads with `weights_only=True`.

A checkpoint that does not load (truncated by a disk error or an interrupted copy, corrupt, not a training
checkpoint) is *damaged*: `newest_loadable` moves it aside to `<name>.damaged` (never deletes it) and
falls back to the next older one.
`load_generator` needs nothing but the file: sampling and FID need neither the teacher nor the
configuration code.
"""

from __future__ import annotations

import importlib
import random
import re
from typing import Any

import numpy as np
import torch
from torch import nn

from pid_diffusion import fileio

__all__ = [
    "CheckpointWriteError",
    "DAMAGED_SUFFIX",
    "MODEL_CLASSES",
    "NoLoadableCheckpointError",
    "build_model",
    "capture_rng",
    "checkpoint_path",
    "find_checkpoints",
    "latest_checkpoint",
    "load_generator",
    "model_spec",
    "newest_loadable",
    "prune_checkpoints",
    "read_checkpoint",
    "restore_rng",
]

# Classes a checkpoint can rebuild, as "module:attribute", imported only when needed (no import cycles).
MODEL_CLASSES: dict[str, str] = {
    "PIDStudent": "pid_diffusion.student:PIDStudent",
    "EDMPrecond": "pid_diffusion.networks:EDMPrecond",
}

_NAME = re.compile(r"^checkpoint-(\d{8})\.pt$")
_KEYS = ("step", "config", "model_spec", "model", "ema", "optimizer", "scaler", "rng")
DAMAGED_SUFFIX = ".damaged"  # A checkpoint that does not load is renamed <name>.damaged[.<n>].


class NoLoadableCheckpointError(RuntimeError):
    """A run folder has checkpoints, but none of them loads."""


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (disk full, permissions, the blob store); the earlier ones are intact."""


def checkpoint_path(folder: str, step: int) -> str:
    return fileio.join(folder, f"checkpoint-{step:08d}.pt")


def find_checkpoints(folder: str) -> list[tuple[int, str]]:
    """Complete checkpoints in `folder` as (step, path), oldest first; temporary files are skipped."""
    if not fileio.exists(folder):
        return []
    found = []
    for name in fileio.listdir(folder):
        match = _NAME.match(name)
        if match:
            found.append((int(match.group(1)), fileio.join(folder, name)))
    return sorted(found)


def latest_checkpoint(folder: str) -> tuple[int, str] | None:
    """The newest complete checkpoint in `folder`, or None."""
    found = find_checkpoints(folder)
    return found[-1] if found else None


def prune_checkpoints(folder: str, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep = 0 keeps all). Call after a new one is complete."""
    if keep > 0:
        for _, path in find_checkpoints(folder)[:-keep]:
            fileio.remove(path)


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


def load_generator(path: str, ema_rate: float | None = None, device: torch.device | str = "cpu") -> nn.Module:
    """The trained model of a checkpoint (its EMA at `ema_rate`, or the raw weights), in eval mode, frozen."""
    checkpoint = fileio.torch_load(path)
    if not (isinstance(checkpoint, dict) and {"model_spec", "model", "ema"} <= checkpoint.keys()):
        found = sorted(map(str, checkpoint))[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path} is not a training checkpoint (model_spec, model, ema), found {found}; a teacher "
                         "file is read with --teacher (pid-sample), a run folder's checkpoints are checkpoint-<step>.pt")
    model = build_model(checkpoint["model_spec"])
    if ema_rate is None:
        state = checkpoint["model"]
    else:
        rates = {float(key): key for key in checkpoint["ema"]}
        if float(ema_rate) not in rates:
            raise ValueError(f"{path} has no EMA at rate {ema_rate}; it has {', '.join(checkpoint['ema']) or 'none'}")
        state = checkpoint["ema"][rates[float(ema_rate)]]
    model.load_state_dict(state)
    return model.eval().requires_grad_(False).to(device)


def capture_rng() -> dict[str, Any]:
    """This process's global generator states (torch CPU and CUDA, numpy, python) as plain values."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,  # The current device's.
        "numpy": {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                  "pos": numpy_state["state"]["pos"], "has_gauss": numpy_state["has_gauss"],
                  "gauss": numpy_state["gauss"]},
        "python": random.getstate(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
                         "has_gauss": numpy_state["has_gauss"], "gauss": numpy_state["gauss"]})
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
