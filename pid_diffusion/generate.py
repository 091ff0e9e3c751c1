"""Images from a PID student (one network call) or an EDM teacher (Heun, Euler), as EDM's `generate.py`
makes them; `pid-sample` and `pid-fid` are thin command lines over this module.

Every image has its own seed (as in EDM's generate.py): latent k is drawn from a generator seeded with seed k, then,
for a conditional model without given classes, its class from the same generator. Ranks take
`seeds[rank::world_size]`, so image k is the same whatever the number of ranks, and whatever the batch size
up to the last bits of the network's batched float arithmetic (a rare uint8 value may move by one level).
The generators live on the sampling device, as in EDM, so on a GPU a teacher reproduces EDM's own images.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pid_diffusion.user_error import OptionError
from pid_diffusion import encoders, samplers
from pid_diffusion.utils import dist
from pid_diffusion.dode import DODESampler
from pid_diffusion.networks import one_hot
from pid_diffusion.student import PIDStudent

__all__ = ["Batch", "Preview", "SamplerKind", "gather_rows", "generate", "sampler_for", "sampler_preview",
           "seeded_inputs"]

EDM2_SAMPLED = ("Precond", "GuidedDenoiser")  # networks EDM2's generator samples: 32 Heun steps by default
_SEED_MODULUS = 1 << 32  # torch generators take 64-bit seeds; EDM reduces seeds modulo 2^32


class SamplerKind(enum.Enum):
    """How images are drawn from the network."""

    ONE_STEP = "onestep"  # PID student: x_θ(T z, ε)
    HEUN = "heun"  # teacher: EDM's deterministic Heun sampler (docs/edm_formats.md §4)
    EULER = "euler"  # teacher: explicit Euler on PID's Karras grid (the PID ceiling, docs/method.md §6)


def sampler_for(network: str, kind: SamplerKind | None = None, steps: int | None = None,
                sampler_file: str | None = None) -> samplers.Sampler:
    """The sampler for a network known by its class name (`type(net).__name__`, or a snapshot's model_spec
    before its weights are read): a PID student samples in one step, a denoiser with Heun, Euler or the D-ODE
    sampler in `sampler_file` (written by pid-fit-dode).

    `kind` None picks the network's natural sampler; `steps` None keeps the sampler's default (Heun: EDM's
    18 Karras steps, EDM2's 32 for EDM2 and guided teachers; Euler: the points of PID's grid).
    """
    is_student = network == PIDStudent.__name__
    if sampler_file is not None:
        if kind is not None or steps is not None:
            raise OptionError("--sampler-file holds its solver and steps: drop --sampler and --steps")
        if is_student:
            raise OptionError(f"{sampler_file} is a D-ODE sampler for a denoiser; a PID student samples in one "
                             "step: drop --sampler-file")
        return DODESampler.load(sampler_file)
    kind = kind or (SamplerKind.ONE_STEP if is_student else SamplerKind.HEUN)
    if (kind is SamplerKind.ONE_STEP) != is_student:
        network = "a PID student" if is_student else f"a denoiser ({network})"
        usable = "onestep" if is_student else "heun or euler"
        raise OptionError(f"sampler {kind.value} cannot sample {network}; use {usable}")
    if kind is SamplerKind.ONE_STEP:
        if steps is not None:
            raise OptionError("a number of steps does not apply to the one-step sampler; leave steps unset")
        return samplers.OneStepSampler()
    if kind is SamplerKind.HEUN:
        steps = steps or (samplers.EDM2_HEUN_STEPS if network in EDM2_SAMPLED else samplers.HeunSampler.num_steps)
        return samplers.HeunSampler(num_steps=steps)
    return samplers.EulerSampler.on_grid() if steps is None else samplers.EulerSampler.on_grid(num_points=steps)


@dataclass(frozen=True)
class Batch:
    """Generated images with their place in the seed list."""

    positions: torch.Tensor  # int64 [n]: index of each image in the seed list
    seeds: torch.Tensor  # int64 [n]
    images: torch.Tensor  # uint8 [n, H, W, C], on the sampling device
    labels: torch.Tensor | None  # int64 [n] class indices; None for an unconditional model


def seeded_inputs(net: nn.Module, seeds: Sequence[int], device: torch.device | str,
                  classes: Sequence[int] | None = None, positions: Sequence[int] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The network inputs of `seeds`, the one path from seeds to latents: latent k ~ N(0, I) [C, H, W] from a
    generator on `device` seeded with seeds[k], then, for a conditional `net`, its class index from the same
    generator (EDM's StackedRandomGenerator), or `classes[positions[k] % len(classes)]` when classes are given
    (`positions`: the seeds' places in the whole seed list, default 0, 1, 2, …). Returns (latents [n, C, H, W],
    class indices [n] or None); `networks.one_hot` turns the classes into the networks' labels."""
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    positions = range(len(seeds)) if positions is None else positions
    latents, labels = [], []
    for seed, position in zip(seeds, positions):
        generator = torch.Generator(device).manual_seed(seed % _SEED_MODULUS)
        latents.append(torch.randn(shape, generator=generator, device=device))
        if net.label_dim and classes is None:
            labels.append(torch.randint(net.label_dim, size=[], generator=generator, device=device))
        elif net.label_dim:
            # Filled on the device: torch.tensor would copy a host value there (a sync on CUDA).
            labels.append(torch.full((), classes[position % len(classes)], dtype=torch.int64, device=device))
    return torch.stack(latents), (torch.stack(labels) if labels else None)


