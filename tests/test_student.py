"""PIDStudent: the boundary-preserving parametrization x_θ(z, t) of docs/method.md §2 around EDM networks."""

import json
import math

import pytest
import torch

from pid_diffusion.networks.edm import EDMPrecond
from pid_diffusion.student import PIDStudent, StudentInit

from factories import TINY_SONG_UNET

T, EPS = 80.0, 0.002  # PID's σ range (docs/method.md §3)


def load_teacher(fixtures_dir, name):
    """An EDMPrecond with the perturbed weights of an EDM fixture (nonzero output layers), frozen."""
    reference = torch.load(fixtures_dir / name, weights_only=True)
    teacher = EDMPrecond(**reference["precond_kwargs"])
    teacher.load_state_dict(reference["state_dict"])
    return teacher.eval().requires_grad_(False)


@pytest.fixture
def teacher(edm_fixtures_dir):
    return load_teacher(edm_fixtures_dir, "ref_song_uncond.pt")


@pytest.fixture
def conditional_teacher(edm_fixtures_dir):
    return load_teacher(edm_fixtures_dir, "ref_song_cond.pt")


def latents(batch=3, seed=0):
    return T * torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_boundary_condition_holds_exactly(teacher):
    student = PIDStudent.from_teacher(teacher, EPS, T)
    z = latents()
    assert torch.equal(student(z, T), z)
    assert torch.equal(student(z, torch.full((3,), T)), z)
    assert not torch.allclose(student(z, 1.0), z, atol=1e-3)  # F_θ contributes away from T


def test_forward_is_the_official_parametrization(teacher):
    student = PIDStudent.from_teacher(teacher, EPS, T)
    z = latents()
    t = torch.tensor([EPS, 0.5, 30.0])
    c_in = 1 / math.sqrt(teacher.sigma_data ** 2 + T ** 2)
    F = teacher.model(c_in * z, t.log() / 4, None)
    expected = (t / T).reshape(-1, 1, 1, 1) * z + (1 - t / T).reshape(-1, 1, 1, 1) * F
    assert torch.allclose(student(z, t), expected, rtol=1e-5, atol=1e-5)
    # A scalar t is the same time for every sample.
    assert torch.allclose(student(z, 0.5), student(z, torch.full((3,), 0.5)), rtol=0, atol=1e-6)


def test_sample_is_the_clamped_trajectory_end(teacher):
    student = PIDStudent.from_teacher(teacher, EPS, T)
    z = latents()
    samples = student.sample(z)
    assert torch.equal(samples, student(z, EPS).clamp(-1, 1))
    assert samples.abs().max() <= 1 and not samples.requires_grad


def test_from_teacher_copies_the_network(teacher):
    student = PIDStudent.from_teacher(teacher, EPS, T, StudentInit.TEACHER)
    teacher_state, student_state = teacher.model.state_dict(), student.model.state_dict()
    # Every weight but the augmentation input's, which PID never feeds (student.py).
    assert {key for key in teacher_state if not key.startswith("map_augment.")} == student_state.keys()
    teacher_state = {key: teacher_state[key] for key in student_state}
    assert all(torch.equal(teacher_state[key], student_state[key]) for key in teacher_state)
    # A copy, not shared storage: training the student leaves the teacher alone.
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(teacher.model.parameters(), student.model.parameters()))
    assert student.sigma_data == teacher.sigma_data and student.label_dim == teacher.label_dim


def test_random_init_keeps_the_architecture_not_the_weights(teacher):
    student = PIDStudent.from_teacher(teacher, EPS, T, StudentInit.RANDOM)
    teacher_state, student_state = teacher.model.state_dict(), student.model.state_dict()
    teacher_state = {key: value for key, value in teacher_state.items() if not key.startswith("map_augment.")}
    assert {k: v.shape for k, v in teacher_state.items()} == {k: v.shape for k, v in student_state.items()}
    weights = [key for key in teacher_state if key.endswith("weight")]
    assert not any(torch.equal(teacher_state[key], student_state[key]) for key in weights)


