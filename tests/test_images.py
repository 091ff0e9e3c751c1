"""Image output: EDM's uint8 quantisation, grids, PNG and npz, the labelled-rows figure, training previews."""

import io

import numpy as np
import PIL.Image
import pytest
import torch

from pid_diffusion import images as images_module
from pid_diffusion.images import labelled_rows_png, to_uint8


def test_to_uint8_matches_edms_formula():
    x = torch.tensor([-1.5, -1.0, -0.996, 0.0, 0.5, 0.996, 1.0, 2.0]).reshape(1, 2, 2, 2)
    # (x·127.5 + 128) clipped to [0, 255] and truncated: -0.996 → 1.01, 0.5 → 191.75, 0.996 → 254.99.
    expected = torch.tensor([0, 0, 1, 128, 191, 254, 255, 255], dtype=torch.uint8).reshape(1, 2, 2, 2)
    out = to_uint8(x)
    assert out.shape == (1, 2, 2, 2) and out.dtype == torch.uint8
    assert torch.equal(out, expected.permute(0, 2, 3, 1))


def test_to_uint8_is_nhwc():
    assert to_uint8(torch.zeros(2, 3, 4, 5)).shape == (2, 4, 5, 3)
    with pytest.raises(ValueError, match="NCHW"):
        to_uint8(torch.zeros(3, 4, 5))


def test_grid_pads_the_last_row_with_black():
    images = np.arange(1, 6, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 3, 1), dtype=np.uint8)
    grid = images_module.tile(images, columns=2)[:, :, 0]  # one channel
    assert grid.shape == (6, 6)
    np.testing.assert_array_equal(grid[::2, ::3], [[1, 2], [3, 4], [5, 0]])


def test_labelled_rows_png_layout():
    rows = [("a", torch.zeros(5, 3, 16, 16)), ("b", torch.ones(5, 3, 16, 16)), ("c", -torch.ones(5, 3, 16, 16))]
    image = PIL.Image.open(io.BytesIO(labelled_rows_png(rows, columns=4, scale=2)))
    gap, label, cell = 2, 20, 32
    assert image.size == (gap + 4 * (cell + gap), 3 * (label + cell + gap) + gap)
    # First image of row "b" (all +1) is white, of row "c" (all −1) black.
    top_b = gap + (label + cell + gap) + label
    assert image.getpixel((gap + 1, top_b + 1)) == (255, 255, 255)
    assert image.getpixel((gap + 1, top_b + label + cell + gap + 1)) == (0, 0, 0)


def test_a_preview_grid_quantises_like_pid_sample(tmp_path):
    x = torch.linspace(-1.2, 1.2, 4 * 3 * 5 * 5).reshape(4, 3, 5, 5)
    images_module.write_tiled(x, str(tmp_path / "grid.png"), columns=2, padding=2)
    pixels = np.array(PIL.Image.open(tmp_path / "grid.png"))
    # 5×5 images magnified 13 times (nearest) to 65×65, the first size ≥ PREVIEW_MIN_PIXELS (64).
    size = 5 * 13
    assert pixels.shape == (2 * (size + 2) + 2, 2 * (size + 2) + 2, 3)
    expected = to_uint8(x).numpy().repeat(13, axis=1).repeat(13, axis=2)
    np.testing.assert_array_equal(pixels[2:2 + size, 2:2 + size], expected[0])
    np.testing.assert_array_equal(pixels[4 + size:4 + 2 * size, 4 + size:4 + 2 * size], expected[3])
    assert pixels[0].max() == 0 and pixels[:, 2 + size:4 + size].max() == 0  # black padding


def test_npz_holds_the_arrays(tmp_path):
    images_module.write_npz(str(tmp_path / "a.npz"), images=np.zeros((2, 4, 4, 3), np.uint8), seeds=np.arange(2))
    with np.load(tmp_path / "a.npz") as data:
        assert sorted(data.files) == ["images", "seeds"] and data["images"].dtype == np.uint8
