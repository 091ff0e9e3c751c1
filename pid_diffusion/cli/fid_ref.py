"""pid-fid-ref: reference statistics (mu, sigma of the Inception features) of a data set, in EDM's format, or
with --fd-dinov2 also of DINOv2's features, in EDM2's format.

The data: a folder of images (searched recursively), a zip of images (EDM's `dataset_tool.py` output), or
an npz of uint8 NHWC images under `images` (pid-sample's files) or `arr_0` (openai's sample files). Images
are taken in sorted name order, as EDM's `ImageFolderDataset` takes them; `--num-images N` selects N of them
as EDM's `fid.py` does (an error if there are fewer, a subset by a shuffle seeded with `--seed` if more).
Ranks share the images; rank 0 writes `--dest` atomically: a `.npz` is EDM's format (float64 `mu`, `sigma`),
a `.pkl` EDM2's (`dict(num_images, fid=dict(mu, sigma), fd_dinov2=dict(mu, sigma))`, as EDM2's
`calculate_metrics.py ref` writes it; `fd_dinov2` with --fd-dinov2, which needs the DINOv2 weights in torch hub's
cache). `--compare A B` prints the FID (and FD_DINOv2 where both have it) between two statistics files of
either format.

    pid-fid-ref --data cifar10-32x32.zip --dest cifar10-32x32.npz
    pid-fid-ref --data shapes --dest fid-refs/shapes-16x16.npz     # the bundled teacher's data set, drawn here
    pid-fid-ref --data samples/ --num-images 50000 --dest samples-stats.npz
    pid-fid-ref --compare samples-stats.npz cifar10-32x32.npz
    pid-fid-ref --data img64.zip --fd-dinov2 --dest img64.pkl
"""

from __future__ import annotations

from collections.abc import Sequence

from pid_diffusion.utils import dist
from pid_diffusion.cli import errors, options
from pid_diffusion.dinov2 import load_dinov2
from pid_diffusion.evaluation import reference_statistics
from pid_diffusion.fid import fid_from_stats
from pid_diffusion.image_sources import edm_subset, open_images
from pid_diffusion.inception import load_detector
from pid_diffusion.reference_stats import load_stats, save_stats


def build_parser():
    parser = options.parser("pid-fid-ref", __doc__)
    task = parser.add_mutually_exclusive_group(required=True)
    task.add_argument("--data", help="folder, .zip or .npz of images, or 'shapes': the bundled teacher's data set, "
                                     "drawn here (with --dest)")
    task.add_argument("--compare", nargs=2, metavar=("A", "B"), help="print the FID between two statistics files")
    parser.add_argument("--dest", help="output: .npz (EDM: mu and sigma) or .pkl (EDM2: fid and fd_dinov2)")
    parser.add_argument("--num-images", type=int, help="measure exactly this many images (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --num-images subset (default 0)")
    parser.add_argument("--batch", type=int, default=64, help="images per rank and batch (default 64)")
    parser.add_argument("--detector", help="inception-2015-12-05.pt (default: the torch hub cache)")
    parser.add_argument("--fd-dinov2", action="store_true", help="also DINOv2's statistics (FD_DINOv2; a .pkl --dest)")
    parser.add_argument("--dinov2", help="with --fd-dinov2: dinov2_vitl14_pretrain.pth (default: the torch hub cache)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    with dist.abort_on_error(), errors.reported("pid-fid-ref"):
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.compare:
            if args.dest:
                parser.error("--dest applies to --data; --compare writes nothing")
            first, second = (load_stats(path) for path in args.compare)
            fd = ""
            if first.fd_dinov2 is not None and second.fd_dinov2 is not None:
                fd = f"  FD_DINOv2 {fid_from_stats(*first.fd_dinov2, *second.fd_dinov2):.4f}"
            print(f"FID {fid_from_stats(*first.fid, *second.fid):.4f}{fd}  ({args.compare[0]} against {args.compare[1]})")
            return
        if not args.dest:
            parser.error("--data needs --dest, the statistics file to write")
        if args.fd_dinov2 and not args.dest.endswith(".pkl"):
            parser.error("--fd-dinov2 writes EDM2's format: name a .pkl --dest (EDM's .npz holds FID's statistics only)")
        if args.dinov2 and not args.fd_dinov2:
            parser.error("--dinov2 names the weights of --fd-dinov2")
        if args.batch < 1 or (args.num_images is not None and args.num_images < 2):
            parser.error("--batch must be positive and --num-images at least 2")
        dist.init()
        source = open_images(args.data)
        indices = edm_subset(len(source), args.num_images, args.seed)
        detector = load_detector(args.detector, dist.device())
        dinov2 = load_dinov2(args.dinov2, dist.device()) if args.fd_dinov2 else None
        dist.print0(f"{len(indices)} images of {args.data}, {dist.world_size()} rank(s)")
        stats = reference_statistics(source, detector, args.batch, indices, dinov2=dinov2)
        if dist.rank() == 0:
            save_stats(args.dest, stats)
        dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main()
