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

Every entry holds only tensors and plain Python values, so it loads with `weights_only=True`. `save` and
`resume` write and read the whole training state (the training loop calls them); `load_generator` needs
nothing but the file: sampling and FID need neither the teacher nor the configuration code.
"""

from __future__ import annotations

import importlib
import random
import re
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn

from pid_diffusion import dist, fileio
from pid_diffusion.config import ConfigError, TrainingConfig, diff, from_dict, to_dict

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
    "resume",
    "save",
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


# ----------------------------------------------------------------------------------------------------------
# The training state: written and resumed by the training loop.


def save(config: TrainingConfig, step: int, model: nn.Module, ema, optimizer: torch.optim.Optimizer,
         scaler: torch.amp.GradScaler) -> str:
    """Write checkpoint `step` (rank 0, with every rank's RNG state), prune old ones; returns its path.
    Call on every rank: the RNG states are gathered."""
    states = [None] * dist.world_size() if dist.rank() == 0 else None
    torch_dist.gather_object(capture_rng(), states, dst=0)
    path = checkpoint_path(config.run.dir, step)
    if dist.rank() == 0:
        fileio.atomic_torch_save({
            "step": step,
            "config": to_dict(config),
            "model_spec": model_spec(model),
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": states,
        }, path)
        prune_checkpoints(config.run.dir, config.run.keep_checkpoints)
    dist.barrier()
    return path


def resume(config: TrainingConfig, model: nn.Module, ema, optimizer: torch.optim.Optimizer,
           scaler: torch.amp.GradScaler) -> tuple[int, str | None, bool]:
    """Load the newest checkpoint of the run folder into the training state: (its step, its path, whether
    this rank's RNG state was restored); (0, None, False) without one.

    The stored configuration must equal `config` except for the step limit (and the run folder, which may
    have been moved). A job with another number of ranks than the one that wrote the checkpoint continues
    with fresh RNG states (the caller seeds them), so its random numbers differ from an uninterrupted run's.
    """
    rank, world_size = dist.rank(), dist.world_size()
    latest = latest_checkpoint(config.run.dir)
    if latest is None:
        return 0, None, False
    step, path = latest
    state = fileio.torch_load(path)  # On the CPU: RNG states must stay there; load_state_dict moves the rest.
    stored = from_dict(type(config), state["config"])
    # The step limit may grow; the run folder may have been moved or copied. Anything else changes the run.
    changed = [key for key in diff(stored, config) if key not in ("train.steps", "run.dir")]
    if changed:
        raise ConfigError(f"{path} was written with a different configuration ({', '.join(changed)} differ). "
                          f"Resume with the stored options (see config.json) or start a new run folder")
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    restored = len(state["rng"]) == world_size
    if restored:
        restore_rng(state["rng"][rank])
    else:
        dist.print0(f"{path} holds RNG states of {len(state['rng'])} ranks, this job has {world_size}; "
                    f"reseeding the global generators from (seed, rank, step)")
    dist.print0(f"Resuming from {path} at step {step}")
    return step, path, restored
