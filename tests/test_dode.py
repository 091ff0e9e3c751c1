"""D-ODE solvers: the base solver at λ = 0, the exact fit on the Gaussian teacher, the fit on the bundled teacher
against a many-step solve, determinism, the reference rule, the sampler file and the command line."""

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from pid_diffusion.utils import fileio
from pid_diffusion.analytic import GaussianTeacher
from pid_diffusion.cli import fit_dode as fit_dode_cli
from pid_diffusion.dode import DODEFit, DODESampler, Solver, fit_batch, fit_dode, sample_dode
from pid_diffusion.networks.edm import EDMPrecond
from pid_diffusion.samplers import EulerSampler, HeunSampler, edm_sigmas
from pid_diffusion.teacher import load_teacher

from factories import TINY_SONG_UNET

BUNDLED_TEACHER = Path(__file__).resolve().parents[1] / "model_zoo" / "edm-shapes-16x16.pt"
FIT_SEED, HELD_OUT_SEED = 0, 1  # the held-out latents come from another generator than the fitting batch
MULTIPLIER = 4  # C of the tests: small, so that the teacher solves stay cheap


@pytest.fixture(scope="module")
def teacher() -> EDMPrecond:
    """The bundled teacher (model_zoo/), which the project ships: a missing file is a failure, not a skip."""
    assert BUNDLED_TEACHER.is_file(), f"the bundled teacher {BUNDLED_TEACHER} is missing from the checkout"
    return load_teacher(BUNDLED_TEACHER)


