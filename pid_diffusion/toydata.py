"""A procedurally drawn image data set for the CPU default: coloured shapes on a plain background.

Nothing is downloaded: every image is drawn from a seed, so the bundled teacher, its FID reference
statistics and the tests all see exactly the same data. At 16×16 a person can tell at a glance whether
a generated image looks like the data (one filled circle, square, triangle or cross, sharp-edged, in a
saturated colour on a grey background).

    python -m pid_diffusion.toydata --out shapes-16x16.npz     # images for pid-fid-ref
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import math

import torch
import torch.nn.functional as F

from pid_diffusion.images import write_npz

CHANNELS = 3  # RGB


class Shape(enum.IntEnum):
    """The shape classes; the value is the class label."""

    CIRCLE = 0
    SQUARE = 1
    TRIANGLE = 2
    CROSS = 3


@dataclasses.dataclass(frozen=True)
class ShapesSpec:
    """Everything that determines the data set: the same spec always gives the same images."""

    num_images: int = 10_000            # Images in the set.
    seed: int = 0                       # Seed of the drawing; image k depends on (seed, num_images).
    resolution: int = 16                # Height and width in pixels.
    supersample: int = 4                # Sub-pixels per pixel side for anti-aliased edges.
    min_radius: float = 3.0             # Shape radius range in pixels (circumscribed circle).
    max_radius: float = 6.0
    background_range: tuple[float, float] = (0.15, 0.85)  # Background grey level range, in [0, 1].
    min_saturation: float = 0.7         # Foreground colours are saturated hues ...
    min_value: float = 0.6              # ... and bright, so the shape always stands out.

    def __post_init__(self):
        if self.num_images < 1:
            raise ValueError(f"num_images must be ≥ 1, got {self.num_images}")
        if self.supersample < 1:
            raise ValueError(f"supersample must be ≥ 1, got {self.supersample}")
        if not 0 < self.min_radius <= self.max_radius <= self.resolution / 2:
            raise ValueError(
                f"need 0 < min_radius ≤ max_radius ≤ resolution / 2 = {self.resolution / 2}, got "
                f"min_radius={self.min_radius}, max_radius={self.max_radius}; pick radii that fit the image")
        low, high = self.background_range
        if not 0 <= low <= high <= 1:
            raise ValueError(f"background_range must satisfy 0 ≤ low ≤ high ≤ 1, got {self.background_range}")


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """Images as uint8 [N, C, H, W] with class labels int64 [N]; `batch` gives the network's view."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {list(self.images.shape)}")
        if self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"labels must be [N] = [{len(self.images)}], got {list(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def resolution(self) -> int:
        return self.images.shape[-1]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images at `indices` as float32 in [-1, 1] (EDM's data range) and their labels."""
        images = self.images[indices].to(torch.float32) / 127.5 - 1
        return images, self.labels[indices]


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HSV in [0, 1] → RGB in [0, 1], shape [N] each → [N, 3]."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + h[:, None] * 6) % 6
    return v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def _shape_masks(shape: torch.Tensor, u: torch.Tensor, v: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Inside-test of each image's shape at sub-pixel offsets (u, v) from its centre (v points down).

    shape, radius: [N]; u, v: [N, P, P]. Sizes are chosen so the four shapes have similar extent: each is
    inscribed in the circle of the given radius.
    """
    r = radius[:, None, None]
    circle = u.square() + v.square() <= r.square()
    half_side = r / math.sqrt(2)
    square = torch.maximum(u.abs(), v.abs()) <= half_side
    # Equilateral triangle, apex up: apex at v = -r, base at v = r / 2.
    triangle = (v <= r / 2) & (u.abs() <= (v + r) / math.sqrt(3))
    arm = r / 3
    cross = ((u.abs() <= arm) & (v.abs() <= r)) | ((v.abs() <= arm) & (u.abs() <= r))
    masks = torch.stack([circle, square, triangle, cross], dim=1)   # order of Shape's values
    return masks[torch.arange(len(shape)), shape]


def make_shapes(spec: ShapesSpec = ShapesSpec(), chunk: int = 1024) -> ImageDataset:
    """Draw the data set described by `spec`: one shape per image, deterministic from `spec.seed`."""
    n, res, ss = spec.num_images, spec.resolution, spec.supersample
    g = torch.Generator().manual_seed(spec.seed)

    # Draw every image's parameters first, so that drawing does not depend on the chunk size.
    shape = torch.randint(len(Shape), [n], generator=g)
    radius = spec.min_radius + (spec.max_radius - spec.min_radius) * torch.rand([n], generator=g)
    centre = radius[:, None] + (res - 2 * radius[:, None]) * torch.rand([n, 2], generator=g)
    fg_hsv = torch.rand([n, 3], generator=g)
    foreground = _hsv_to_rgb(fg_hsv[:, 0],
                             spec.min_saturation + (1 - spec.min_saturation) * fg_hsv[:, 1],
                             spec.min_value + (1 - spec.min_value) * fg_hsv[:, 2])
    low, high = spec.background_range
    background = (low + (high - low) * torch.rand([n, 1], generator=g)).expand(n, 3)

    # Render with supersampling: coverage of each pixel is the fraction of its sub-pixels inside.
    sub = (torch.arange(res * ss, dtype=torch.float32) + 0.5) / ss       # sub-pixel centres, pixel units
    images = torch.empty([n, CHANNELS, res, res], dtype=torch.uint8)
    for start in range(0, n, chunk):
        s = slice(start, min(start + chunk, n))
        u = sub[None, None, :] - centre[s, 0, None, None]
        v = sub[None, :, None] - centre[s, 1, None, None]
        inside = _shape_masks(shape[s], u, v, radius[s]).to(torch.float32)
        coverage = F.avg_pool2d(inside[:, None], ss)                      # [n, 1, res, res]
        rgb = background[s, :, None, None] * (1 - coverage) + foreground[s, :, None, None] * coverage
        images[s] = (rgb * 255).round().clamp(0, 255).to(torch.uint8)
    return ImageDataset(images=images, labels=shape, num_classes=len(Shape))


def write_images_npz(images: torch.Tensor, path: str) -> None:
    """Write uint8 images [N, C, H, W] as an .npz with key `images`, NHWC (the layout of image files)."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {list(images.shape)}")
    write_npz(path, images=images.permute(0, 2, 3, 1).contiguous().numpy())


def main(argv: list[str] | None = None) -> None:
    """Write the data set's images to an .npz (input of pid-fid-ref)."""
    defaults = ShapesSpec()
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", required=True, help="output .npz path (local, gs:// or az://)")
    parser.add_argument("--num-images", type=int, default=defaults.num_images)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--resolution", type=int, default=defaults.resolution)
    args = parser.parse_args(argv)
    data = make_shapes(ShapesSpec(num_images=args.num_images, seed=args.seed, resolution=args.resolution))
    write_images_npz(data.images, args.out)
    print(f"wrote {len(data)} images {list(data.images.shape[1:])} to {args.out}")


if __name__ == "__main__":
    main()
