"""pid-sample: image k is made from seed k alone (EDM generate.py), whatever the batch size and number of ranks.

Latents, classes and seeds are bitwise the same for any batch size and rank count; so are the images for any
rank count at a fixed batch size. Across batch sizes the network's batched float arithmetic differs in the
last bits (about 1e-6 here), which can move a rare uint8 value by one level, on CPUs and GPUs alike.
"""

import argparse
import types

import numpy as np
import PIL.Image
import pytest
import torch

from pid_diffusion import samplers
from pid_diffusion.training import checkpoint
from pid_diffusion.utils import dist
from pid_diffusion import images as images_module
from pid_diffusion.cli import options, sample
from pid_diffusion.generate import SamplerKind, sampler_for, sampler_preview, seeded_inputs
from pid_diffusion.student import PIDStudent

from factories import SIGMA_MAX, SIGMA_MIN, fixture_teacher, load_npz, write_student_checkpoint, write_teacher_file
from launch import mpirun_module, needs_mpirun


def seeded_latent_and_label(seed: int, shape, label_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EDM generate.py: latent then class, both from one CPU generator seeded with the image's seed."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(shape, generator=generator)
    label = torch.randint(label_dim, size=[], generator=generator)
    return latent, label


@pytest.fixture
def student_checkpoint(tmp_path, edm_fixtures_dir) -> str:
    path = str(tmp_path / "checkpoint-00000100.pt")
    write_student_checkpoint(path, fixture_teacher(edm_fixtures_dir), step=100)
    return path


@pytest.fixture(autouse=True)
def _single_process_group():
    yield
    dist.shutdown()  # a failing main() leaves its process group behind


# ----------------------------------------------------------------------------------------------------------
# Tests.

def test_image_k_is_the_student_on_latent_and_class_of_seed_k(tmp_path, student_checkpoint):
    seeds = [3, 7, 100, 101, 102]
    # One batch of 5, as the reference below, so that even the last float bit agrees.
    sample.main(["--checkpoint", student_checkpoint, "--ema", "0.999", "--seeds", "3,7,100-102", "--batch", "5",
                 "--npz", str(tmp_path / "s.npz")])
    out = load_npz(tmp_path / "s.npz")

    student = checkpoint.load_network(student_checkpoint, ema_rate=0.999)
    shape = (student.img_channels, student.img_resolution, student.img_resolution)
    pairs = [seeded_latent_and_label(seed, shape, student.label_dim) for seed in seeds]
    latents = torch.stack([latent for latent, _ in pairs])
    labels = torch.stack([label for _, label in pairs])
    one_hot = torch.nn.functional.one_hot(labels, student.label_dim).float()
    expected = images_module.to_uint8(samplers.OneStepSampler()(student, latents, one_hot)).numpy()

    np.testing.assert_array_equal(out["seeds"], seeds)
    np.testing.assert_array_equal(out["labels"], labels.numpy())
    np.testing.assert_array_equal(out["images"], expected)
    assert out["images"].dtype == np.uint8 and out["images"].shape == (5, 16, 16, 3)


@needs_mpirun
def test_images_are_the_same_for_any_number_of_ranks_and_batch_size(tmp_path, student_checkpoint):
    common = ["--checkpoint", student_checkpoint, "--seeds", "0-15"]
    sample.main([*common, "--batch", "4", "--npz", str(tmp_path / "one_rank.npz"),
                 "--grid", str(tmp_path / "grid.png"), "--grid-cols", "5", "--png-dir", str(tmp_path / "pngs")])
    mpirun_module(2, "pid_diffusion.cli.sample", *common, "--batch", "4", "--npz", str(tmp_path / "two_ranks.npz"))
    sample.main([*common, "--batch", "3", "--npz", str(tmp_path / "other_batch.npz")])

    reference = load_npz(tmp_path / "one_rank.npz")
    two_ranks = load_npz(tmp_path / "two_ranks.npz")
    assert two_ranks.keys() == reference.keys() == {"images", "labels", "seeds"}
    for key in reference:
        np.testing.assert_array_equal(two_ranks[key], reference[key], err_msg=key)

    other_batch = load_npz(tmp_path / "other_batch.npz")
    np.testing.assert_array_equal(other_batch["seeds"], reference["seeds"])
    np.testing.assert_array_equal(other_batch["labels"], reference["labels"])
    difference = np.abs(other_batch["images"].astype(int) - reference["images"])
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01

    # The grid tiles the same images in seed order, 5 per row; one PNG per seed holds each image.
    images = reference["images"]
    grid = np.array(PIL.Image.open(tmp_path / "grid.png"))
    assert grid.shape == (4 * 16, 5 * 16, 3)
    np.testing.assert_array_equal(grid[16:32, 32:48], images[7])
    assert not grid[48:, 16:].any()  # tiles 17 to 20 of 16 images are empty
    for seed in range(16):
        np.testing.assert_array_equal(np.array(PIL.Image.open(tmp_path / "pngs" / f"{seed:06d}.png")), images[seed])


@pytest.mark.parametrize("kind", [SamplerKind.HEUN, SamplerKind.EULER])
def test_teacher_samples_with_its_sampler_on_seeded_latents_and_given_classes(tmp_path, edm_fixtures_dir, kind):
    steps = 3
    teacher = fixture_teacher(edm_fixtures_dir)
    write_teacher_file(str(tmp_path / "teacher.pt"), teacher)
    sample.main(["--teacher", str(tmp_path / "teacher.pt"), "--sampler", kind.value, "--steps", str(steps),
                 "--seeds", "0-3", "--classes", "2,5", "--npz", str(tmp_path / "t.npz")])
    out = load_npz(tmp_path / "t.npz")

    shape = (teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
    latents = torch.stack([seeded_latent_and_label(seed, shape, teacher.label_dim)[0] for seed in range(4)])
    labels = torch.tensor([2, 5, 2, 5])  # image k gets classes[k mod 2]
    reference_sampler = (samplers.HeunSampler(num_steps=steps) if kind is SamplerKind.HEUN
                         else samplers.EulerSampler.on_grid(num_points=steps))
    expected = reference_sampler(teacher, latents, torch.nn.functional.one_hot(labels, teacher.label_dim).float())
    np.testing.assert_array_equal(out["labels"], labels.numpy())
    np.testing.assert_array_equal(out["images"], images_module.to_uint8(expected).numpy())


def test_latent_k_depends_only_on_its_seed():
    # The one path from seeds to latents (pid-sample, pid-fid, the demo and the training preview use it).
    net = types.SimpleNamespace(img_channels=3, img_resolution=4, label_dim=0)
    few, many = seeded_inputs(net, range(10, 12), "cpu")[0], seeded_inputs(net, range(9, 14), "cpu")[0]
    assert torch.equal(few[0], many[1]) and torch.equal(few[1], many[2])
    assert torch.equal(few[0], torch.randn((3, 4, 4), generator=torch.Generator().manual_seed(10)))


def test_the_preview_draws_the_latents_of_its_seeds_with_classes_cycling(edm_fixtures_dir):
    teacher = fixture_teacher(edm_fixtures_dir)
    seen = []
    preview = sampler_preview(lambda net, x, labels: seen.append((x, labels)) or x, teacher, 5, 7, "cpu")
    preview(teacher)
    latents, labels = seen[0]
    expected, _ = seeded_inputs(teacher, range(7, 12), "cpu")
    assert torch.equal(latents, expected)
    assert labels.argmax(1).tolist() == [k % teacher.label_dim for k in range(5)] and labels.sum(1).eq(1).all()


def test_sampler_must_fit_the_network(edm_fixtures_dir):
    teacher = fixture_teacher(edm_fixtures_dir)
    student = PIDStudent.from_teacher(teacher, SIGMA_MIN, SIGMA_MAX)
    student, teacher = type(student).__name__, type(teacher).__name__
    assert isinstance(sampler_for(student), samplers.OneStepSampler)
    assert sampler_for(teacher) == samplers.HeunSampler()
    with pytest.raises(ValueError, match="cannot sample a PID student"):
        sampler_for(student, SamplerKind.HEUN, 18)
    with pytest.raises(ValueError, match="cannot sample a denoiser"):
        sampler_for(teacher, SamplerKind.ONE_STEP)
    with pytest.raises(ValueError, match="steps does not apply to the one-step sampler"):
        sampler_for(student, steps=4)


def test_seed_lists_follow_edm_syntax():
    assert options.parse_int_list("0-3,7,10-11") == [0, 1, 2, 3, 7, 10, 11]
    for bad in ("3-1", "a", "1,,2", "-3"):
        with pytest.raises(argparse.ArgumentTypeError, match="not a list"):
            options.parse_int_list(bad)