@pytest.fixture(scope="module")
def held_out(teacher) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Latents (and classes) the fits never see, with their many-step solution: EDM's Heun with 32 steps (within
    0.003 RMSE of 64 steps on this teacher, against errors of 0.03 to 2 for the few-step solvers)."""
    latents, labels = fit_batch(teacher, 8, seed=HELD_OUT_SEED)
    return latents, labels, HeunSampler(num_steps=32)(teacher, latents, labels)


def tiny_net(label_dim: int = 0) -> EDMPrecond:
    torch.manual_seed(0)
    return EDMPrecond(**{**TINY_SONG_UNET, "model_channels": 16, "attn_resolutions": []}, label_dim=label_dim).eval()


def gaussian_teacher() -> GaussianTeacher:
    return GaussianTeacher(0.3, 0.4, img_channels=1, img_resolution=4)


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).square().mean().sqrt().item()


# ----------------------------------------------------------------------------------------------------------
# The base solver, exactly.

@pytest.mark.parametrize("label_dim", [0, 4])
@pytest.mark.parametrize("num_steps", [2, 5])
def test_zero_lambdas_reproduce_the_base_samplers_exactly(label_dim, num_steps):
    net = tiny_net(label_dim)
    latents, labels = fit_batch(net, 3, seed=FIT_SEED)
    heun_dode = DODESampler.base(Solver.HEUN, num_steps)
    euler_dode = DODESampler.base("euler", num_steps)
    assert heun_dode.num_network_calls == HeunSampler(num_steps=num_steps).num_network_calls == 2 * num_steps - 1
    assert torch.equal(heun_dode(net, latents, labels), HeunSampler(num_steps=num_steps)(net, latents, labels))
    euler = EulerSampler(tuple(edm_sigmas(num_steps, 0.002, 80.0, 7.0).tolist()))
    assert euler_dode.num_network_calls == euler.num_network_calls == num_steps
    assert torch.equal(euler_dode(net, latents, labels), euler(net, latents, labels))


def test_the_teacher_schedule_contains_the_student_schedule():
    # The premise of the fit: every C-th σ of C·(K − 1) + 1 Karras steps is a σ of K steps, and both end at 0.
    for num_steps, multiplier in [(2, 3), (4, 10), (7, 4)]:
        student = edm_sigmas(num_steps, 0.002, 80.0, 7.0)
        teacher = edm_sigmas(multiplier * (num_steps - 1) + 1, 0.002, 80.0, 7.0)
        matched = torch.cat([teacher[:-1:multiplier], teacher[-1:]])
        torch.testing.assert_close(matched, student, rtol=1e-14, atol=0)


# ----------------------------------------------------------------------------------------------------------
# The solver loop's extrapolation.

class SigmaValued:
    """A fake denoiser whose output is the σ of the call everywhere, so each D identifies its call."""

    def __call__(self, x, sigma, class_labels=None):
        return torch.full_like(x, float(sigma), dtype=torch.float64)


def test_completing_call_extrapolates_from_the_latest_output_at_a_higher_sigma():
    sigmas = edm_sigmas(3, 0.002, 80.0, 7.0)
    s0, s1, s2 = sigmas[:3].tolist()
    x = torch.zeros(1, 1, 1, 1)
    steps = []
    sample_dode(SigmaValued(), x, sigmas, Solver.HEUN, (0.5, -2.0, 3.0), callback=steps.append)

    def value(denoised: torch.Tensor) -> float:
        return denoised.item()

    # Heun's first step: the corrector (σ1) extrapolates from the predictor's output (σ0).
    assert [value(steps[0]["reference"]), value(steps[0]["denoised"])] == [s0, s1 + 0.5 * (s1 - s0)]
    # The next step: its first call (σ1) is left alone, its corrector (σ2) extrapolates from σ1.
    assert [value(steps[1]["reference"]), value(steps[1]["denoised"])] == [s1, s2 - 2.0 * (s2 - s1)]
    # The final Euler step to 0: the previous call shares σ2, so the reference is the σ1 call before it.
    assert [value(steps[2]["reference"]), value(steps[2]["denoised"])] == [s1, s2 + 3.0 * (s2 - s1)]
    with pytest.raises(RuntimeError, match="no earlier output"):
        sample_dode(SigmaValued(), x, sigmas, Solver.EULER, (1.0, None, None))
    with pytest.raises(ValueError, match="strictly decreasing"):  # σ may not rise within a solve
        sample_dode(SigmaValued(), x, sigmas.flip(0), Solver.EULER, (None, None, None))


def test_lambdas_must_fit_the_solver():
    assert DODESampler.base(Solver.HEUN, 4).lambdas == (0.0,) * 4  # one per step
    assert DODESampler.base(Solver.EULER, 4).lambdas == (0.0,) * 3  # Euler's first step has no reference
    with pytest.raises(ValueError, match="needs 4 λ's"):
        DODESampler(Solver.HEUN, 4, (0.0,) * 3)
    with pytest.raises(ValueError, match="choose one of"):
        DODESampler("dpm2", 4, (0.0,) * 4)
    with pytest.raises(ValueError, match="finite"):
        DODESampler(Solver.EULER, 3, (0.0, float("nan")))
    with pytest.raises(ValueError, match="at least 2"):
        DODESampler.base(Solver.EULER, 1)
    with pytest.raises(ValueError, match="multiplier"):
        fit_dode(gaussian_teacher(), Solver.EULER, 3, multiplier=1, num_samples=4)


# ----------------------------------------------------------------------------------------------------------
# Distillation.

@pytest.mark.parametrize("solver", list(Solver))
@pytest.mark.parametrize("num_steps", [3, 5])
def test_fit_is_exact_on_the_gaussian_teacher(solver, num_steps):
    # For Gaussian data every state is μ + c (z − μ) with one scalar c per state, and so is D − D_ref: each λ
    # moves c to the teacher's. The fitted solver then matches the C-times-finer solve on any latents.
    net = gaussian_teacher()
    sampler = fit_dode(net, solver, num_steps, multiplier=MULTIPLIER, num_samples=8, seed=FIT_SEED)
    latents = fit_batch(net, 16, seed=HELD_OUT_SEED)[0].to(torch.float64)
    fine = DODESampler.base(solver, MULTIPLIER * (num_steps - 1) + 1)(net, latents)
    plain = DODESampler.base(solver, num_steps)(net, latents)
    assert sampler.fit.loss < 1e-20 < 1e-3 < sampler.fit.loss_base
    assert rmse(sampler(net, latents), fine) < 1e-6
    assert rmse(plain, fine) > 1e-2


class Recording:
    """Passes calls through to a denoiser and records the input state and σ of each call."""

    def __init__(self, net):
        self.net = net
        self.calls: list[tuple[torch.Tensor, float]] = []

    def __call__(self, x, sigma, class_labels=None):
        self.calls.append((x, float(sigma)))
        return self.net(x, sigma, class_labels)


@pytest.mark.parametrize("solver", list(Solver))
def test_every_fitted_step_lands_on_the_fine_solve_for_the_gaussian_teacher(solver):
    # Each λ is fitted to its step's result; the states x_k are the inputs of the last call at each σ_k.
    net, num_steps = gaussian_teacher(), 4
    sampler = fit_dode(net, solver, num_steps, multiplier=MULTIPLIER, num_samples=8, seed=FIT_SEED)
    latents = fit_batch(net, 16, seed=HELD_OUT_SEED)[0].to(torch.float64)
    recording = Recording(net)
    sampler(recording, latents)
    fine = edm_sigmas(MULTIPLIER * (num_steps - 1) + 1, sampler.sigma_min, sampler.sigma_max, sampler.rho)
    x = latents * sampler.sigma_max
    first_fitted = solver.first_adjusted_step + 1  # the state after the first step with a λ
    for k, sigma in enumerate(sampler.sigmas[first_fitted:-1].tolist(), start=first_fitted):
        state = [state for state, call_sigma in recording.calls if call_sigma == sigma][-1]
        assert rmse(state, solver.integrator(net, x, fine[:MULTIPLIER * k + 1])) < 1e-10


def test_fit_is_deterministic_and_depends_on_the_seed():
    net = tiny_net(label_dim=4)
    first = fit_dode(net, Solver.HEUN, 3, multiplier=MULTIPLIER, num_samples=6, seed=FIT_SEED)
    again = fit_dode(net, Solver.HEUN, 3, multiplier=MULTIPLIER, num_samples=6, seed=FIT_SEED)
    other = fit_dode(net, Solver.HEUN, 3, multiplier=MULTIPLIER, num_samples=6, seed=FIT_SEED + 1)
    assert first == again
    assert first.lambdas != other.lambdas
    assert first.fit == DODEFit(multiplier=MULTIPLIER, num_samples=6, seed=FIT_SEED,
                                loss_base=first.fit.loss_base, loss=first.fit.loss)
    assert first.fit.loss < first.fit.loss_base


@pytest.mark.parametrize("solver, num_steps", [(Solver.HEUN, 3), (Solver.HEUN, 4), (Solver.EULER, 4),
                                               (Solver.EULER, 8)])
def test_fitted_solver_is_closer_to_the_many_step_solution(teacher, held_out, solver, num_steps):
    latents, labels, reference = held_out
    sampler = fit_dode(teacher, solver, num_steps, multiplier=MULTIPLIER, num_samples=8, seed=FIT_SEED)
    plain = DODESampler.base(solver, num_steps)
    assert sampler.fit.loss < sampler.fit.loss_base
    fitted_error = rmse(sampler(teacher, latents, labels), reference)
    plain_error = rmse(plain(teacher, latents, labels), reference)
    assert fitted_error < plain_error, (fitted_error, plain_error)


# ----------------------------------------------------------------------------------------------------------
# The sampler file and the command line.

def test_save_load_round_trip(tmp_path):
    net = gaussian_teacher()
    sampler = fit_dode(net, Solver.HEUN, 3, multiplier=MULTIPLIER, num_samples=4, seed=FIT_SEED,
                       sigma_min=0.005, sigma_max=40.0, rho=5.0)
    path = tmp_path / "sampler.pt"
    sampler.save(path)
    loaded = DODESampler.load(path)
    assert loaded == sampler
    assert (loaded.sigma_min, loaded.sigma_max, loaded.rho) == (0.005, 40.0, 5.0)
    raw = torch.load(path, weights_only=True)  # plain values only: loading runs no code
    assert raw["solver"] == "heun" and raw["fit"]["multiplier"] == MULTIPLIER
    latents = fit_batch(net, 4, seed=HELD_OUT_SEED)[0]
    assert torch.equal(loaded(net, latents), sampler(net, latents))


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "other.pt"
    fileio.atomic_torch_save({"lambdas": [0.0]}, path)
    with pytest.raises(ValueError, match="not a D-ODE sampler file"):
        DODESampler.load(path)
    data = DODESampler.base(Solver.EULER, 3).to_dict()
    fileio.atomic_torch_save({**data, "churn": 0.1}, path)
    with pytest.raises(ValueError, match=r"unknown entries \['churn'\]"):
        DODESampler.load(path)
    fileio.atomic_torch_save({**data, "version": 0}, path)
    with pytest.raises(ValueError, match="version 0"):
        DODESampler.load(path)


def test_command_line_writes_the_sampler_under_runs_not_beside_the_teacher(tmp_path, capsys, monkeypatch):
    (tmp_path / "model_zoo").mkdir()
    teacher_path = tmp_path / "model_zoo" / "teacher.pt"
    shutil.copy(BUNDLED_TEACHER, teacher_path)
    monkeypatch.chdir(tmp_path)
    args = ["--teacher", str(teacher_path), "--solver", "euler", "--steps", "3", "--multiplier", "2",
            "--num-samples", "4", "--seed", "7", "--device", "cpu"]
    assert fit_dode_cli.main(args) == 0
    written = tmp_path / "runs" / "dode" / "teacher.dode-euler-3.pt"
    assert "wrote runs/dode/teacher.dode-euler-3.pt" in capsys.readouterr().out
    assert sorted(path.name for path in (tmp_path / "model_zoo").iterdir()) == ["teacher.pt"]
    sampler = DODESampler.load(written)
    expected = fit_dode(load_teacher(teacher_path), Solver.EULER, 3, multiplier=2, num_samples=4, seed=7)
    assert sampler == expected
    assert dataclasses.astuple(sampler.fit)[:3] == (2, 4, 7)
