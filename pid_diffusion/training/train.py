"""The training loop shared by distillation and teacher training: DDP, micro-batches, precision, EMA, the
optimizer and its learning-rate schedule; checkpoint.py saves, resume.py resumes, run_log.py records.

The loop knows a task only through its `Objective` (ARCHITECTURE.md). The global batch of step s is cut
into chunks of `NOISE_CHUNK` samples, and chunk c is drawn by `objective.sample_batch` from its own
generator, seeded by (train.seed, s, c) alone and living on the rank's device. Rank r draws only the
chunks that overlap its share `[r · b, (r + 1) · b)`, keeps that share and splits it into micro-batches.
Sample k of step s is therefore the same for any number of ranks and micro-batches (on one device type:
CUDA and CPU generators give different streams), no rank draws more than its share plus two chunks, and the
loss of a step is the mean of the per-sample losses over the global batch: K ranks × B/K train like one
rank × B, up to the order of floating-point sums.

The loop writes a snapshot (weights and EMAs, for FID) every `run.snapshot_every` steps and a training state
(everything resume needs) every `run.checkpoint_every` steps (checkpoint.py). Re-running the same command
resumes from the newest training state that loads (damaged newer ones are moved aside) with the model, every
EMA, the optimizer, the loss scaler, the step and every rank's random-number state, so the resumed run ends
with the same weights as one that was never interrupted. Options that do not define the run's maths
(`config.OnResume`) may change on resume; each start and resume is recorded in the run folder's
history.jsonl with what changed. A preemption signal (preemption.py) stops every rank after the same step,
with a training state of that step.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import errno
import math
from collections.abc import Iterator, Mapping
from typing import Protocol

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pid_diffusion.user_error import OptionError
from pid_diffusion import images
from pid_diffusion.training import checkpoint, phema, resume, run_log
from pid_diffusion.utils import dist, fileio, perf, preemption
from pid_diffusion.utils.rng import seed_globals
from pid_diffusion.config import ConfigError, OptimizerKind, Precision, TrainConfig, TrainingConfig, to_json
from pid_diffusion.generate import Preview
from pid_diffusion.training.schedule import lr_at

__all__ = ["AUTOCAST_DTYPES", "EMA", "NOISE_CHUNK", "NonFiniteLossError", "Objective", "batch_plan",
           "build_optimizer", "chunk_generator", "loss_scaler", "lr_at", "training_loop"]

# Samples per generator: sample k of step s is sample k mod NOISE_CHUNK of chunk k // NOISE_CHUNK. Small
# enough that a rank wastes little when its share is not a multiple of it, large enough that the per-chunk
# seeding and kernel launches cost nothing next to the drawing. Changing it changes every run's batches.
NOISE_CHUNK = 16


class Objective(Protocol):
    """A training task as the loop sees it (ARCHITECTURE.md, the objective protocol)."""

    def sample_batch(self, generator: torch.Generator, batch_size: int) -> dict[str, torch.Tensor]:
        """`batch_size` samples (a chunk of a step's global batch): tensors whose first dimension is
        `batch_size`, drawn from `generator` alone and created on `generator.device`."""

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-sample losses [b] of a (micro-)batch; `model` is the DDP-wrapped model."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops without writing anything."""


def chunk_generator(seed: int, step: int, chunk: int, device: torch.device) -> torch.Generator:
    """The generator of chunk `chunk` of step `step` on `device`: what it draws depends on (seed, step, chunk).

    (seed, step, chunk) is hashed by numpy's SeedSequence into 64 bits; CUDA's Philox generator uses them
    all, torch's CPU generator (mt19937) only the low 32 bits, which are a hash of all three as well.
    """
    state = np.random.SeedSequence((seed, step, chunk)).generate_state(2, dtype=np.uint32)
    return torch.Generator(device).manual_seed(int(state[0]) << 32 | int(state[1]))


class EMA:
    """Exponential moving averages of a model's parameters at several rates; buffers are copied."""

    def __init__(self, model: nn.Module, rates: tuple[float, ...]):
        self.rates = rates
        self.models = {rate: copy.deepcopy(model).eval().requires_grad_(False) for rate in rates}

    def update(self, model: nn.Module) -> None:
        for rate, average in self.models.items():
            phema.update_average(average, model, rate)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {str(rate): average.state_dict() for rate, average in self.models.items()}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        missing = [str(rate) for rate in self.rates if str(rate) not in state]
        if missing:
            raise OptionError(f"the checkpoint has no EMA at rate(s) {', '.join(missing)}; it has {', '.join(state)}")
        for rate, average in self.models.items():
            average.load_state_dict(state[str(rate)])


# ----------------------------------------------------------------------------------------------------------
# Pieces of a step.


def batch_plan(train: TrainConfig, world_size: int) -> tuple[int, int]:
    """(per-rank batch, micro-batch), or a ConfigError naming the fix."""
    if train.batch % world_size:
        raise ConfigError(f"train.batch={train.batch} does not split over {world_size} ranks: use a multiple of "
                          f"{world_size} or another number of processes")
    per_rank = train.batch // world_size
    micro = train.micro_batch or per_rank
    if per_rank % micro:
        raise ConfigError(f"train.micro_batch={micro} does not divide the per-rank batch {per_rank} "
                          f"(train.batch={train.batch} over {world_size} ranks): choose a divisor of {per_rank}")
    return per_rank, micro


def _rank_share(objective: Objective, seed: int, step: int, per_rank: int, rank: int,
                device: torch.device) -> dict[str, torch.Tensor]:
    """Samples [rank · per_rank, (rank + 1) · per_rank) of the global batch of `step`, drawn on `device`: the
    chunks that overlap them, each from its own generator, cut to the share."""
    first = rank * per_rank
    chunks = range(first // NOISE_CHUNK, (first + per_rank - 1) // NOISE_CHUNK + 1)
    parts = [objective.sample_batch(chunk_generator(seed, step, chunk, device), NOISE_CHUNK) for chunk in chunks]
    for key, value in parts[0].items():
        if value.shape[:1] != (NOISE_CHUNK,) or value.device != device:
            raise ValueError(f"sample_batch returned {key!r} of shape {tuple(value.shape)} on {value.device}; it "
                             f"must have the requested batch size {NOISE_CHUNK} first and live on the generator's "
                             f"device {device}")
    offset = first - chunks[0] * NOISE_CHUNK
    return {key: torch.cat([part[key] for part in parts])[offset:offset + per_rank] for key in parts[0]}


def _micro_batches(batch: dict[str, torch.Tensor], micro: int) -> Iterator[dict[str, torch.Tensor]]:
    size = next(iter(batch.values())).shape[0]
    for start in range(0, size, micro):
        yield {key: value[start:start + micro] for key, value in batch.items()}


def build_optimizer(params, train: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimizer; no weight decay unless configured (docs/method.md §5)."""
    cls = {OptimizerKind.RADAM: torch.optim.RAdam, OptimizerKind.ADAM: torch.optim.Adam}[train.optimizer]
    return cls(params, lr=train.lr, betas=train.betas, eps=train.eps, weight_decay=train.weight_decay)


AUTOCAST_DTYPES = {Precision.FP32: None, Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}


def loss_scaler(precision: Precision, device: torch.device) -> torch.amp.GradScaler:
    """Dynamic loss scaling for fp16, whose range is too narrow for small gradients; a disabled scaler otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision is Precision.FP16)


def _autocast(train: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    dtype = AUTOCAST_DTYPES[train.precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _apply_speed_options(model: nn.Module, train: TrainConfig, device: torch.device) -> None:
    """Memory format, activation recomputation and CPU memory reuse, in place: the state_dict keys and the maths
    stay (channels-last kernels sum in another order)."""
    if train.channels_last:
        model.to(memory_format=torch.channels_last)  # Activations follow: a convolution outputs its weight's format.
    if train.activation_checkpointing:
        perf.enable_activation_recomputation(model)
    if device.type == "cpu":
        # Without it glibc unmaps freed activations and the next step faults every page in again
        # (benchmarks/RESULTS.md); the process keeps its peak memory instead.
        perf.retain_freed_cpu_memory()


def _overflow(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, device: torch.device) -> torch.Tensor:
    """1 where fp16 loss scaling found an inf or NaN gradient this step (after `scaler.unscale_(optimizer)`),
    else 0, on `device`: nothing is read back. GradScaler keeps the flag per device of the gradients and has no
    public accessor for it (`_found_inf_per_device`, the same in every torch that setup.py allows)."""
    if not scaler.is_enabled():
        return torch.zeros((), device=device)
    found = scaler._found_inf_per_device(optimizer).values()
    return torch.stack([flag.reshape(()).to(device) for flag in found]).sum()


def _grad_norm(model: nn.Module) -> torch.Tensor:
    """Euclidean norm of all gradients together, on their device (nothing is read back)."""
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros((), device=next(model.parameters()).device)


def _weights_checksum(model: nn.Module) -> torch.Tensor:
    """Per-tensor float64 sums of parameters and buffers: equal on ranks that hold equal weights."""
    return torch.stack([t.detach().double().sum() for t in [*model.parameters(), *model.buffers()]])


def _check_ranks_agree(model: nn.Module, step: int) -> None:
    if dist.world_size() == 1:
        return
    high = _weights_checksum(model)
    low = high.clone()
    torch_dist.all_reduce(high, op=torch_dist.ReduceOp.MAX)
    torch_dist.all_reduce(low, op=torch_dist.ReduceOp.MIN)
    if not torch.equal(high, low):
        names = [name for name, _ in [*model.named_parameters(), *model.named_buffers()]]
        differing = [names[i] for i in torch.nonzero(high != low).flatten().tolist()]
        raise RuntimeError(f"after step {step} the ranks hold different weights in {', '.join(differing[:5])}: "
                           f"some rank updated its model outside DDP")


# ----------------------------------------------------------------------------------------------------------
# The loop.


def training_loop(config: TrainingConfig, objective: Objective, model: nn.Module,
                  preview: Preview | None = None, fingerprints: Mapping[str, str] | None = None) -> nn.Module:
    """Train `model` on `objective` as `config.train` says, writing to `config.run.dir`; returns the model.

    `model` must have `init_kwargs` and be listed in `checkpoint.MODEL_CLASSES`; the objective receives it
    wrapped in DDP. `preview(model)` draws the sample grid written every `run.image_every` steps.
    `fingerprints` are the hashes of what the configuration's CONTENT fields name (the teacher's network):
    stored in each training state, and compared on resume when such a field changes. A signal of
    `run.preempt_signals` on any rank ends the run after the step in flight, with its training state, by
    raising `preemption.Preempted` (exit status 75) on every rank. A write that fails (a full disk) ends the
    run with `checkpoint.TrainingStateWriteError`, naming the newest complete training state, which is intact.
    """
    with preemption.SignalFlag(config.run.preempt_signals) as flag:
        try:
            return _training_loop(config, objective, model, preview, fingerprints, flag)
        except OSError as error:  # A full disk under another file of the run (metrics, a sample grid).
            if error.errno != errno.ENOSPC:
                raise
            raise checkpoint.write_failure(config.run.dir, error, f"to {config.run.dir}") from error


def _training_loop(config: TrainingConfig, objective: Objective, model: nn.Module, preview: Preview | None,
                   fingerprints: Mapping[str, str] | None, flag: preemption.SignalFlag) -> nn.Module:
    run, train = config.run, config.train
    dist.init(timeout=datetime.timedelta(minutes=run.timeout_minutes))
    rank, world_size, device = dist.rank(), dist.world_size(), dist.device()
    per_rank, micro = batch_plan(train, world_size)

    # Build the training state, then replace it with the newest checkpoint, if any.
    checkpoint.model_spec(model)  # Fail now, not at the first checkpoint, if the model cannot be saved.
    model.to(device).train()
    _apply_speed_options(model, train, device)
    optimizer = build_optimizer(model.parameters(), train)
    ema = phema.Averages(EMA(model, train.ema_rates), phema.PowerFunctionEMA(model, train.phema_stds))
    scaler = loss_scaler(train.precision, device)
    start_step, last_checkpoint, rng_restored, changes = resume.resume(config, model, ema, optimizer, scaler,
                                                                       fingerprints)
    if not rng_restored:
        seed_globals(train.seed, rank, start_step)
    if train.compile:
        # In place, after the EMA copies and before DDP: the EMAs stay plain modules, and the state_dict keys
        # stay those of the model (the `_orig_mod.` prefix belongs to the wrapper `torch.compile(model)` returns).
        model.compile()
    if rank == 0:
        fileio.atomic_write_text(to_json(config), fileio.join(run.dir, "config.json"))
        run_log.record_history(run.dir, start_step, last_checkpoint, changes, world_size, per_rank, micro)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    dist.print0(f"Training {type(model).__name__} ({sum(p.numel() for p in model.parameters()):,} parameters) "
                f"on {world_size} rank(s), {per_rank} samples per rank in micro-batches of {micro}, "
                f"steps {start_step} → {train.steps}, run folder {run.dir}")

    log = run_log.RunLog(run, train, start_step, active=rank == 0)
    for step in range(start_step, train.steps):
        done = step + 1
        for group in optimizer.param_groups:
            group["lr"] = lr_at(train, step)

        # Accumulate gradients: each rank's share of the global mean, synchronised on the last micro-batch.
        batch = _rank_share(objective, train.seed, step, per_rank, rank, device)
        loss_sum = torch.zeros((), device=device)
        parts = list(_micro_batches(batch, micro))
        for index, part in enumerate(parts):
            sync = contextlib.nullcontext() if index == len(parts) - 1 else ddp.no_sync()
            with sync:
                with _autocast(train, device):
                    losses = objective(ddp, part)
                losses = losses.float()
                if losses.shape != (micro,):
                    raise ValueError(f"the objective returned losses of shape {tuple(losses.shape)}; it must "
                                     f"return one loss per sample, shape ({micro},)")
                # DDP averages gradients over ranks, so each rank's term is its sum / per-rank batch.
                scaler.scale(losses.sum() / per_rank).backward()
            loss_sum += losses.detach().sum()
        # One all-reduce per step carries the loss, the number of ranks that received a preemption signal and
        # fp16's overflow flag (the gradients are unscaled first, which checks them for inf and NaN).
        # torch.full fills on the device; torch.tensor would copy a host value there (a sync on CUDA).
        scaler.unscale_(optimizer)
        signalled = torch.full((), float(flag.received is not None), device=device)
        totals = dist.all_reduce_sum(torch.stack([loss_sum, signalled, _overflow(scaler, optimizer, device)]))
        loss_total, signalled_ranks, overflows = totals.tolist()  # The step's one device-to-host copy.
        loss, stop, skipped = loss_total / world_size / per_rank, signalled_ranks > 0, overflows > 0
        if not math.isfinite(loss):
            where = last_checkpoint or "none was written"
            raise NonFiniteLossError(f"non-finite loss ({loss}) at step {step} (counting from 0), before its update; "
                                     f"nothing was written. Last good checkpoint: {where}")

        # Update the weights (a loss-scaling overflow skips the step, as GradScaler.step would, without its own
        # read-back of the flag) and the averages.
        if train.grad_clip is None:
            grad_norm = _grad_norm(model)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        if not skipped:
            optimizer.step()
        scaler.update()  # Backs the scale off after an overflow, grows it after enough steps without one.
        optimizer.zero_grad(set_to_none=True)
        ema.update(model, nimg=done * train.batch, batch=train.batch, skipped=skipped)
        log.step(loss, grad_norm.detach(), skipped)  # Summed on the device, read back at the log record.

        # Periodic work: consistency check, log, sample grid, checkpoint.
        if run.sync_check_every and done % run.sync_check_every == 0:
            _check_ranks_agree(model, done)
        if done % run.log_every == 0 or done == train.steps:
            scale = scaler.get_scale() if scaler.is_enabled() else None  # read back here only: a sync on CUDA
            log.record(done, optimizer.param_groups[0]["lr"], scale)
        if preview is not None and run.image_every and done % run.image_every == 0 and rank == 0:
            _write_preview(preview, model, fileio.join(run.dir, f"samples-{done:08d}.png"))
        preempted = stop and done < train.steps
        if run.snapshot_every and (done % run.snapshot_every == 0 or done == train.steps):
            checkpoint.save_snapshot(config, done, model, ema)
        if done % run.checkpoint_every == 0 or done == train.steps or preempted:
            last_checkpoint = checkpoint.save(config, done, model, ema, optimizer, scaler, fingerprints)
            log.plot()
        if preempted:
            log.close()
            who = flag.received or "a signal on another rank"
            dist.print0(f"Preempted ({who}) after step {done}: {last_checkpoint} is complete. Exiting with status "
                        f"{preemption.PREEMPTED_EXIT_CODE}; re-run the same command to resume")
            raise preemption.Preempted()
    log.close()
    return model


@torch.no_grad()
def _write_preview(preview: Preview, model: nn.Module, path: str) -> None:
    model.eval()
    try:
        images.write_tiled(preview(model), path)
    finally:
        model.train()