def test_init_kwargs_rebuild_the_student(teacher):
    student = PIDStudent.from_teacher(teacher, EPS, T, network_overrides={"dropout": 0.0})
    kwargs = json.loads(json.dumps(student.init_kwargs))
    assert kwargs["sigma_min"] == EPS and kwargs["sigma_max"] == T and kwargs["network_kwargs"]["dropout"] == 0.0
    rebuilt = PIDStudent(**kwargs)
    rebuilt.load_state_dict(student.state_dict())
    z = latents()
    assert torch.equal(rebuilt(z, 0.3), student(z, 0.3))


def test_network_overrides_change_the_student_only(teacher):
    student = PIDStudent.from_teacher(teacher, EPS, T, network_overrides={"dropout": 0.25})
    assert student.init_kwargs["network_kwargs"]["dropout"] == 0.25
    assert teacher.init_kwargs["dropout"] == 0.0


def test_conditional_teacher_gives_a_conditional_student(conditional_teacher):
    student = PIDStudent.from_teacher(conditional_teacher, EPS, T)
    assert student.label_dim == conditional_teacher.label_dim == 10
    z = latents(2)
    labels = torch.eye(10)[[3, 7]]
    other = torch.eye(10)[[5, 1]]
    c_in = 1 / math.sqrt(student.sigma_data ** 2 + T ** 2)
    t = torch.tensor([0.1, 2.0])
    F = conditional_teacher.model(c_in * z, t.log() / 4, labels)
    expected = (t / T).reshape(-1, 1, 1, 1) * z + (1 - t / T).reshape(-1, 1, 1, 1) * F
    assert torch.allclose(student(z, t, labels), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(student(z, t, labels), student(z, t, other), atol=1e-4)
    with pytest.raises(ValueError, match="class-conditional"):
        student(z, t)


def test_bad_inputs_are_rejected(teacher):
    student = PIDStudent.from_teacher(teacher, EPS, T)
    z = latents()
    with pytest.raises(ValueError, match="one per sample"):
        student(z, torch.ones(2))
    with pytest.raises(ValueError, match="unconditional"):
        student(z, 1.0, torch.eye(10)[:3])
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        PIDStudent.from_teacher(teacher, T, EPS)
    with pytest.raises(TypeError, match="StudentInit"):
        PIDStudent.from_teacher(teacher, EPS, T, init="teacher")


def test_an_augmented_teacher_gives_a_student_without_augmentation_input():
    """EDM's SongUNet releases have map_augment (augment_dim 9); PID never feeds it, so the student lacks it."""
    kwargs = {**TINY_SONG_UNET, "model_channels": 16, "attn_resolutions": [], "augment_dim": 9}
    torch.manual_seed(0)
    teacher = EDMPrecond(**kwargs).eval().requires_grad_(False)
    student = PIDStudent.from_teacher(teacher, EPS, T)
    assert "model.map_augment.weight" in teacher.state_dict()  # the teacher keeps its full EDM state dict
    assert student.model.map_augment is None and student.init_kwargs["network_kwargs"]["augment_dim"] == 0
    rebuilt = PIDStudent(**student.init_kwargs)
    rebuilt.load_state_dict(student.state_dict())  # the recorded kwargs rebuild it, strictly
    z = T * torch.randn(2, 3, 8, 8)
    t = torch.tensor([0.5, 3.0])
    c_in = 1 / math.sqrt(teacher.sigma_data ** 2 + T ** 2)
    expected = (t / T).reshape(-1, 1, 1, 1) * z + (1 - t / T).reshape(-1, 1, 1, 1) * teacher.model(
        c_in * z, t.log() / 4, None)
    assert torch.allclose(student(z, t), expected, rtol=1e-5, atol=1e-5)
