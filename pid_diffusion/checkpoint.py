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
    "MODEL_CLASSES",
    "build_model",
    "capture_rng",
    "checkpoint_path",
    "find_checkpoints",
    "latest_checkpoint",
    "load_generator",
    "model_spec",
    "prune_checkpoints",
    "restore_rng",
]

# Classes a checkpoint can rebuild, as "module:attribute", imported only when needed (no import cycles).
MODEL_CLASSES: dict[str, str] = {
    "PIDStudent": "pid_diffusion.student:PIDStudent",
    "EDMPrecond": "pid_diffusion.networks:EDMPrecond",
}

_NAME = re.compile(r"^checkpoint-(\d{8})\.pt$")


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
