"""A tiny training task for the training-loop tests: a conv net regresses a fixed function of its input.

Run as a script (also under mpirun / torchrun) it trains with the shared loop:

    python tests/toy_training.py --run.dir=/tmp/toy --train.steps=4 [--toy.fail_step=2 ...]

The `toy` section shows how a task plugs its own options into the configuration system, and carries the
test-only fault injections (a slow step, a failing rank, a NaN loss, a preemption signal).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pid_diffusion.training import checkpoint  # noqa: E402
from pid_diffusion.utils import dist
from pid_diffusion.config import TrainingConfig, apply_overrides, parse_overrides  # noqa: E402
from pid_diffusion.training.train import training_loop  # noqa: E402

CHANNELS, SIZE = 2, 4  # Images of the toy task: [B, 2, 4, 4].


class ToyNet(nn.Module):
    """Two 3×3 convolutions with optional dropout; a constant buffer tests that EMAs copy buffers."""

    def __init__(self, width: int = 8, dropout: float = 0.0):
        super().__init__()
        self.init_kwargs = dict(width=width, dropout=dropout)
        self.net = nn.Sequential(nn.Conv2d(CHANNELS, width, 3, padding=1), nn.SiLU(), nn.Dropout(dropout),
                                 nn.Conv2d(width, CHANNELS, 3, padding=1))
        self.register_buffer("gain", torch.full((), 1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * self.net(x)


checkpoint.MODEL_CLASSES["ToyNet"] = ToyNet  # So that snapshots and training states can rebuild it.


@dataclasses.dataclass(frozen=True)
class ToySection:
    width: int = 8                 # ToyNet width.
    dropout: float = 0.0           # ToyNet dropout (exercises the global RNG on resume).
    step_delay_s: float = 0.0      # Sleep per loss call, announced on stderr: a window for killing the job mid-run.
    fail_step: int = -1            # Raise on rank `fail_rank` at this step (-1: never).
    fail_rank: int = 0
    nan_step: int = -1             # Return a NaN loss at this step (-1: never).
    overflow_step: int = -1        # A finite loss with a NaN gradient at this step (-1: never).
    signal_step: int = -1          # Rank `signal_rank` sends itself `signal` in this step of each process (-1: never).
    signal_rank: int = 0
    signal: str = "SIGTERM"


@dataclasses.dataclass(frozen=True)
class ToyConfig(TrainingConfig):
    toy: ToySection = dataclasses.field(default_factory=ToySection)


# The toy task's preset: what differs from the defaults, as the files of configs/ hold it.
TOY_PRESET = {"run": {"dir": "runs/toy", "checkpoint_every": 2, "log_every": 1, "image_every": 0, "sync_check_every": 1},
              "train": {"steps": 4, "batch": 8, "lr": 1e-2, "ema_rates": [0.9, 0.99]}}


def resolve(overrides: dict[str, str]) -> ToyConfig:
    return apply_overrides(ToyConfig, TOY_PRESET, overrides)


class ToyObjective:
    """Regress F(x) ≈ sin(2x).flip(channels); per-sample mean squared error."""

    def __init__(self, toy: ToySection):
        self.toy = toy
        self.calls = 0

    def sample_batch(self, generator: torch.Generator, batch_size: int) -> dict[str, torch.Tensor]:
        return {"x": torch.randn(batch_size, CHANNELS, SIZE, SIZE, generator=generator, device=generator.device)}

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        step = self.calls  # One call per step when there is one micro-batch (the fault tests).
        self.calls += 1
        if self.toy.step_delay_s:  # the window opens: a test waiting for it reads this line
            print(f"toy: step {step} in flight", file=sys.stderr, flush=True)
            time.sleep(self.toy.step_delay_s)
        if step == self.toy.fail_step and dist.rank() == self.toy.fail_rank:
            raise RuntimeError(f"injected failure on rank {dist.rank()} at step {step}")
        if step == self.toy.signal_step and dist.rank() == self.toy.signal_rank:
            os.kill(os.getpid(), signal.Signals[self.toy.signal])  # Mid-step: before the loss and its backward.
        x = batch["x"]
        y = model(x)
        losses = (y - torch.sin(2 * x).flip(1)).square().mean((1, 2, 3))
        if step == self.toy.overflow_step:
            losses = losses + (0 * y).square().mean((1, 2, 3)).sqrt()  # sqrt'(0) = ∞: a NaN gradient.
        return losses * float("nan") if step == self.toy.nan_step else losses


def main(argv: list[str] | None = None) -> nn.Module:
    config = resolve(parse_overrides(sys.argv[1:] if argv is None else argv))
    torch.manual_seed(0)  # The initial weights; DDP broadcasts rank 0's anyway.
    model = ToyNet(config.toy.width, config.toy.dropout)
    return training_loop(config, ToyObjective(config.toy), model)


if __name__ == "__main__":
    with dist.abort_on_error():
        main()
    dist.shutdown()
