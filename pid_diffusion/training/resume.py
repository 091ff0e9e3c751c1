"""Resuming a run by re-running the same command: the newest training state that loads (checkpoint.py finds
and reads it) is loaded into the loop's model, EMAs, optimizer and loss scaler with every rank's random-number
state, after the policy of what may change on resume (`config.OnResume`, declared per field) allows the
command's options.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pid_diffusion.training.checkpoint import NoLoadableTrainingStateError, newest_loadable, read_training_state
from pid_diffusion.config import (ConfigError, OnResume, TrainingConfig, diff, flatten, from_dict, resume_classes,
                                  to_dict)
from pid_diffusion.training.schedule import horizon_refusal
from pid_diffusion.utils import dist
from pid_diffusion.utils.rng import restore_rng

__all__ = ["Change", "resume", "resume_changes"]


@dataclasses.dataclass(frozen=True)
class Change:
    """An option that differs between the stored run and the command resuming it."""

    key: str
    stored: Any
    now: Any
    kind: OnResume

    def __str__(self) -> str:
        return f"{self.key}: {json.dumps(self.stored)} → {json.dumps(self.now)}"


def resume_changes(stored: TrainingConfig, config: TrainingConfig, stored_fingerprints: Mapping[str, str],
                   fingerprints: Mapping[str, str] | None, path: str) -> list[Change]:
    """The changes between a stored configuration and `config` that a resumed run may make, or one
    ConfigError naming every change it may not: a MATCH field (the run's maths), or a CONTENT field whose file
    now holds other weights. `fingerprints` None (the dry-run, which loads nothing) leaves CONTENT changes to
    the run, which compares the hashes."""
    refusal = horizon_refusal(stored.train, config.train)
    if refusal is not None:
        raise ConfigError(f"{path}: {refusal}")
    classes = resume_classes(type(config))
    old, new = flatten(to_dict(stored)), flatten(to_dict(config))
    changes = [Change(key, old.get(key), new.get(key), classes.get(key, OnResume.MATCH))
               for key in diff(stored, config)]
    refused = [str(change) for change in changes if change.kind is OnResume.MATCH]
    if fingerprints is not None:
        for change in changes:
            if change.kind is OnResume.CONTENT and stored_fingerprints.get(change.key) != fingerprints.get(change.key):
                refused.append(f"{change} (its network's weights differ from the stored run's)")
    if refused:
        raise ConfigError(f"{path} was written with other options that define the run's maths: {'; '.join(refused)}. "
                          "Resume with the stored values (see config.json) or start a new run folder")
    return changes


def resume(config: TrainingConfig, model: nn.Module, ema, optimizer: torch.optim.Optimizer,
           scaler: torch.amp.GradScaler, fingerprints: Mapping[str, str] | None = None
           ) -> tuple[int, str | None, bool, list[Change]]:
    """Load the newest training state of the run folder: (its step, its path, whether this rank's RNG state
    was restored, the allowed option changes); (0, None, False, []) without one.

    Newer training states that do not load are moved aside (`newest_loadable`). Options that define the run's
    maths must equal the stored ones (`resume_changes`); the others (intervals,
    folders, the step limit, speed options, a teacher file holding the same weights) may change. A job with
    another number of ranks than the one that wrote the state continues with fresh RNG states (the caller
    seeds them), so its random numbers differ from an uninterrupted run's.
    """
    rank, world_size = dist.rank(), dist.world_size()
    # Rank 0 alone chooses, so no two ranks move one damaged file; the others load its choice.
    found, error = None, None
    if rank == 0:
        try:
            found = newest_loadable(config.run.dir, log=dist.print0)
        except NoLoadableTrainingStateError as raised:
            error = str(raised)
    path, error = dist.broadcast_object((found[0] if found else None, error))
    if error is not None:
        raise NoLoadableTrainingStateError(error)
    if path is None:
        return 0, None, False, []
    # On the CPU: RNG states must stay there; load_state_dict moves the rest.
    state = found[1] if rank == 0 else read_training_state(path)
    step = state["step"]
    stored = from_dict(type(config), state["config"])
    changes = resume_changes(stored, config, state.get("fingerprints", {}), fingerprints or {}, path)
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
    for change in changes:
        dist.print0(f"  changed on resume ({change.kind.value}): {change}")
    return step, path, restored, changes
