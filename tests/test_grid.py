"""KarrasGrid: PID's time grid (docs/method.md §3), index sampling and neighbours."""

import math

import pytest
import torch

from pid_diffusion.grid import KarrasGrid

T, EPS, RHO = 80.0, 0.002, 7.0


def test_sigmas_follow_the_formula():
    grid = KarrasGrid(num_points=6, rho=RHO, sigma_min=EPS, sigma_max=T)
    expected = [(T ** (1 / RHO) + i / 5 * (EPS ** (1 / RHO) - T ** (1 / RHO))) ** RHO for i in range(6)]
    assert grid.sigmas.dtype == torch.float64
    assert torch.allclose(grid.sigmas, torch.tensor(expected, dtype=torch.float64), rtol=1e-14, atol=0)
    assert grid.sigmas[0].item() == T and grid.sigmas[-1].item() == EPS
    assert (grid.sigmas[1:] < grid.sigmas[:-1]).all()


def test_sigmas_match_edm_sampler_schedule(edm_fixtures_dir):
    # EDM's Heun sampler calls its net at t_0, then t_k twice (Heun correction, then Euler step) for k ≥ 1.
    reference = torch.load(edm_fixtures_dir / "ref_sampler.pt", weights_only=True)
    kwargs = reference["sampler_kwargs"]
    per_call = reference["cases"]["song_uncond"]["sigma_per_call"]
    edm_sigmas = torch.cat([per_call[:1], per_call[1::2]])
    grid = KarrasGrid(kwargs["num_steps"], kwargs["rho"], kwargs["sigma_min"], kwargs["sigma_max"])
    assert torch.allclose(grid.sigmas, edm_sigmas, rtol=1e-13, atol=0)


@pytest.mark.parametrize("kwargs, problem", [
    (dict(num_points=1, rho=RHO, sigma_min=EPS, sigma_max=T), "at least 2 points"),
    (dict(num_points=10, rho=RHO, sigma_min=0.0, sigma_max=T), "0 < sigma_min < sigma_max"),
    (dict(num_points=10, rho=RHO, sigma_min=T, sigma_max=EPS), "0 < sigma_min < sigma_max"),
    (dict(num_points=10, rho=0.0, sigma_min=EPS, sigma_max=T), "must be positive"),
])
def test_invalid_grids_are_rejected(kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        KarrasGrid(**kwargs)


def test_sample_indices_are_uniform_and_reproducible():
    grid = KarrasGrid(5, RHO, EPS, T)
    draws = 20_000
    indices = grid.sample_indices(draws, torch.Generator().manual_seed(0))
    again = grid.sample_indices(draws, torch.Generator().manual_seed(0))
    assert torch.equal(indices, again) and indices.dtype == torch.int64
    counts = torch.bincount(indices, minlength=5).double()
    # Binomial standard deviation of each count is sqrt(draws · 0.2 · 0.8) ≈ 57; allow 5 of them.
    assert torch.allclose(counts, torch.full_like(counts, draws / 5), atol=5 * math.sqrt(draws * 0.2 * 0.8))


def test_interior_indices_exclude_the_end_points():
    grid = KarrasGrid(5, RHO, EPS, T)
    indices = grid.sample_indices(5_000, torch.Generator().manual_seed(1), interior_only=True)
    assert set(indices.tolist()) == {1, 2, 3}
    with pytest.raises(ValueError, match="no interior points"):
        KarrasGrid(2, RHO, EPS, T).sample_indices(3, torch.Generator(), interior_only=True)


def test_forward_neighbours_use_the_official_backward_step_at_the_last_point():
    grid = KarrasGrid(5, RHO, EPS, T)
    assert grid.forward_neighbours(torch.tensor([0, 1, 2, 3, 4])).tolist() == [1, 2, 3, 4, 3]


def test_central_neighbours_need_interior_indices():
    grid = KarrasGrid(5, RHO, EPS, T)
    before, after = grid.central_neighbours(torch.tensor([1, 2, 3]))
    assert before.tolist() == [0, 1, 2] and after.tolist() == [2, 3, 4]
    for boundary in (0, 4):
        with pytest.raises(ValueError, match="interior indices"):
            grid.check_indices(torch.tensor([2, boundary]), interior_only=True)


def test_bad_indices_are_rejected():
    grid = KarrasGrid(5, RHO, EPS, T)
    with pytest.raises(ValueError, match="N = 5"):
        grid.check_indices(torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="N = 5"):
        grid.check_indices(torch.tensor([-1]))
    with pytest.raises(TypeError, match="integer"):
        grid.check_indices(torch.tensor([1.0]))


def test_the_sigma_table_is_copied_to_a_device_once():
    grid = KarrasGrid(7, RHO, EPS, T)
    meta = torch.device("meta")
    first = grid.times(torch.tensor([1, 2], device=meta))
    assert first.device == meta and grid.sigmas_on(meta) is grid.sigmas_on(meta)
    assert grid.sigmas_on(torch.device("cpu")) is grid.sigmas


def test_the_training_objective_reads_no_index_back_from_the_device(monkeypatch):
    """The step's indices come from sample_indices (in range by construction): neither the objective nor the
    grid's lookups call check_indices, whose min/max would be a device-to-host sync per micro-batch on CUDA."""
    from pid_diffusion.loss import PIDObjective
    from pid_diffusion.distances import Metric
    from pid_diffusion.networks.edm import EDMPrecond
    from pid_diffusion.student import PIDStudent

    teacher = EDMPrecond(img_resolution=8, img_channels=3, model_type="SongUNet", model_channels=8,
                         channel_mult=[1], num_blocks=1, attn_resolutions=[]).eval().requires_grad_(False)
    student = PIDStudent.from_teacher(teacher, EPS, T)
    grid = KarrasGrid(5, RHO, EPS, T)
    objective = PIDObjective(teacher, grid, Metric.L2.build())
    monkeypatch.setattr(KarrasGrid, "check_indices", lambda *args, **kwargs: pytest.fail("checked on every call"))
    losses = objective(student, objective.sample_batch(torch.Generator().manual_seed(0), 3))
    assert losses.shape == (3,) and torch.isfinite(losses).all()


def test_times_index_the_float64_grid():
    grid = KarrasGrid(7, RHO, EPS, T)
    indices = torch.tensor([6, 0, 3])
    assert torch.equal(grid.times(indices), grid.sigmas[indices])
