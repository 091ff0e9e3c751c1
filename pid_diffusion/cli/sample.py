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
    pid-sample --checkpoint run --seeds 0-63 --grid grid.png      # the run folder's newest file that loads
    pid-sample --teacher edm-cifar10-32x32-uncond-vp.pkl --sampler heun --steps 18 --seeds 0-63 --grid t.png
    pid-sample --checkpoint pid_cifar.pt --preset edm-cifar10-32x32-uncond-vp --seeds 0-63 --grid official.png
    mpirun -np 8 pid-sample --checkpoint ... --seeds 0-49999 --batch 500 --npz samples.npz
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from pid_diffusion import encoders
from pid_diffusion import images as image_io
from pid_diffusion.utils import dist, fileio, preemption
from pid_diffusion.cli import errors, options
from pid_diffusion.generate import Batch, gather_rows, generate


def write_pngs(batch: Batch, folder: str) -> None:
    """One PNG per image, `<seed:06d>.png` (EDM's names), each written atomically."""
    for seed, image in zip(batch.seeds.tolist(), batch.images.cpu().numpy()):
        image_io.write_png(image, fileio.join(folder, f"{seed:06d}.png"))


def build_parser():
    parser = options.parser("pid-sample", __doc__)
    options.add_model_arguments(parser)
    options.add_sampler_arguments(parser)
    parser.add_argument("--seeds", type=options.parse_int_list, default=options.parse_int_list("0-63"),
                        help="one image per seed, e.g. 0-63 or 1,2,5-10 (default 0-63)")
    parser.add_argument("--classes", type=options.parse_int_list,
                        help="class of image k: classes[k mod len] (default: drawn from image k's generator)")
    parser.add_argument("--batch", type=int, default=64, help="images per rank and network call (default 64)")
    parser.add_argument("--grid", help="PNG grid of all images, in seed order")
    parser.add_argument("--grid-cols", type=int, help="images per grid row (default ceil(sqrt(N)))")
    parser.add_argument("--npz", help="npz with images (uint8 NHWC), seeds, and labels for conditional models")
    parser.add_argument("--png-dir", help="folder for one PNG per image, <seed:06d>.png")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    stop = preemption.StopAtOnce(preemption.STOP_SIGNALS, "pid-sample")  # Ctrl-C, a launcher's stop: status 75
    with dist.abort_on_error(), errors.reported("pid-sample"), stop:
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
        net = options.load_model(args, device)
        sampler = options.sampler_from_args(args, type(net).__name__)
        dist.print0(f"{len(args.seeds)} images, {sampler.num_network_calls} network call(s) each, "
                    f"{dist.world_size()} rank(s)")
        decode = encoders.ImageDecoder(getattr(net, "encoder", None), device)  # latents: the VAE's decoder
        image_shape = decode.image_shape(net.img_channels, net.img_resolution)
        # Start from empty tensors: a rank may get no seeds, yet takes part in the gather.
        images = [torch.empty((0, *image_shape), dtype=torch.uint8, device=device)]
        labels = [torch.empty(0, dtype=torch.int64, device=device)]
        for batch in generate(net, sampler, args.seeds, batch_size=args.batch, classes=args.classes,
                              device=device, decode=decode):
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
                image_io.write_png(image_io.tile(images, columns), args.grid)
            if args.npz:
                extra = {} if labels is None else dict(labels=labels.cpu().numpy())
                image_io.write_npz(args.npz, images=images, seeds=np.asarray(args.seeds, dtype=np.int64), **extra)
        dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main()
