"""Every parameter of the student of every EDM release architecture gets a gradient from one PID step.

A parameter without a gradient stops DDP at the second step ("Expected to have finished reduction ..."):
the students of the augmented SongUNet releases kept the teacher's `map_augment`, which PID never feeds.
The networks are built at full size (every parameter of the release) with random weights; their output
layers, which EDM initialises to zero (which would zero every earlier gradient), are perturbed. Which
parameters take part does not depend on the image size (the U-Nets are fully convolutional; each level
runs at half the input's size, attention included), so the latents are 8×8, the smallest size that every
release's levels halve down to 1×1, a sixteenth to a sixty-fourth of the cost of the release's own size;
tests/test_release_commands.py trains these networks at their own size through the commands.
"""

import pytest

from pid_diffusion.loss import Derivative
from pid_diffusion.distances import Metric
from pid_diffusion.networks.edm import EDM_PRESETS
from pid_diffusion.student import PIDStudent

from factories import GRADIENT_GRID, assert_one_pid_step_reaches_every_parameter, release_architecture, release_network

pytestmark = pytest.mark.release

# Each release architecture once (FFHQ and AFHQv2 share theirs: they differ in dropout, which the student
# sets to 0); each derivative on an unconditional and a conditional network.
CASES = [
    ("edm-cifar10-32x32-uncond-vp", Derivative.FORWARD),
    ("edm-cifar10-32x32-cond-vp", Derivative.CENTRAL),
    ("edm-cifar10-32x32-cond-vp", Derivative.JVP),
    ("edm-cifar10-32x32-uncond-ve", Derivative.CENTRAL),
    ("edm-cifar10-32x32-cond-ve", Derivative.FORWARD),
    ("edm-ffhq-64x64-uncond-vp", Derivative.JVP),
    ("edm-afhqv2-64x64-uncond-ve", Derivative.FORWARD),
    ("edm-imagenet-64x64-cond-adm", Derivative.FORWARD),
]


def test_cases_cover_every_release_architecture():
    covered = [release_architecture(EDM_PRESETS[name]) for name, _ in CASES]
    assert all(release_architecture(kwargs) in covered for kwargs in EDM_PRESETS.values())
    for derivative in Derivative:
        assert {EDM_PRESETS[name]["label_dim"] > 0 for name, d in CASES if d is derivative} == {False, True}


@pytest.mark.parametrize("name, derivative", CASES, ids=[f"{n}-{d.value}" for n, d in CASES])
def test_every_student_parameter_gets_a_gradient(name, derivative, two_threads):
    teacher = release_network(name)
    student = PIDStudent.from_teacher(teacher, GRADIENT_GRID.sigma_min, GRADIENT_GRID.sigma_max,
                                      network_overrides={"dropout": 0.0})
    assert not any(key.startswith("map_augment") for key in student.model.state_dict())
    assert "model.map_augment.weight" in teacher.state_dict() or not EDM_PRESETS[name].get("augment_dim")

    assert_one_pid_step_reaches_every_parameter(student, teacher, derivative, Metric.L2.build())
