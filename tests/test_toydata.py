"""The generated shapes data set: determinism, geometry against closed-form areas, value ranges, files."""

import math

import numpy as np
import pytest
import torch

from pid_diffusion import toydata
from pid_diffusion.toydata import ImageDataset, Shape, ShapesSpec, make_shapes

SMALL = ShapesSpec(num_images=64, seed=3)


def test_same_spec_same_images_other_seed_other_images():
    a, b = make_shapes(SMALL), make_shapes(SMALL)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    c = make_shapes(ShapesSpec(num_images=64, seed=4))
    assert not torch.equal(a.images, c.images)


def test_images_do_not_depend_on_the_rendering_chunk():
    assert torch.equal(make_shapes(SMALL, chunk=7).images, make_shapes(SMALL).images)


def test_shape_areas_match_closed_forms():
    # Inside-tests on a fine grid around the centre: area ≈ count · cell², against each shape's area.
    r, cell = 5.0, 0.01
    axis = torch.arange(-r - 1, r + 1, cell, dtype=torch.float64) + cell / 2
    v, u = torch.meshgrid(axis, axis, indexing="ij")
    expected = {
        Shape.CIRCLE: math.pi * r ** 2,
        Shape.SQUARE: 2 * r ** 2,                          # inscribed square: side r √2
        Shape.TRIANGLE: 3 * math.sqrt(3) / 4 * r ** 2,     # inscribed equilateral triangle
        Shape.CROSS: 20 / 9 * r ** 2,                      # two 2r × 2r/3 arms minus their overlap
    }
    for shape, area in expected.items():
        mask = toydata._shape_masks(torch.tensor([shape]), u[None], v[None], torch.tensor([r], dtype=torch.float64))
        # Pixelation error ≤ perimeter · cell; the longest perimeter (the cross) is 8r.
        assert mask.sum().item() * cell ** 2 == pytest.approx(area, abs=8 * r * cell), shape.name


def test_images_are_a_grey_background_with_one_saturated_shape():
    data = make_shapes(SMALL)
    assert data.images.shape == (64, 3, 16, 16) and data.images.dtype == torch.uint8
    assert set(data.labels.tolist()) == set(Shape)
    # Corners are always background (every shape stays at least its radius from the border): grey, in range.
    corners = data.images[:, :, [0, 0, -1, -1], [0, -1, 0, -1]].to(torch.float32)   # [N, 3, 4]
    assert torch.equal(corners.amax(1), corners.amin(1))
    low, high = SMALL.background_range
    assert corners.min() >= round(255 * low) and corners.max() <= round(255 * high)
    # The shape's own colour is saturated: the most colourful pixel of each image is far from grey.
    chroma = data.images.to(torch.float32).amax(1) - data.images.to(torch.float32).amin(1)
    assert chroma.flatten(1).amax(1).min() >= 255 * SMALL.min_value * SMALL.min_saturation - 1


def test_batch_maps_uint8_to_edm_range():
    data = make_shapes(SMALL)
    images, labels = data.batch(torch.tensor([5, 0]))
    assert images.dtype == torch.float32 and images.min() >= -1 and images.max() <= 1
    torch.testing.assert_close(images[0], data.images[5].to(torch.float32) / 127.5 - 1)
    assert labels.tolist() == data.labels[[5, 0]].tolist()


def test_npz_round_trip_is_nhwc_uint8(tmp_path):
    data = make_shapes(SMALL)
    path = str(tmp_path / "shapes.npz")
    toydata.main(["--out", path, "--num-images", "64", "--seed", "3"])
    with np.load(path) as npz:
        images = npz["images"]
    assert images.dtype == np.uint8 and images.shape == (64, 16, 16, 3)
    np.testing.assert_array_equal(images, data.images.permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize("bad", [dict(num_images=0), dict(min_radius=5, max_radius=4), dict(max_radius=9),
                                 dict(background_range=(0.8, 0.2)), dict(supersample=0)])
def test_bad_spec_is_rejected(bad):
    with pytest.raises(ValueError):
        ShapesSpec(**bad)


def test_dataset_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(images=torch.zeros(2, 3, 4, 4), labels=torch.zeros(2, dtype=torch.long), num_classes=1)
