"""Plots of a run, drawn with matplotlib: FID and Inception Score against the training step (`fid.png`, from
the results table) and loss, gradient norm and learning rate against the step (`training.png`, from
metrics.jsonl). `pid-fid` redraws fid.png after each evaluation, the training loop redraws training.png at
each checkpoint, and `pid-plot RUN_DIR` draws both from the files of a run folder.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # Files only: no display, the same output on every machine.

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator, ScalarFormatter  # noqa: E402

from pid_diffusion.utils import fileio
from pid_diffusion.evaluation import NO_EMA, Result  # noqa: E402
from pid_diffusion.training.phema import is_std_name, std_of  # noqa: E402

__all__ = ["FID_PLOT", "PHEMA_PLOT", "TRAINING_PLOT", "plot_fid", "plot_fid_against_std", "plot_training",
           "read_metrics"]

FID_PLOT = "fid.png"
PHEMA_PLOT = "fid-phema.png"  # pid-fid --phema-std: FID against the relative std of the post-hoc EMA.
TRAINING_PLOT = "training.png"
_TRAINING_PANELS = (("loss", "loss", "log"), ("grad_norm", "gradient norm", "log"), ("lr", "learning rate", "linear"))


def _step_axis(axis) -> None:
    """Training steps are integers: ticks only at whole steps, written out in full (no offset, no 1e6)."""
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    formatter = ScalarFormatter(useOffset=False)
    formatter.set_scientific(False)
    axis.xaxis.set_major_formatter(formatter)
    axis.grid(True, alpha=0.3)


def _plain_values(axis) -> None:
    """Values written as they are: no offset such as '+9.5' that leaves every tick reading alike."""
    formatter = ScalarFormatter(useOffset=False)
    formatter.set_scientific(False)
    axis.yaxis.set_major_formatter(formatter)


def _save(figure, path: str) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    fileio.atomic_write_bytes(buffer.getvalue(), path)


def _panels(results: Sequence[Result]) -> list[tuple[str, str]]:
    """(axis label, Result field) of the scores to draw: FID and IS, and FD_DINOv2 where any row has it."""
    panels = [("FID", "fid"), ("Inception Score", "is_mean")]
    return panels + [("FD_DINOv2", "fd_dinov2")] if any(r.fd_dinov2 is not None for r in results) else panels


def plot_fid(results: Sequence[Result], path: str) -> None:
    """FID (top), Inception Score and, where measured, FD_DINOv2 against the training step, one line per set of
    weights; rows without a step (a teacher, images) are left out."""
    panels = _panels(results)
    figure, axes = plt.subplots(len(panels), 1, figsize=(8, 3.5 * len(panels)), sharex=True, layout="constrained")
    lines: dict[str, list[Result]] = {}
    for result in sorted((r for r in results if r.step is not None), key=lambda r: r.step):
        label = "trained weights" if result.ema == NO_EMA else f"EMA {result.ema}"
        lines.setdefault(label, []).append(result)
    for axis, (name, value) in zip(axes, panels):
        for label, line in lines.items():
            points = [(r.step, getattr(r, value)) for r in line if getattr(r, value) is not None]
            if points:
                axis.plot(*zip(*points), marker="o", label=label)
        axis.set_ylabel(name)
        _step_axis(axis)
        _plain_values(axis)
    axes[0].legend()
    axes[-1].set_xlabel("training step")
    _save(figure, path)


def plot_fid_against_std(results: Sequence[Result], path: str) -> None:
    """The scores of post-hoc EMA reconstructions (weights 'std-<σ_rel>') against σ_rel, one line per file (the
    step it was reconstructed at), as EDM2 plots FID against the EMA length."""
    panels = _panels(results)
    figure, axes = plt.subplots(len(panels), 1, figsize=(8, 3.5 * len(panels)), sharex=True, layout="constrained")
    lines: dict[str, list[Result]] = {}
    for result in sorted((r for r in results if is_std_name(r.ema)), key=lambda r: std_of(r.ema)):
        lines.setdefault(f"step {result.step}" if result.step is not None else result.checkpoint, []).append(result)
    for axis, (name, value) in zip(axes, panels):
        for label, line in lines.items():
            points = [(std_of(r.ema), getattr(r, value)) for r in line if getattr(r, value) is not None]
            if points:
                axis.plot(*zip(*points), marker="o", label=label)
        axis.set_ylabel(name)
        axis.grid(True, alpha=0.3)
        _plain_values(axis)
    axes[0].legend()
    axes[-1].set_xlabel("relative standard deviation of the post-hoc EMA (σ_rel)")
    _save(figure, path)


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl file, in order."""
    return [json.loads(line) for line in fileio.read_bytes(path).decode("utf-8").splitlines() if line]


def plot_training(records: Sequence[dict], path: str) -> None:
    """Loss, gradient norm and learning rate against the step, from metrics.jsonl records."""
    figure, axes = plt.subplots(len(_TRAINING_PANELS), 1, figsize=(8, 8), sharex=True, layout="constrained")
    steps = [record["step"] for record in records]
    for axis, (key, name, scale) in zip(axes, _TRAINING_PANELS):
        axis.plot(steps, [record[key] for record in records], marker="." if len(records) < 50 else None)
        # A log scale needs positive values: a zero learning rate or gradient norm falls back to linear.
        axis.set_yscale(scale if all(record[key] > 0 for record in records) else "linear")
        axis.set_ylabel(name)
        _step_axis(axis)
    axes[-1].set_xlabel("training step")
    _save(figure, path)
