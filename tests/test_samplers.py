"""Samplers against EDM's own sampler output (ref_sampler.pt) and against the exact Gaussian teacher."""

import math

import pytest
import torch

from pid_diffusion.analytic import GaussianTeacher
from pid_diffusion.grid import KarrasGrid
from pid_diffusion.networks.edm import EDMPrecond
from pid_diffusion.images import to_uint8
from pid_diffusion.samplers import EulerSampler, HeunSampler, OneStepSampler, edm_sigmas, euler, heun
from pid_diffusion.student import PIDStudent

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0
# The Gaussian teacher of docs/method.md §4: d = 16, s = 0.4.
GAUSS_S, GAUSS_CHANNELS, GAUSS_RESOLUTION = 0.4, 1, 4


class RecordingDenoiser:
    """Passes calls through to a denoiser and records the σ of each call and the first output."""

    def __init__(self, net):
        self.net = net
        self.sigmas: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []

    def __call__(self, x, sigma, class_labels=None):
        out = self.net(x, sigma, class_labels)
        self.sigmas.append(torch.as_tensor(sigma).detach().clone())
        self.outputs.append(out.detach().clone())
        return out


@pytest.fixture(scope="module")
def ref_sampler(edm_fixtures_dir):
    return torch.load(edm_fixtures_dir / "ref_sampler.pt", weights_only=True)


def gaussian_teacher(mu: float = 0.3) -> GaussianTeacher:
    return GaussianTeacher(mu, GAUSS_S, img_channels=GAUSS_CHANNELS, img_resolution=GAUSS_RESOLUTION)


def gaussian_latents(batch: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, GAUSS_CHANNELS, GAUSS_RESOLUTION, GAUSS_RESOLUTION, generator=generator,
                       dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------------
# EDM's Heun sampler, reproduced on three small networks.

def test_heun_sampler_defaults_are_edms(ref_sampler):
    kwargs = ref_sampler["sampler_kwargs"]
    assert kwargs["S_churn"] == 0  # the deterministic sampler
    sampler = HeunSampler()
    assert (sampler.num_steps, sampler.sigma_min, sampler.sigma_max, sampler.rho) == (
        kwargs["num_steps"], kwargs["sigma_min"], kwargs["sigma_max"], kwargs["rho"])


@pytest.mark.parametrize("case", ["song_uncond", "song_cond", "dhariwal_cond"])
def test_heun_sampler_matches_edm(ref_sampler, edm_fixtures_dir, case):
    ref = ref_sampler["cases"][case]
    net_ref = torch.load(edm_fixtures_dir / ref["ref_file"], weights_only=True)
    net = EDMPrecond(**net_ref["precond_kwargs"]).eval()
    net.load_state_dict(net_ref["state_dict"], strict=True)
    kwargs = ref_sampler["sampler_kwargs"]
    sampler = HeunSampler(num_steps=kwargs["num_steps"], sigma_min=kwargs["sigma_min"],
                          sigma_max=kwargs["sigma_max"], rho=kwargs["rho"])

    recorder = RecordingDenoiser(net)
    images = sampler(recorder, ref["latents"], ref["class_labels"])

    assert images.dtype == torch.float32
    assert len(recorder.sigmas) == ref["num_net_calls"] == sampler.num_network_calls
    # EDM computes ε as (ε^(1/ρ))^ρ = 0.0020000000000000013; the grid pins ε exactly, hence not bit-equal.
    torch.testing.assert_close(torch.stack(recorder.sigmas), ref["sigma_per_call"], rtol=1e-14, atol=0)
    torch.testing.assert_close(recorder.outputs[0], ref["first_denoised"], rtol=0, atol=1e-5)
    torch.testing.assert_close(images.double(), ref["x_final_fp64"], rtol=0, atol=1e-5)
    assert torch.equal(to_uint8(images).permute(0, 3, 1, 2), ref["images_uint8"])


def test_edm_sigmas():
    sigmas = edm_sigmas(18, SIGMA_MIN, SIGMA_MAX, RHO)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (19,)
    assert sigmas[0] == SIGMA_MAX and sigmas[-2] == SIGMA_MIN and sigmas[-1] == 0
    # Karras et al. 2022, Eq. 5, at the middle point i = 9 of 0 … 17.
    expected = (SIGMA_MAX ** (1 / RHO) + 9 / 17 * (SIGMA_MIN ** (1 / RHO) - SIGMA_MAX ** (1 / RHO))) ** RHO
    assert sigmas[9].item() == pytest.approx(expected, rel=1e-15)


# ----------------------------------------------------------------------------------------------------------
# Euler and Heun on the exact Gaussian teacher (docs/method.md §4).

def test_euler_equals_its_closed_form_on_the_gaussian_teacher():
    """On Gaussian data (x − D(x, σ)) / σ = (x − μ)·σ/(s² + σ²): each Euler step scales x − μ."""
    teacher, z = gaussian_teacher(), SIGMA_MAX * gaussian_latents()
    sigmas = KarrasGrid(20, RHO, SIGMA_MIN, SIGMA_MAX).sigmas
    factor = math.prod(1 + (t_next - t) * t / (GAUSS_S ** 2 + t ** 2)
                       for t, t_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()))
    expected = teacher.mu + (z - teacher.mu) * factor
    torch.testing.assert_close(euler(teacher, z, sigmas), expected, rtol=1e-12, atol=1e-12)


