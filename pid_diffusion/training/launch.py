"""What a launch would do, for `--dry-run` and the check before every run: the batch split over the ranks and
whether the run folder would start, resume or conflict, reading no weights (damaged training states are named
and skipped, never moved).
"""

from __future__ import annotations

from pid_diffusion.user_error import FileFormatError
from pid_diffusion.training import checkpoint
from pid_diffusion.config import ConfigError, OnResume, TrainingConfig, from_dict
from pid_diffusion.training.resume import resume_changes
from pid_diffusion.training.schedule import resumed_lr
from pid_diffusion.training.train import batch_plan

__all__ = ["describe_launch"]


def describe_launch(config: TrainingConfig, world_size: int) -> list[str]:
    """What `training_loop` would do with `config` on `world_size` ranks, reading no weights: the batch split and
    whether the run folder would start, resume (from its newest training state that loads; each newer damaged
    one is named, and left in place) or conflict. Raises the error the run would give (a batch that
    does not split, options that may not change on resume)."""
    per_rank, micro = batch_plan(config.train, world_size)
    lines = [f"{world_size} rank(s): global batch {config.train.batch} = {world_size} × {per_rank} per rank, "
             f"{per_rank // micro} micro-batch(es) of {micro} per rank and step"]
    newest, damaged = checkpoint.newest_header(config.run.dir)  # Damaged newer ones: named, left in place.
    lines += [f"{note}; the run moves it aside to <name>{checkpoint.DAMAGED_SUFFIX}" for note in damaged]
    if newest is None and damaged:
        raise checkpoint.NoLoadableTrainingStateError(
            f"no checkpoint in {config.run.dir} loads ({'; '.join(damaged)}). Restore a good checkpoint into the "
            "folder, or start a new run folder")
    if newest is None:
        snapshots = checkpoint.find_snapshots(config.run.dir)
        note = f" (its {len(snapshots)} snapshot(s) would be overwritten)" if snapshots else ""
        return lines + [f"run folder {config.run.dir}: would start at step 0{note}"]
    step, path, header = newest
    try:
        stored = from_dict(type(config), header["config"])
    except ConfigError as error:
        raise FileFormatError(f"run folder {config.run.dir} holds a run of another task ({path} trains "
                              f"{header['model_spec']['class']}: {error}); give this run its own run.dir") from error
    changes = resume_changes(stored, config, header["fingerprints"], None, path)
    if step >= config.train.steps:
        lines.append(f"run folder {config.run.dir}: complete ({path} is at step {step} ≥ train.steps)")
    else:
        lines.append(f"run folder {config.run.dir}: would resume from {path} at step {step}; "
                     f"{resumed_lr(stored.train, config.train, step)}")
    for change in changes:
        check = " (compared with the stored hash once loaded)" if change.kind is OnResume.CONTENT else ""
        lines.append(f"  changed on resume, {change.kind.value}: {change}{check}")
    return lines
