"""pid-sample: images from a PID student (one network call) or an EDM teacher (Heun, Euler), as EDM's
`generate.py` makes them (`pid_diffusion.generate`).

Every image has its own seed: latent k, and without `--classes` its class, come from a generator seeded
with seed k, so image k is the same whatever the number of ranks and, up to the last bits of the network's
batched arithmetic, the batch size.

Outputs (rank 0 writes each atomically, `--png-dir` images excepted: each rank writes its own):
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
import io
import math
import re
from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
from torch import nn

from pid_diffusion import checkpoint, dist, fileio, samplers
from pid_diffusion.cli import errors
from pid_diffusion.cli.errors import UserError
from pid_diffusion.dode import DODESampler
from pid_diffusion.generate import Batch, SamplerKind, gather_rows, generate, make_sampler
from pid_diffusion.student import PIDStudent
from pid_diffusion.teacher import load_teacher

__all__ = ["add_model_arguments", "add_sampler_arguments", "load_model", "main", "parse_int_list",
           "sampler_from_args"]

_RANGE = re.compile(r"^(\d+)-(\d+)$")


# ----------------------------------------------------------------------------------------------------------
# Seeds, models and samplers: the command-line options.

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
    parser.add_argument("--sampler-file", metavar="PATH",
                        help="a D-ODE sampler written by pid-fit-dode, for a denoiser (instead of --sampler/--steps)")


def sampler_from_args(args: argparse.Namespace, net: nn.Module) -> samplers.Sampler:
    """The sampler add_sampler_arguments' options name for `net`: a D-ODE file, or make_sampler's choice."""
    if args.sampler_file is None:
        return make_sampler(args.sampler, args.steps, net)
    if args.sampler is not None or args.steps is not None:
        raise UserError("--sampler-file holds its solver and steps: drop --sampler and --steps")
    if isinstance(net, PIDStudent):
        raise UserError(f"{args.sampler_file} is a D-ODE sampler for a denoiser; a PID student samples in one "
                        "step: drop --sampler-file")
    return DODESampler.load(args.sampler_file)


def load_model(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The network named by add_model_arguments' options, in eval mode on `device`."""
    if args.teacher is not None:
        if args.ema is not None:
            raise ValueError("--ema applies to a training checkpoint; a teacher file holds one network")
        return load_teacher(args.teacher, preset=args.preset, device=device)
    if args.preset is not None:
        raise ValueError("--preset names a teacher state dict's architecture; a checkpoint records its own")
    return checkpoint.load_generator(args.checkpoint, ema_rate=args.ema, device=device)


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
    with dist.abort_on_error(), errors.reported("pid-sample"):
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
        device = dist.device()
        net = load_model(args, device)
        sampler = sampler_from_args(args, net)
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