def discretisation_error(integrator, num_points: int) -> float:
    """RMS distance at ε between the integrator on PID's grid and the exact ODE solution."""
    teacher, z = gaussian_teacher(), SIGMA_MAX * gaussian_latents()
    x = integrator(teacher, z, KarrasGrid(num_points, RHO, SIGMA_MIN, SIGMA_MAX).sigmas)
    exact = teacher.exact_solution(z, SIGMA_MIN, SIGMA_MAX)
    return (x - exact).pow(2).mean().sqrt().item()


def test_euler_is_first_order():
    """Theorem 1: the error at ε halves each time N doubles."""
    errors = [discretisation_error(euler, n) for n in (20, 40, 80, 160)]
    for coarse, fine in zip(errors[:-1], errors[1:]):
        assert 1.9 < coarse / fine < 2.1


def test_heun_is_second_order():
    errors = [discretisation_error(heun, n) for n in (20, 40, 80, 160)]
    for coarse, fine in zip(errors[:-1], errors[1:]):
        assert 3.8 < coarse / fine < 4.6


def test_euler_sampler_on_grid_runs_through_pids_grid():
    sampler = EulerSampler.on_grid(num_points=40)
    grid = KarrasGrid(40, RHO, SIGMA_MIN, SIGMA_MAX)
    assert sampler.sigmas == tuple(grid.sigmas.tolist())
    assert sampler.num_network_calls == 39
    teacher, latents = gaussian_teacher(), gaussian_latents()
    recorder = RecordingDenoiser(teacher)
    images = sampler(recorder, latents)
    assert images.dtype == torch.float32 and len(recorder.sigmas) == sampler.num_network_calls
    torch.testing.assert_close(images, euler(teacher, SIGMA_MAX * latents, grid.sigmas).float())


def test_heun_skips_the_correction_only_into_sigma_zero():
    sigmas = (SIGMA_MAX, 1.0, SIGMA_MIN)
    recorder = RecordingDenoiser(gaussian_teacher())
    heun(recorder, SIGMA_MAX * gaussian_latents(), sigmas)
    assert len(recorder.sigmas) == 4  # both steps corrected
    recorder = RecordingDenoiser(gaussian_teacher())
    heun(recorder, SIGMA_MAX * gaussian_latents(), sigmas + (0.0,))
    assert len(recorder.sigmas) == 5  # the step into σ = 0 is not


# ----------------------------------------------------------------------------------------------------------
# The one-step sampler, the uint8 conversion and validation.

def test_one_step_sampler_is_the_students_clamped_output_at_epsilon(edm_fixtures_dir):
    net_ref = torch.load(edm_fixtures_dir / "ref_song_cond.pt", weights_only=True)
    teacher = EDMPrecond(**net_ref["precond_kwargs"])
    teacher.load_state_dict(net_ref["state_dict"], strict=True)
    student = PIDStudent.from_teacher(teacher, SIGMA_MIN, SIGMA_MAX).eval()
    latents, labels = net_ref["x"], net_ref["class_labels"]
    images = OneStepSampler()(student, latents, labels)
    assert OneStepSampler.num_network_calls == 1
    assert images.dtype == torch.float32 and images.abs().max() <= 1
    with torch.no_grad():
        expected = student(SIGMA_MAX * latents, SIGMA_MIN, labels).clamp(-1, 1)  # x_θ(T·latents, ε)
    torch.testing.assert_close(images, expected, rtol=0, atol=0)


@pytest.mark.parametrize("sigmas", [(1.0,), (1.0, 2.0), (2.0, 2.0, 1.0), (1.0, -0.5), (1.0, 0.0, 0.0),
                                    (math.inf, 1.0)])
def test_bad_schedules_are_rejected(sigmas):
    with pytest.raises(ValueError, match="sigmas"):
        EulerSampler(sigmas)


@pytest.mark.parametrize("kwargs, field", [(dict(num_steps=1), "num_steps"), (dict(sigma_min=0.0), "sigma_min"),
                                           (dict(sigma_min=90.0), "sigma_min"), (dict(rho=0.0), "rho")])
def test_bad_heun_options_are_rejected(kwargs, field):
    with pytest.raises(ValueError, match=field):
        HeunSampler(**kwargs)
