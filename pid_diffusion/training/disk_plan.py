"""What a run writes to its folder over its length, and whether it fits: the disk lines of the launch check.

A run folder's weight files are snapshots (`run.snapshot_every`, the newest `run.keep_snapshots` kept, 0:
all) and training states (`run.checkpoint_every` and the last step, the newest `run.keep_checkpoints` kept; a
new one is complete before the oldest is removed, so one more exists for a moment). Their sizes are those of
the folder's largest files of each kind where it has some, else estimated from the size of one network's weights:

    snapshot        (1 + EMAs) × weights                      model and every EMA (fixed-rate and power-function)
    training state  (1 + EMAs + 2) × weights                  … and the optimizer's two moments (Adam, RAdam)

The peak of these files over the run, less what the folder already holds, is compared with the free space
of the file system the folder is on (local folders; a blob store reports none).
"""

from __future__ import annotations

import dataclasses
import os
import shutil

from pid_diffusion.training import checkpoint
from pid_diffusion.config import TrainingConfig
from pid_diffusion.utils import fileio

__all__ = ["DiskPlan", "OPTIMIZER_MOMENTS", "describe", "plan"]

OPTIMIZER_MOMENTS = 2  # Adam's and RAdam's per-parameter state: exp_avg and exp_avg_sq, each one network's size.


@dataclasses.dataclass(frozen=True)
class DiskPlan:
    """The weight files a run keeps at its peak, their sizes, and the room for them."""

    snapshots: int  # Snapshots in the folder at the end of the run.
    snapshot_bytes: int
    states: int  # Training states at the peak (the kept ones and the one being completed).
    state_bytes: int
    measured: bool  # Sizes read from files in the folder (True) or estimated from the network's weights.
    present_bytes: int  # Snapshots and training states already in the folder.
    free_bytes: int | None  # Free space of the folder's file system; None for a blob store.

    @property
    def peak_bytes(self) -> int:
        return self.snapshots * self.snapshot_bytes + self.states * self.state_bytes

    @property
    def needed_bytes(self) -> int:
        """What the run adds to the folder at its peak."""
        return max(0, self.peak_bytes - self.present_bytes)

    @property
    def fits(self) -> bool:
        return self.free_bytes is None or self.needed_bytes <= self.free_bytes


def _writes(steps: int, every: int) -> int:
    """Steps in 1 … steps at which a file is written every `every` steps and at the last step."""
    return steps // every + (steps % every != 0)


def _kept(written: int, keep: int) -> int:
    return written if keep == 0 else min(written, keep)


def _free_bytes(folder: str) -> int | None:
    """Free bytes of the file system `folder` is (or will be) on: that of its nearest existing ancestor."""
    if not fileio.is_local(folder):
        return None
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def plan(config: TrainingConfig, network_bytes: int) -> DiskPlan:
    """The peak of `config`'s weight files, for a network whose weights take `network_bytes`."""
    run, train = config.run, config.train
    snapshots, states = checkpoint.find_snapshots(run.dir), checkpoint.find_training_states(run.dir)
    emas = len(train.ema_rates) + len(train.phema_stds)  # Each average is one network's copy, fixed-rate or power-function.
    snapshot_bytes = (1 + emas) * network_bytes
    state_bytes = (1 + emas + OPTIMIZER_MOMENTS) * network_bytes
    measured = bool(snapshots or states)
    # The largest of each kind: a damaged (truncated) file must not pass for the size of a complete one.
    if snapshots:
        snapshot_bytes = max(fileio.size(path) for _, path in snapshots)
    if states:
        state_bytes = max(fileio.size(path) for _, path in states)
    written_states = _writes(train.steps, run.checkpoint_every)
    peak_states = written_states if run.keep_checkpoints == 0 else min(written_states, run.keep_checkpoints + 1)
    kept_snapshots = _kept(_writes(train.steps, run.snapshot_every), run.keep_snapshots) if run.snapshot_every else 0
    present = sum(fileio.size(path) for _, path in [*snapshots, *states])
    return DiskPlan(snapshots=kept_snapshots, snapshot_bytes=snapshot_bytes, states=peak_states,
                    state_bytes=state_bytes, measured=measured, present_bytes=present,
                    free_bytes=_free_bytes(run.dir))


def _size(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000:
            return f"{count:.3g} {unit}"
        count /= 1000
    return f"{count:.3g} TB"


def describe(config: TrainingConfig, network_bytes: int, network_source: str) -> list[str]:
    """The launch check's disk lines: what the run keeps at its peak, the free space, and a warning naming the
    options to change when it does not fit. `network_source` says where `network_bytes` comes from."""
    result = plan(config, network_bytes)
    run = config.run
    sizes = "sizes of the folder's files" if result.measured else f"estimated from {network_source}"
    kept = "all kept" if run.keep_snapshots == 0 else f"the newest {run.keep_snapshots} kept"
    free = "free space unknown (blob store)" if result.free_bytes is None else f"{_size(result.free_bytes)} free"
    lines = [f"disk: {result.snapshots} snapshot(s) × {_size(result.snapshot_bytes)} (run.snapshot_every="
             f"{run.snapshot_every}, {kept}) + {result.states} training state(s) × {_size(result.state_bytes)} "
             f"(run.keep_checkpoints={run.keep_checkpoints}, one more while a new one is written) = "
             f"{_size(result.peak_bytes)} at the run's peak ({sizes}); {_size(result.present_bytes)} already in "
             f"{run.dir}, {free}"]
    if not result.fits:
        lines.append(f"warning: the run will write {_size(result.needed_bytes)} more to {run.dir} than the "
                     f"{_size(result.free_bytes)} free there: keep fewer snapshots (run.keep_snapshots="
                     f"{run.keep_snapshots}) or write them less often (run.snapshot_every={run.snapshot_every}), "
                     "free space, or name another run.dir")
    return lines
