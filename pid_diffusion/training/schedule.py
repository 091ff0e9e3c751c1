"""The learning-rate schedule: linear warm-up, then constant or decayed over a horizon; and what a resumed run
may change of it.

Under a decay the horizon (`train.lr_decay_steps`, by default `train.steps`) sets every step's lr, so a resumed
run that changes `train.steps` alone would give every step to come another lr. That is refused with the two
choices, each an explicit option: keep the stored horizon (`--train.lr_decay_steps=<old>`; the steps past it
run at its final lr) or stretch the decay to the new one (`--train.lr_decay_steps=<new>`; the lr jumps to the
new schedule's value at the resumed step).
"""

from __future__ import annotations

import math

from pid_diffusion.config import LRDecay, TrainConfig

__all__ = ["decay_horizon", "horizon_refusal", "lr_at", "resumed_lr"]


def decay_horizon(train: TrainConfig) -> int | None:
    """The step at which the decay would reach lr 0; None for a constant lr (no step count enters it)."""
    if train.lr_decay is LRDecay.CONSTANT:
        return None
    return train.lr_decay_steps if train.lr_decay_steps is not None else train.steps


def lr_at(train: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then constant or decayed so that the
    step after the horizon's last would have lr 0 (the last step itself still moves); a step past the horizon
    keeps the last one's lr (a run extended with its old horizon)."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    horizon = decay_horizon(train)
    if horizon is None:
        return train.lr
    progress = (min(step, horizon - 1) - train.warmup_steps) / max(1, horizon - train.warmup_steps)  # In [0, 1).
    factor = {LRDecay.COSINE: 0.5 * (1 + math.cos(math.pi * progress)), LRDecay.LINEAR: 1 - progress}[train.lr_decay]
    return train.lr * factor


def horizon_refusal(stored: TrainConfig, now: TrainConfig) -> str | None:
    """Why a resumed run may not use `now`'s schedule, with the choices; None when it may. Refused: a decay
    horizon moved by `train.steps` alone (no explicit `train.lr_decay_steps`)."""
    old, new = decay_horizon(stored), decay_horizon(now)
    if old is None or new is None or old == new or now.lr_decay_steps is not None:
        return None
    last = lr_at(stored, old - 1)
    return (f"train.steps {stored.steps} → {now.steps} under the {now.lr_decay.value} lr decay would give every "
            f"step to come another lr (the decay spans train.steps: the stored run's ends at step {old}, lr "
            f"{last:.3g}). Choose one: --train.lr_decay_steps={old} keeps the stored horizon (the steps after {old} "
            f"run at its final lr {last:.3g}), or --train.lr_decay_steps={new} restarts the decay over the new "
            f"horizon (the lr jumps to the new schedule's, e.g. {lr_at(now, min(old, new) - 1):.3g} at step "
            f"{min(old, new) - 1})")


def resumed_lr(stored: TrainConfig, now: TrainConfig, step: int) -> str:
    """The lr the resumed run's next step (`step`, 0-based) will use, and the stored schedule's where it differs:
    the dry-run's line."""
    line = f"lr of step {step + 1}: {lr_at(now, step):.4g}"
    if not math.isclose(lr_at(now, step), lr_at(stored, step), rel_tol=1e-12):
        line += f" (the stored schedule's: {lr_at(stored, step):.4g})"
    return line
