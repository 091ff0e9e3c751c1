"""Image sources for reference statistics: a folder of images (searched recursively), a zip of images (EDM's
`dataset_tool.py` output), or an npz of uint8 NHWC images under `images` (pid-sample's files) or `arr_0`
(openai's sample files). Images are taken in sorted name order, as EDM's `ImageFolderDataset` takes them;
`edm_subset` picks a subset as EDM's `fid.py` does. The name `shapes` (BUNDLED_DATA) is the generated data set
the bundled teacher was trained on (`toydata.ShapesSpec()`, drawn here: no file), the FID reference of the
bundled default on a machine without network (a folder of that name is `./shapes`).
"""

from __future__ import annotations

import io
import os
import zipfile
from typing import Protocol

import numpy as np
import PIL.Image

from pid_diffusion.toydata import ShapesSpec, make_shapes
from pid_diffusion.user_error import FileFormatError, MissingFileError
from pid_diffusion.utils import fileio

__all__ = ["BUNDLED_DATA", "FolderImages", "ImageSource", "NpzImages", "ZipImages", "edm_subset", "open_images"]

BUNDLED_DATA = "shapes"  # --data shapes: the bundled teacher's training set, drawn from toydata.ShapesSpec().

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
        self.paths = [file for file in fileio.walk_files(path) if _supported(file)]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        return _decode(fileio.read_bytes(self.paths[index]))


class ZipImages:
    """Image files inside a zip, in sorted order of their names (EDM's dataset zips)."""

    def __init__(self, path: str):
        self.archive = zipfile.ZipFile(fileio.open_read(path))
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
                raise FileFormatError(f"{path} holds {data.files}; expected uint8 NHWC images under one of "
                                 f"{list(_NPZ_IMAGE_KEYS)}")
            self.images = data[key]
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise FileFormatError(f"{path}: expected uint8 [N, H, W, C] images, got {self.images.dtype} "
                             f"{self.images.shape}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.images[index]


def open_images(path: str) -> ImageSource:
    """A folder, a .zip or an .npz of images; BUNDLED_DATA: the bundled teacher's generated data set."""
    if path == BUNDLED_DATA:
        return make_shapes(ShapesSpec()).images.permute(0, 2, 3, 1).numpy()
    if path.endswith(".npz"):
        return NpzImages(path)
    if path.endswith(".zip"):
        return ZipImages(path)
    if fileio.isdir(path):
        return FolderImages(path)
    if not fileio.exists(path):
        raise MissingFileError(f"{path}: no such folder or file of images; check the path")
    raise FileFormatError(f"{path} is neither a folder, a .zip nor an .npz of images: give one of those")


def edm_subset(num_images: int, num_expected: int | None, seed: int) -> np.ndarray:
    """Indices EDM's fid.py measures: all images, or `num_expected` of them chosen by a seeded shuffle
    (its `ImageFolderDataset(max_size=num_expected, random_seed=seed)`), in increasing order."""
    indices = np.arange(num_images)
    if num_expected is None:
        return indices
    if num_images < num_expected:
        raise FileFormatError(f"found {num_images} images, but expected at least {num_expected}")
    if num_images > num_expected:
        np.random.RandomState(seed % _SUBSET_SEED_MODULUS).shuffle(indices)
        indices = np.sort(indices[:num_expected])
    return indices
