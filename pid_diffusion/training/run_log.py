"""What a training run records in its folder, rank 0 only: metrics.jsonl (one JSON record per log step), TensorBoard
event files beside it when `run.tensorboard` is set, the plot of the records (training.png), history.jsonl (one
record per start or resume), and the progress: a tqdm bar on a terminal, one plain line per log record otherwise
(a batch job's log). The training loop (train.py) calls it; it knows nothing of the loop's maths.
"""

from __future__ import annotations

import datetime
import json
import sys
import time

import torch
import tqdm

from pid_diffusion.utils import fileio
from pid_diffusion.config import ConfigError, RunConfig, TrainConfig
from pid_diffusion.training.resume import Change

__all__ = ["HISTORY_FILE", "METRICS_FILE", "RunLog", "record_history"]

HISTORY_FILE = "history.jsonl"  # One record per start or resume of a run: when, where, what changed.
METRICS_FILE = "metrics.jsonl"  # One record per log step: loss, lr, gradient norm, speed.


class RunLog:
    """The log records of a run, one every `run.log_every` steps: on rank 0 they go to metrics.jsonl (and
    TensorBoard), to the plot and to the progress (a bar on a terminal, a plain line otherwise); the other ranks
    only count. Call `step` after every step, `record` at a log step, `plot` at a training state, `close` last."""

    def __init__(self, run: RunConfig, train: TrainConfig, start_step: int, active: bool):
        self.steps, self.batch, self.active = train.steps, train.batch, active
        self.metrics = _MetricsLog(run, start_step) if active else None
        self.interactive = sys.stderr.isatty()
        self.progress = tqdm.tqdm(total=train.steps, initial=start_step, disable=not active or not self.interactive,
                                  unit="step", dynamic_ncols=True)
        self.sums = _Sums()

    def step(self, loss: float, grad_norm: torch.Tensor, skipped: bool) -> None:
        self.sums.add(loss, grad_norm, skipped)
        self.progress.update()

    def record(self, step: int, lr: float, loss_scale: float | None) -> None:
        """Close the interval ending at `step` into a log record and write it (rank 0)."""
        record = self.sums.record(step, self.batch, lr, loss_scale)
        if self.active:
            self.metrics.append(record)
            self.progress.set_postfix(loss=f"{record['loss']:.4g}", skipped=record["skipped_steps"])
            if not self.interactive:
                print(_progress_line(record, self.steps), flush=True)

    def plot(self) -> None:
        if self.active:
            self.metrics.plot()

    def close(self) -> None:
        self.progress.close()
        if self.active:
            self.metrics.close()


class _MetricsLog:
    """metrics.jsonl in the run folder, one JSON record per log step, TensorBoard event files beside it when
    `run.tensorboard` is set, and the plot of the records (training.png); rank 0 only.

    The file is rewritten atomically (blob stores cannot append); a resumed run drops the records of steps
    after its checkpoint, which it trains again.
    """

    def __init__(self, run: RunConfig, resume_step: int):
        self.folder = run.dir
        self.path = fileio.join(run.dir, METRICS_FILE)
        self.records: list[dict] = []
        if fileio.exists(self.path):
            lines = fileio.read_bytes(self.path).decode("utf-8").splitlines()
            self.records = [record for line in lines if line and (record := json.loads(line))["step"] <= resume_step]
        self.tensorboard = _tensorboard_writer(run.dir, resume_step) if run.tensorboard else None

    def append(self, record: dict) -> None:
        self.records.append(record)
        fileio.atomic_write_text("".join(json.dumps(r) + "\n" for r in self.records), self.path)
        if self.tensorboard is not None:
            for key, value in record.items():
                if key not in ("step", "time") and value is not None:
                    self.tensorboard.add_scalar(f"train/{key}", value, record["step"], walltime=record["time"])
            self.tensorboard.flush()

    def plot(self) -> None:
        if self.records:
            from pid_diffusion.training import plots  # Here: matplotlib costs a second at import, only when plotting.

            plots.plot_training(self.records, fileio.join(self.folder, plots.TRAINING_PLOT))

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _tensorboard_writer(folder: str, resume_step: int):
    """A TensorBoard SummaryWriter on the run folder (local folders only), as EDM's training loop opens one."""
    if not fileio.is_local(folder):
        raise ConfigError(f"run.tensorboard: TensorBoard writes local files only; {folder} is a blob URL. "
                          "Set run.tensorboard=false (metrics.jsonl has the same records)")
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("run.tensorboard=true needs the tensorboard package: pip install 'pid-diffusion[tensorboard]' "
                          "(or set run.tensorboard=false)") from None
    # purge_step: a resumed run drops the events of steps it trains again, as metrics.jsonl drops its records.
    return SummaryWriter(folder, purge_step=resume_step + 1 if resume_step else None)


def record_history(folder: str, step: int, resumed_from: str | None, changes: list[Change],
                    world_size: int, per_rank: int, micro: int) -> None:
    """Append this start or resume, with the options it changed, to the run folder's history.jsonl."""
    path = fileio.join(folder, HISTORY_FILE)
    text = fileio.read_bytes(path).decode("utf-8") if fileio.exists(path) else ""
    record = {"time": time.time(), "event": "resume" if resumed_from else "start", "step": step,
              "from": resumed_from, "world_size": world_size, "per_rank_batch": per_rank, "micro_batch": micro,
              "changes": {change.key: {"stored": change.stored, "now": change.now, "on_resume": change.kind.name}
                          for change in changes}}
    fileio.atomic_write_text(text + json.dumps(record) + "\n", path)  # Rewritten whole: blob stores cannot append.


def _progress_line(record: dict, steps: int) -> str:
    """One log record as a plain line: what a batch job's log shows instead of a progress bar."""
    remaining = datetime.timedelta(seconds=round(record["s_per_step"] * (steps - record["step"])))
    return (f"step {record['step']}/{steps} ({100 * record['step'] / steps:.1f}%)  loss {record['loss']:.4g}  "
            f"grad norm {record['grad_norm']:.3g}  {record['s_per_step']:.3g} s/step  "
            f"{record['images_per_s']:.4g} images/s  remaining {remaining}")


class _Sums:
    """Sums over the steps since the last log record."""

    def __init__(self):
        self.start, self.steps, self.loss, self.grad_norm, self.skipped = time.perf_counter(), 0, 0.0, 0.0, 0

    def add(self, loss: float, grad_norm: torch.Tensor, skipped: bool) -> None:
        """`grad_norm` stays on its device: the sum is read back once per record, not once per step (a sync)."""
        self.steps += 1
        self.loss += loss
        self.grad_norm += grad_norm
        self.skipped += int(skipped)

    def record(self, step: int, batch: int, lr: float, loss_scale: float | None) -> dict:
        """The log record of the interval ending at `step`, then a fresh interval."""
        seconds = time.perf_counter() - self.start
        record = {
            "step": step,
            "loss": self.loss / self.steps,  # Mean over the interval of the global-batch mean loss.
            "lr": lr,
            "grad_norm": float(self.grad_norm) / self.steps,
            "loss_scale": loss_scale,
            "skipped_steps": self.skipped,
            "images_per_s": batch * self.steps / seconds,
            "s_per_step": seconds / self.steps,
            "time": time.time(),
        }
        self.__init__()
        return record
