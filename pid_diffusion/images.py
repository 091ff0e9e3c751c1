"""Image output, in one place: uint8 quantisation as EDM does it, tiled images, PNG, npz, and the labelled-rows figure.

Every writer of the project goes through this module (training previews, `pid-sample`, the teacher export,
the demo), so an image in [−1, 1] becomes the same pixels everywhere, and every file is written atomically.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch

from pid_diffusion.utils import fileio

__all__ = ["labelled_rows_png", "png_bytes", "tile", "to_uint8", "write_npz", "write_png", "write_tiled"]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [−1, 1], NCHW → uint8 NHWC exactly as EDM saves them: x·127.5 + 128, clipped, truncated
    (the + 128 rather than + 127.5 makes truncation round to nearest)."""
    if images.ndim != 4:
        raise ValueError(f"expected NCHW images, got shape {tuple(images.shape)}")
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


PREVIEW_MIN_PIXELS = 64  # Training previews (write_tiled) magnify smaller images to at least this size.


def tile(images: np.ndarray, columns: int, padding: int = 0) -> np.ndarray:
    """uint8 [N, H, W, C] images tiled row by row, `columns` per row, `padding` black pixels around each
    (the last row padded with black): [rows·(H + p) + p, columns·(W + p) + p, C]."""
    num, height, width, channels = images.shape
    rows = math.ceil(num / columns)
    cell_h, cell_w = height + padding, width + padding
    canvas = np.zeros((rows * cell_h + padding, columns * cell_w + padding, channels), dtype=np.uint8)
    for index, image in enumerate(images):
        top, left = padding + (index // columns) * cell_h, padding + (index % columns) * cell_w
        canvas[top:top + height, left:left + width] = image
    return canvas


def png_bytes(image: np.ndarray | PIL.Image.Image) -> bytes:
    """A PNG of a uint8 [H, W, C] array (grey for C = 1) or of a PIL image."""
    if isinstance(image, np.ndarray):
        image = PIL.Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(image: np.ndarray | PIL.Image.Image, path: str) -> None:
    fileio.atomic_write_bytes(png_bytes(image), path)


def write_tiled(images: torch.Tensor, path: str, columns: int | None = None, padding: int = 2) -> None:
    """Images in [−1, 1] (NCHW) as one tiled PNG, quantised like `pid-sample`; `columns` None: round(√N). Each image
    is magnified by the smallest whole factor that makes it PREVIEW_MIN_PIXELS wide (nearest neighbour, so every
    pixel stays one flat square: 16×16 → 64×64), so that the tiles of small images can be read."""
    columns = columns or max(1, round(math.sqrt(images.shape[0])))
    pixels = to_uint8(images.detach().float().cpu()).numpy()
    scale = math.ceil(PREVIEW_MIN_PIXELS / max(pixels.shape[1:3]))
    write_png(tile(pixels.repeat(scale, axis=1).repeat(scale, axis=2), columns, padding), path)


def write_npz(path: str, **arrays: np.ndarray) -> None:
    """Arrays in an npz (e.g. `images` uint8 NHWC, `seeds`, `labels`), atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    fileio.atomic_write_bytes(buffer.getvalue(), path)


def labelled_rows_png(rows: Sequence[tuple[str, torch.Tensor]], columns: int, scale: int) -> bytes:
    """A PNG with one labelled row per (label, images in [−1, 1]), the first `columns` images of each,
    magnified `scale` times (nearest neighbour)."""
    import PIL.ImageDraw  # Here: only the demo draws labelled figures.
    import PIL.ImageFont

    font = PIL.ImageFont.load_default(size=14)
    gap, label_height = 2, 20
    _, channels, height, width = rows[0][1].shape
    columns = min(columns, min(len(images) for _, images in rows))
    cell_w, cell_h = width * scale, height * scale
    canvas_w = gap + columns * (cell_w + gap)
    canvas_h = len(rows) * (label_height + cell_h + gap) + gap
    canvas = PIL.Image.new("RGB", (canvas_w, canvas_h), "white")
    draw = PIL.ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        top = gap + r * (label_height + cell_h + gap)
        draw.text((gap, top + 2), label, fill="black", font=font)
        pixels = to_uint8(images[:columns].clamp(-1, 1)).cpu().numpy()  # NHWC
        for c, image in enumerate(pixels):
            tile = PIL.Image.fromarray(image.squeeze(-1) if channels == 1 else image)
            tile = tile.resize((cell_w, cell_h), PIL.Image.NEAREST)
            canvas.paste(tile, (gap + c * (cell_w + gap), top + label_height))
    return png_bytes(canvas)
