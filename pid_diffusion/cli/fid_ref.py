"""pid-fid-ref: reference statistics (mu, sigma of the Inception features) of a data set, in EDM's format.

The data: a folder of images (searched recursively), a zip of images (EDM's `dataset_tool.py` output), or
an npz of uint8 NHWC images under `images` (pid-sample's files) or `arr_0` (openai's sample files). Images
are taken in sorted name order, as EDM's `ImageFolderDataset` takes them; `--num-images N` selects N of them
as EDM's `fid.py` does (an error if there are fewer, a subset by a shuffle seeded with `--seed` if more).
Ranks share the images; rank 0 writes `--dest` (an npz with float64 `mu`, `sigma`), atomically.
`--compare A B` prints the FID between two statistics files (EDM's `fid.py ref` output, or this command's).

    pid-fid-ref --data cifar10-32x32.zip --dest cifar10-32x32.npz
    pid-fid-ref --data shapes --dest fid-refs/shapes-16x16.npz     # the bundled teacher's data set, drawn here
    pid-fid-ref --data samples/ --num-images 50000 --dest samples-stats.npz
    pid-fid-ref --compare samples-stats.npz cifar10-32x32.npz
"""

from __future__ import annotations

from collections.abc import Sequence

from pid_diffusion.utils import dist
from pid_diffusion.cli import errors, options
from pid_diffusion.evaluation import reference_statistics
from pid_diffusion.fid import fid_from_stats, load_reference, save_reference
from pid_diffusion.image_sources import edm_subset, open_images
from pid_diffusion.inception import load_detector


def build_parser():
    parser = options.parser("pid-fid-ref", __doc__)
    task = parser.add_mutually_exclusive_group(required=True)
    task.add_argument("--data", help="folder, .zip or .npz of images, or 'shapes': the bundled teacher's data set, "
                                     "drawn here (with --dest)")
    task.add_argument("--compare", nargs=2, metavar=("A", "B"), help="print the FID between two statistics files")
    parser.add_argument("--dest", help="output .npz with mu and sigma")
    parser.add_argument("--num-images", type=int, help="measure exactly this many images (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --num-images subset (default 0)")
    parser.add_argument("--batch", type=int, default=64, help="images per rank and batch (default 64)")
    parser.add_argument("--detector", help="inception-2015-12-05.pt (default: the torch hub cache)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    with dist.abort_on_error(), errors.reported("pid-fid-ref"):
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.compare:
            if args.dest:
                parser.error("--dest applies to --data; --compare writes nothing")
            print(f"FID {fid_from_stats(*load_reference(args.compare[0]), *load_reference(args.compare[1])):.4f}  "
                  f"({args.compare[0]} against {args.compare[1]})")
            return
        if not args.dest:
            parser.error("--data needs --dest, the statistics file to write")
        if args.batch < 1 or (args.num_images is not None and args.num_images < 2):
            parser.error("--batch must be positive and --num-images at least 2")
        dist.init()
        source = open_images(args.data)
        indices = edm_subset(len(source), args.num_images, args.seed)
        detector = load_detector(args.detector, dist.device())
        dist.print0(f"{len(indices)} images of {args.data}, {dist.world_size()} rank(s)")
        mu, sigma = reference_statistics(source, detector, args.batch, indices)
        if dist.rank() == 0:
            save_reference(args.dest, mu, sigma)
        dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main()
