"""pid-fid-ref: reference statistics (mu, sigma of the Inception features) of a data set, in EDM's format.

The data: a folder of images (searched recursively), a zip of images (EDM's `dataset_tool.py` output), or
an npz of uint8 NHWC images under `images` (pid-sample's files) or `arr_0` (openai's sample files). Images
are taken in sorted name order, as EDM's `ImageFolderDataset` takes them; `--num-images N` selects N of them
as EDM's `fid.py` does (an error if there are fewer, a subset by a shuffle seeded with `--seed` if more).
Ranks share the images; rank 0 writes `--dest` (an npz with float64 `mu`, `sigma`), atomically.

    pid-fid-ref --data cifar10-32x32.zip --dest cifar10-32x32.npz
    pid-fid-ref --data samples/ --num-images 50000 --dest samples-stats.npz
"""

from __future__ import annotations

import argparse
import io
import os
import zipfile
from collections.abc import Iterator, Sequence
from typing import Protocol

import blobfile as bf
import numpy as np
import PIL.Image
import torch

from pid_diffusion import dist, fileio
from pid_diffusion.cli import errors
from pid_diffusion.fid import compute_statistics, save_reference
from pid_diffusion.inception import Detector, load_detector

__all__ = ["ImageSource", "edm_subset", "image_batches", "main", "open_images", "reference_statistics"]

_NPZ_IMAGE_KEYS = ("images", "arr_0")  # pid-sample's name, then openai's
_SUBSET_SEED_MODULUS = 1 << 31  # numpy's RandomState takes seeds below 2^31 (EDM reduces them so)


class ImageSource(Protocol):
    """Indexable uint8 images, [H, W, C]."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> np.ndarray: ...


def _supported(name: str) -> bool:
    PIL.Image.init()
    return os.path.splitext(name)[1].lower() in PIL.Image.EXTENSION


def _decode(data: bytes) -> np.ndarray:
    image = np.array(PIL.Image.open(io.BytesIO(data)))
    return image[:, :, np.newaxis] if image.ndim == 2 else image


class FolderImages:
    """Image files under a folder, recursively, in sorted order of their relative paths (EDM)."""

    def __init__(self, path: str):
        # Sorting full paths under one root orders them as EDM orders the relative ones.
        self.paths = sorted(bf.join(folder, name) for folder, _, names in bf.walk(path)
                            for name in names if _supported(name))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        return _decode(fileio.read_bytes(self.paths[index]))


class ZipImages:
    """Image files inside a zip, in sorted order of their names (EDM's dataset zips)."""

    def __init__(self, path: str):
        self.archive = zipfile.ZipFile(bf.BlobFile(path, "rb"))
        self.names = sorted(name for name in self.archive.namelist() if _supported(name))

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> np.ndarray:
        return _decode(self.archive.read(self.names[index]))


class NpzImages:
    """uint8 NHWC images stored in an npz under `images` or `arr_0`."""

    def __init__(self, path: str):
        with np.load(io.BytesIO(fileio.read_bytes(path))) as data:
            key = next((key for key in _NPZ_IMAGE_KEYS if key in data.files), None)
            if key is None:
                raise ValueError(f"{path} holds {data.files}; expected uint8 NHWC images under one of "
                                 f"{list(_NPZ_IMAGE_KEYS)}")
            self.images = data[key]
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"{path}: expected uint8 [N, H, W, C] images, got {self.images.dtype} "
                             f"{self.images.shape}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.images[index]


def open_images(path: str) -> ImageSource:
    """A folder, a .zip or an .npz of images."""
    if path.endswith(".npz"):
        return NpzImages(path)
    if path.endswith(".zip"):
        return ZipImages(path)
    if bf.isdir(path):
        return FolderImages(path)
    raise ValueError(f"{path} is neither a folder, a .zip nor an .npz of images")


def edm_subset(num_images: int, num_expected: int | None, seed: int) -> np.ndarray:
    """Indices EDM's fid.py measures: all images, or `num_expected` of them chosen by a seeded shuffle
    (its `ImageFolderDataset(max_size=num_expected, random_seed=seed)`), in increasing order."""
    indices = np.arange(num_images)
    if num_expected is None:
        return indices
    if num_images < num_expected:
        raise ValueError(f"found {num_images} images, but expected at least {num_expected}")
    if num_images > num_expected:
        np.random.RandomState(seed % _SUBSET_SEED_MODULUS).shuffle(indices)
        indices = np.sort(indices[:num_expected])
    return indices


def image_batches(source: ImageSource, indices: np.ndarray, batch_size: int
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share, `indices[rank::world_size]`, as (positions, uint8 NCHW images) batches."""
    positions = torch.arange(dist.rank(), len(indices), dist.world_size())
    for chunk in positions.split(batch_size):
        images = [source[int(indices[position])] for position in chunk]
        shapes = {image.shape for image in images}
        if len(shapes) > 1:
            raise ValueError(f"the images differ in shape ({sorted(shapes)}); FID needs one resolution")
        yield chunk, torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


def reference_statistics(source: ImageSource, detector: Detector, indices: np.ndarray, batch_size: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """mu and sigma of the detector's features over `source[indices]`, summed over ranks."""
    features, _ = compute_statistics(image_batches(source, indices, batch_size), detector, len(indices),
                                     inception_score=False)
    return features.mean_and_covariance()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pid-fid-ref", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder, .zip or .npz of images")
    parser.add_argument("--dest", required=True, help="output .npz with mu and sigma")
    parser.add_argument("--num-images", type=int, help="measure exactly this many images (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --num-images subset (default 0)")
    parser.add_argument("--batch", type=int, default=64, help="images per rank and batch (default 64)")
    parser.add_argument("--detector", help="inception-2015-12-05.pt (default: the torch hub cache)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    with dist.abort_on_error(), errors.reported("pid-fid-ref"):
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.batch < 1 or (args.num_images is not None and args.num_images < 2):
            parser.error("--batch must be positive and --num-images at least 2")
        dist.init()
        source = open_images(args.data)
        indices = edm_subset(len(source), args.num_images, args.seed)
        detector = load_detector(args.detector, dist.device())
        dist.print0(f"{len(indices)} images of {args.data}, {dist.world_size()} rank(s)")
        mu, sigma = reference_statistics(source, detector, indices, args.batch)
        if dist.rank() == 0:
            save_reference(args.dest, mu, sigma)
        dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main()
