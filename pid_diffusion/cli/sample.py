"""pid-sample: images from a PID student (one network call) or an EDM teacher (Heun, Euler), as EDM's
`generate.py` makes them.

Every image has its own seed (STYLE.md habit 6): latent k is drawn from a generator seeded with seed k, then,
for a conditional model without `--classes`, its class from the same generator. Ranks take
`seeds[rank::world_size]`, so image k is the same whatever the number of ranks, and whatever the batch size
up to the last bits of the network's batched float arithmetic (a rare uint8 value may move by one level).
The generators live on the sampling device, as in EDM, so on a GPU a teacher reproduces EDM's own images.

Outputs (rank 0 gathers and writes each atomically; `--png-dir` images are written by their own rank):
  --grid PATH     one PNG with the images in seed order, `--grid-cols` per row;
  --npz PATH      `images` uint8 [N, H, W, C] (the layout of openai's `arr_0`), `seeds` int64 [N], and for a
                  conditional model `labels` int64 [N] (class indices);
  --png-dir DIR   one PNG per image, named `<seed:06d>.png`.

    pid-sample --checkpoint run/checkpoint-00800000.pt --ema 0.9999 --seeds 0-63 --grid grid.png
    pid-sample --teacher edm-cifar10-32x32-uncond-vp.pkl --sampler heun --steps 18 --seeds 0-63 --grid t.png
    mpirun -np 8 pid-sample --checkpoint ... --seeds 0-49999 --batch 500 --npz samples.npz
"""

from __future__ import annotations

import argparse
import enum
import io
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.distributed as torch_dist
from torch import nn

from pid_diffusion import checkpoint, dist, fileio, samplers
from pid_diffusion.student import PIDStudent
from pid_diffusion.teacher import load_teacher

__all__ = [
    "Batch",
    "SamplerKind",
    "add_model_arguments",
    "add_sampler_arguments",
    "gather_rows",
    "generate",
    "load_model",
    "make_sampler",
    "main",
    "parse_int_list",
]

_SEED_MODULUS = 1 << 32  # torch generators take 64-bit seeds; EDM reduces seeds modulo 2^32
_RANGE = re.compile(r"^(\d+)-(\d+)$")


class SamplerKind(enum.Enum):
    """How images are drawn from the network."""

    ONE_STEP = "onestep"  # PID student: x_θ(T z, ε)
    HEUN = "heun"  # teacher: EDM's deterministic Heun sampler (EDM.md §4)
    EULER = "euler"  # teacher: explicit Euler on PID's Karras grid (the PID ceiling, PID.md §6)


# ----------------------------------------------------------------------------------------------------------
# Seeds, models and samplers.

def parse_int_list(text: str) -> list[int]:
    """EDM's integer lists: '0-63' or '1,2,5-10' (ranges inclusive)."""
    values = []
    for part in text.split(","):
        match = _RANGE.match(part)
        if match and int(match[1]) <= int(match[2]):
            values.extend(range(int(match[1]), int(match[2]) + 1))
        elif part.isdigit():
            values.append(int(part))
        else:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a list of non-negative integers and ranges such as '0-63' or '1,2,5-10'")
    return values


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint/--ema or --teacher/--preset: where the network comes from."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="training checkpoint (a PID student or an EDM network)")
    source.add_argument("--teacher", help="teacher: EDM .pkl, converted teacher .pt, or a state dict with --preset")
    parser.add_argument("--ema", type=float, help="EMA rate to sample from, e.g. 0.9999 (default: the trained weights)")
    parser.add_argument("--preset", help="EDM preset naming a plain state dict's architecture (--teacher only)")


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    """--sampler/--steps: how the network is sampled."""
    parser.add_argument("--sampler", type=SamplerKind, choices=list(SamplerKind), metavar="{onestep,heun,euler}",
                        help="default: onestep for a PID student, heun for a denoiser")
    parser.add_argument("--steps", type=int,
                        help="heun: Karras steps (EDM default 18); euler: points of PID's grid (default 250)")