@torch.no_grad()
def generate(net: nn.Module, sampler: samplers.Sampler, seeds: Sequence[int], *, batch_size: int,
             classes: Sequence[int] | None = None, device: torch.device | None = None,
             decode: encoders.ImageDecoder | None = None) -> Iterator[Batch]:
    """This rank's images, `seeds[rank::world_size]`, in batches of at most `batch_size`; a latent network's
    samples are decoded by `decode` (default: an `ImageDecoder` of `net.encoder`, made here)."""
    if batch_size < 1:
        raise OptionError(f"batch_size must be positive, got {batch_size}")
    if classes is not None:
        if not net.label_dim:
            raise OptionError("--classes was given but the model is unconditional (label_dim = 0): drop --classes")
        if not classes or not all(0 <= c < net.label_dim for c in classes):
            raise OptionError(f"classes must be a non-empty list in [0, {net.label_dim}), got {list(classes)}")
    device = device or dist.device()
    seed_list = torch.as_tensor(list(seeds), dtype=torch.int64)
    positions = torch.arange(dist.rank(), len(seed_list), dist.world_size())
    decode = decode or encoders.ImageDecoder(getattr(net, "encoder", None), device)
    for chunk in positions.split(batch_size):
        latents, labels = seeded_inputs(net, seed_list[chunk].tolist(), device, classes, chunk.tolist())
        images = decode(sampler(net, latents, None if labels is None else one_hot(labels, net.label_dim)))
        yield Batch(chunk, seed_list[chunk], images, labels)


def gather_rows(local: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Every rank's rows in seed order, on every rank, when rank r holds positions r, r + W, r + 2W, ... of
    `num_rows` (the positions `generate` gives it). Call on every rank, even one that holds no rows."""
    shards = dist.all_gather_tensors(local)
    world = len(shards)
    rows = local.new_empty((num_rows, *local.shape[1:]))
    for rank, shard in enumerate(shards):
        expected = len(range(rank, num_rows, world))
        if len(shard) != expected:
            raise ValueError(f"rank {rank} holds {len(shard)} rows; positions {rank}, {rank + world}, ... of "
                             f"{num_rows} are {expected}: gather what `generate` gave each rank")
        rows[rank::world] = shard
    return rows


Preview = Callable[[nn.Module], torch.Tensor]  # model -> images in [−1, 1] from fixed noise, for sample grids.


def sampler_preview(sampler: Callable, net: nn.Module, count: int, seed: int, device: torch.device) -> Preview:
    """A `Preview` that runs `sampler` on the latents of seeds `seed`, …, `seed + count − 1`, classes cycling
    0, 1, 2, …

    `net` gives the image shape and label count; the preview may then be called on any model of that shape.
    """
    classes = range(net.label_dim) if net.label_dim else None
    latents, labels = seeded_inputs(net, range(seed, seed + count), device, classes)
    labels = None if labels is None else one_hot(labels, net.label_dim)
    return lambda model: sampler(model, latents, labels)  # pixels are clipped when quantised, latents decoded