def load_model(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The network named by add_model_arguments' options, in eval mode on `device`."""
    if args.teacher is not None:
        if args.ema is not None:
            raise ValueError("--ema applies to a training checkpoint; a teacher file holds one network")
        return load_teacher(args.teacher, preset=args.preset, device=device)
    if args.preset is not None:
        raise ValueError("--preset names a teacher state dict's architecture; a checkpoint records its own")
    return checkpoint.load_generator(args.checkpoint, ema_rate=args.ema, device=device)


def make_sampler(kind: SamplerKind | None, steps: int | None, net: nn.Module) -> samplers.Sampler:
    """The sampler for `net`: a student samples in one step, a denoiser with Heun or Euler."""
    is_student = isinstance(net, PIDStudent)
    kind = kind or (SamplerKind.ONE_STEP if is_student else SamplerKind.HEUN)
    if (kind is SamplerKind.ONE_STEP) != is_student:
        network = "a PID student" if is_student else f"a denoiser ({type(net).__name__})"
        usable = "onestep" if is_student else "heun or euler"
        raise ValueError(f"--sampler {kind.value} cannot sample {network}; use {usable}")
    if kind is SamplerKind.ONE_STEP:
        if steps is not None:
            raise ValueError("--steps does not apply to the one-step sampler")
        return samplers.OneStepSampler()
    if kind is SamplerKind.HEUN:
        return samplers.HeunSampler() if steps is None else samplers.HeunSampler(num_steps=steps)
    return samplers.EulerSampler.on_grid() if steps is None else samplers.EulerSampler.on_grid(num_points=steps)


# ----------------------------------------------------------------------------------------------------------
# Generation.

@dataclass(frozen=True)
class Batch:
    """Generated images with their place in the seed list."""

    positions: torch.Tensor  # int64 [n]: index of each image in the seed list
    seeds: torch.Tensor  # int64 [n]
    images: torch.Tensor  # uint8 [n, H, W, C], on the sampling device
    labels: torch.Tensor | None  # int64 [n] class indices; None for an unconditional model


def _latents_and_labels(net: nn.Module, seeds: torch.Tensor, classes: Sequence[int] | None,
                        positions: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Latent k ~ N(0, I) from a generator seeded with seed k, then its class from the same generator
    (EDM's StackedRandomGenerator), or `classes[position % len(classes)]` when classes are given."""
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    latents, labels = [], []
    for seed, position in zip(seeds.tolist(), positions.tolist()):
        generator = torch.Generator(device).manual_seed(seed % _SEED_MODULUS)
        latents.append(torch.randn(shape, generator=generator, device=device))
        if net.label_dim and classes is None:
            labels.append(torch.randint(net.label_dim, size=[], generator=generator, device=device))
        elif net.label_dim:
            labels.append(torch.tensor(classes[position % len(classes)], device=device))
    return torch.stack(latents), (torch.stack(labels) if labels else None)


@torch.no_grad()
def generate(net: nn.Module, sampler: samplers.Sampler, seeds: Sequence[int], *, batch_size: int,
             classes: Sequence[int] | None = None, device: torch.device | None = None) -> Iterator[Batch]:
    """This rank's images, `seeds[rank::world_size]`, in batches of at most `batch_size`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if classes is not None:
        if not net.label_dim:
            raise ValueError("classes were given but the model is unconditional (label_dim = 0)")
        if not classes or not all(0 <= c < net.label_dim for c in classes):
            raise ValueError(f"classes must be a non-empty list in [0, {net.label_dim}), got {list(classes)}")
    device = device or dist.device()
    seed_list = torch.as_tensor(list(seeds), dtype=torch.int64)
    positions = torch.arange(dist.rank(), len(seed_list), dist.world_size())
    for chunk in positions.split(batch_size):
        latents, labels = _latents_and_labels(net, seed_list[chunk], classes, chunk, device)
        one_hot = None if labels is None else nn.functional.one_hot(labels, net.label_dim).to(torch.float32)
        images = samplers.to_uint8(sampler(net, latents, one_hot))
        yield Batch(chunk, seed_list[chunk], images, labels)


def gather_rows(local: torch.Tensor, num_rows: int) -> torch.Tensor | None:
    """Every rank's rows in seed order on rank 0 (None on the others), when rank r holds positions r, r + W,
    r + 2W, ... of `num_rows`: an all-gather of shards padded to ceil(N / W) rows, then interleaved."""
    world = dist.world_size()
    if world == 1:
        return local
    shard_rows = math.ceil(num_rows / world)
    padded = local.new_zeros((shard_rows, *local.shape[1:]))
    padded[: len(local)] = local
    shards = [torch.empty_like(padded) for _ in range(world)]
    torch_dist.all_gather(shards, padded)
    if dist.rank() != 0:
        return None
    # Row j of rank r is position j W + r; padding lands at positions >= N and is cut off.
    return torch.stack(shards, dim=1).reshape(shard_rows * world, *local.shape[1:])[:num_rows]


# ----------------------------------------------------------------------------------------------------------
# Output.

def image_grid(images: np.ndarray, columns: int) -> PIL.Image.Image:
    """uint8 [N, H, W, C] images tiled row by row, `columns` per row (the last row padded with black)."""
    num, height, width, channels = images.shape
    rows = math.ceil(num / columns)
    canvas = np.zeros((rows * columns, height, width, channels), dtype=np.uint8)
    canvas[:num] = images
    canvas = canvas.reshape(rows, columns, height, width, channels).transpose(0, 2, 1, 3, 4)
    canvas = canvas.reshape(rows * height, columns * width, channels)
    return PIL.Image.fromarray(canvas[:, :, 0] if channels == 1 else canvas)


def _png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_pngs(batch: Batch, folder: str) -> None:
    """One PNG per image, `<seed:06d>.png` (EDM's names), each written atomically."""
    for seed, image in zip(batch.seeds.tolist(), batch.images.cpu().numpy()):
        pil = PIL.Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
        fileio.atomic_write_bytes(_png_bytes(pil), fileio.join(folder, f"{seed:06d}.png"))


def write_npz(path: str, images: np.ndarray, seeds: np.ndarray, labels: np.ndarray | None) -> None:
    """`images` uint8 NHWC, `seeds`, and `labels` for a conditional model, atomically."""
    arrays = dict(images=images, seeds=seeds) | ({} if labels is None else dict(labels=labels))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    fileio.atomic_write_bytes(buffer.getvalue(), path)


# ----------------------------------------------------------------------------------------------------------
# Command line.

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pid-sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_sampler_arguments(parser)
    parser.add_argument("--seeds", type=parse_int_list, default=parse_int_list("0-63"),
                        help="one image per seed, e.g. 0-63 or 1,2,5-10 (default 0-63)")
    parser.add_argument("--classes", type=parse_int_list,
                        help="class of image k: classes[k mod len] (default: drawn from image k's generator)")
    parser.add_argument("--batch", type=int, default=64, help="images per rank and network call (default 64)")
    parser.add_argument("--grid", help="PNG grid of all images, in seed order")
    parser.add_argument("--grid-cols", type=int, help="images per grid row (default ceil(sqrt(N)))")
    parser.add_argument("--npz", help="npz with images (uint8 NHWC), seeds, and labels for conditional models")
    parser.add_argument("--png-dir", help="folder for one PNG per image, <seed:06d>.png")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.grid or args.npz or args.png_dir):
        parser.error("nothing to write: give --grid, --npz and/or --png-dir")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds lists a seed twice; every image needs its own seed")
    if args.batch < 1 or (args.grid_cols is not None and args.grid_cols < 1):
        parser.error("--batch and --grid-cols must be positive")
    columns = args.grid_cols or math.ceil(math.sqrt(len(args.seeds)))
    dist.init()
    with dist.abort_on_error():
        device = dist.device()
        net = load_model(args, device)
        sampler = make_sampler(args.sampler, args.steps, net)
        dist.print0(f"{len(args.seeds)} images, {sampler.num_network_calls} network call(s) each, "
                    f"{dist.world_size()} rank(s)")
        image_shape = (net.img_resolution, net.img_resolution, net.img_channels)
        # Start from empty tensors: a rank may get no seeds, yet takes part in the gather.
        images = [torch.empty((0, *image_shape), dtype=torch.uint8, device=device)]
        labels = [torch.empty(0, dtype=torch.int64, device=device)]
        for batch in generate(net, sampler, args.seeds, batch_size=args.batch, classes=args.classes,
                              device=device):
            if args.png_dir:
                write_pngs(batch, args.png_dir)
            images.append(batch.images)
            if batch.labels is not None:
                labels.append(batch.labels)
        images = gather_rows(torch.cat(images), len(args.seeds))
        labels = gather_rows(torch.cat(labels), len(args.seeds)) if net.label_dim else None
        if dist.rank() == 0:
            images = images.cpu().numpy()
            if args.grid:
                fileio.atomic_write_bytes(_png_bytes(image_grid(images, columns)), args.grid)
            if args.npz:
                write_npz(args.npz, images, np.asarray(args.seeds, dtype=np.int64),
                          None if labels is None else labels.cpu().numpy())
        dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main()
