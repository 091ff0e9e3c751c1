"""The PID residual (Eq. 8 / Eq. 9) on real EDM networks, and the PIDObjective protocol."""

import copy

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from pid_diffusion.utils import dist
from pid_diffusion.grid import KarrasGrid
from pid_diffusion.loss import Derivative, PIDObjective, ResidualForm, pid_residual
from pid_diffusion.distances import L2
from pid_diffusion.student import PIDStudent

from factories import tiny_teacher

T, EPS, RHO = 80.0, 0.002, 7.0  # PID's grid (docs/method.md §3)
NUM_POINTS = 12
@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher()


@pytest.fixture
def student(teacher):
    return PIDStudent.from_teacher(teacher, EPS, T)


@pytest.fixture(scope="module")
def grid():
    return KarrasGrid(NUM_POINTS, RHO, EPS, T)


def latents(batch=4, seed=0):
    return T * torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def residual_and_grads(student, teacher, z, indices, grid, **options):
    """pid_residual and the gradient of its mean with respect to the student's parameters."""
    student.zero_grad()
    residual = pid_residual(student, teacher, z, indices, grid=grid, metric=L2(), **options)
    residual.mean().backward()
    return residual.detach(), [p.grad.clone() for p in student.parameters()]


def reference_residual_and_grads(student, teacher, z, indices, grid, derivative, stop_neighbour_grad):
    """Eq. 9 written out with one student call per time, as the paper states it."""
    student.zero_grad()
    sigma = grid.sigmas
    t_i = sigma[indices].float()
    if derivative is Derivative.FORWARD:
        a, b = indices, torch.where(indices == grid.num_points - 1, indices - 1, indices + 1)
    else:
        a, b = indices - 1, indices + 1
    y_i = student(z, t_i)
    y_a = y_i if derivative is Derivative.FORWARD else student(z, sigma[a].float())
    y_b = student(z, sigma[b].float())
    if stop_neighbour_grad:
        y_b = y_b.detach()
        y_a = y_a if derivative is Derivative.FORWARD else y_a.detach()
    dy_dt = (y_a - y_b) / (sigma[a] - sigma[b]).float().reshape(-1, 1, 1, 1)
    with torch.no_grad():
        denoised = teacher(y_i.detach(), t_i)
    residual = L2()(y_i - t_i.reshape(-1, 1, 1, 1) * dy_dt, denoised)
    residual.mean().backward()
    return residual.detach(), [p.grad.clone() for p in student.parameters()]


def assert_same(result, reference):
    (residual, grads), (expected_residual, expected_grads) = result, reference
    assert torch.allclose(residual, expected_residual, rtol=1e-4, atol=0)
    for grad, expected in zip(grads, expected_grads):
        assert torch.allclose(grad, expected, rtol=1e-3, atol=1e-5 * expected.abs().max().item() + 1e-12)


@pytest.mark.parametrize("derivative, indices", [
    (Derivative.FORWARD, [0, 5, NUM_POINTS - 2, NUM_POINTS - 1]),
    (Derivative.CENTRAL, [1, 5, 9, NUM_POINTS - 2]),
])
@pytest.mark.parametrize("stop_neighbour_grad", [False, True])
def test_one_concatenated_batch_equals_separate_calls(student, teacher, grid, derivative, indices,
                                                      stop_neighbour_grad):
    z, indices = latents(), torch.tensor(indices)
    result = residual_and_grads(student, teacher, z, indices, grid, derivative=derivative,
                                stop_neighbour_grad=stop_neighbour_grad)
    reference = reference_residual_and_grads(student, teacher, z, indices, grid, derivative, stop_neighbour_grad)
    assert_same(result, reference)
    assert (result[0] > 0).all()


class RecordingStudent(torch.nn.Module):
    """The student, keeping each output with its gradient: pid_residual's one call returns the concatenated
    [y_i, neighbours...] batch, whose chunks' gradients are the loss's gradients with respect to each value."""

    def __init__(self, student):
        super().__init__()
        self.student = student
        self.outputs = []

    def forward(self, z, t, class_labels=None):
        y = self.student(z, t, class_labels)
        y.retain_grad()
        self.outputs.append(y)
        return y


def value_gradients(residual_fn, student, teacher, z, indices, grid, derivative, stop_neighbour_grad):
    """The residual, and the gradients of its mean with respect to y_i and to each neighbour value."""
    recording = RecordingStudent(student)
    residual = residual_fn(recording, teacher, z, indices, grid=grid, metric=L2(), derivative=derivative,
                           stop_neighbour_grad=stop_neighbour_grad)
    residual.mean().backward()
    (output,) = recording.outputs
    y_i, *neighbours = output.grad.chunk(2 if derivative is Derivative.FORWARD else 3)
    return residual.detach(), y_i, neighbours


def check_stop_neighbour_grad(residual_fn, student, teacher, grid, derivative, indices):
    """stop_neighbour_grad leaves the loss value and its gradient through y_i unchanged, and gives every
    neighbour value a gradient of exactly zero, where without it the neighbours receive a gradient ≥ 100× the
    tolerance of the y_i comparison. Returns that margin."""
    z = latents()
    full = value_gradients(residual_fn, student, teacher, z, indices, grid, derivative, False)
    stopped = value_gradients(residual_fn, student, teacher, z, indices, grid, derivative, True)
    assert torch.equal(full[0], stopped[0]), "the loss value changed"
    tolerance = 1e-6 * full[1].abs().max().item()
    torch.testing.assert_close(stopped[1], full[1], rtol=0, atol=tolerance)
    signal = min(n.abs().max().item() for n in full[2])
    assert signal > 100 * tolerance, f"neighbour gradients {signal:.3g} are too small to see"
    for neighbour in stopped[2]:
        assert torch.count_nonzero(neighbour) == 0, "a neighbour value received a gradient"
    return signal / tolerance


@pytest.mark.parametrize("derivative, indices", [
    (Derivative.FORWARD, [0, 3, 6, NUM_POINTS - 1]),  # the last: a backward difference
    (Derivative.CENTRAL, [1, 3, 6, NUM_POINTS - 2]),
])
def test_stop_neighbour_grad_zeroes_the_neighbours_gradient_not_the_value(student, teacher, grid, derivative,
                                                                          indices):
    margin = check_stop_neighbour_grad(pid_residual, student, teacher, grid, derivative, torch.tensor(indices))
    assert margin > 1e3  # measured 2e6 (forward), 5e5 (central): neighbours get gradients like y_i's


@pytest.mark.parametrize("mutant", ["flag ignored", "y_i detached instead"])
def test_stop_neighbour_grad_check_fails_on_mutants(student, teacher, grid, monkeypatch, mutant):
    import pid_diffusion.loss as loss_module
    original = loss_module._trajectory_and_derivative

    def broken(student, z, indices, class_labels, grid, derivative, stop_neighbour_grad):
        if mutant == "flag ignored":
            return original(student, z, indices, class_labels, grid, derivative, False)
        y_i, dy_dt = original(student, z, indices, class_labels, grid, derivative, False)
        return (y_i.detach(), dy_dt) if stop_neighbour_grad else (y_i, dy_dt)

    monkeypatch.setattr(loss_module, "_trajectory_and_derivative", broken)
    with pytest.raises(AssertionError):
        check_stop_neighbour_grad(pid_residual, student, teacher, grid, Derivative.FORWARD, torch.tensor([0, 3, 6, 9]))


def test_teacher_receives_no_gradient(student, grid):
    teacher = tiny_teacher(seed=1).requires_grad_(True)
    residual_and_grads(student, teacher, latents(), torch.tensor([0, 4, 8, 11]), grid)
    assert all(p.grad is None for p in teacher.parameters())


def test_jvp_is_the_exact_time_derivative(student, teacher, grid):
    # Reference: the same Eq. 9 with ∂x_θ/∂t from reverse-mode double backward instead of forward-mode AD.
    z, indices = latents(), torch.tensor([0, 3, 7, 11])
    result = residual_and_grads(student, teacher, z, indices, grid, derivative=Derivative.JVP)
    student.zero_grad()
    t_i = grid.sigmas[indices].float()
    y_i, dy_dt = torch.autograd.functional.jvp(lambda t: student(z, t), t_i, torch.ones_like(t_i), create_graph=True)
    with torch.no_grad():
        denoised = teacher(y_i.detach(), t_i)
    residual = L2()(y_i - t_i.reshape(-1, 1, 1, 1) * dy_dt, denoised)
    residual.mean().backward()
    assert_same(result, (residual.detach(), [p.grad.clone() for p in student.parameters()]))
    assert all(torch.isfinite(g).all() for g in result[1]) and any(g.abs().max() > 0 for g in result[1])


def test_jvp_trains_through_ddp_like_the_bare_student(student, teacher, grid):
    # The training loop hands the objective a DDP-wrapped student, whose forward broadcasts buffers in place
    # at every step (torch.func.jvp rejected that from the second step on). On a one-process group DDP must
    # change nothing: three SGD steps equal those of the bare student.
    dist.init()
    try:
        bare = copy.deepcopy(student)
        wrapped = DistributedDataParallel(student)
        objective = PIDObjective(teacher, grid, L2(), derivative=Derivative.JVP)
        optimizers = [torch.optim.SGD(model.parameters(), lr=1e-3) for model in (student, bare)]
        for step in range(3):
            batch = objective.sample_batch(torch.Generator().manual_seed(step), 4)
            for model, optimizer in zip((wrapped, bare), optimizers):
                optimizer.zero_grad()
                objective(model, batch).mean().backward()
                optimizer.step()
    finally:
        dist.shutdown()
    for (name, trained), expected in zip(student.named_parameters(), bare.parameters()):
        torch.testing.assert_close(trained, expected, rtol=1e-5, atol=1e-7, msg=name)
    # The bottleneck's attention (a softmax under forward-mode AD) was trained too.
    assert not torch.equal(student.model.dec["4x4_in0"].qkv.weight, teacher.model.dec["4x4_in0"].qkv.weight)


def test_jvp_rejects_a_student_blind_to_the_time_tangent(teacher, grid):
    class TimeBlind(torch.nn.Module):
        def forward(self, z, t, class_labels=None):
            return z * float(t[0])  # t leaves the graph through a Python float

    with pytest.raises(RuntimeError, match="TimeBlind dropped the time tangent"):
        pid_residual(TimeBlind(), teacher, latents(2), torch.tensor([0, 3]), grid=grid, metric=L2(),
                     derivative=Derivative.JVP)


@pytest.mark.parametrize("derivative, indices", [
    (Derivative.FORWARD, [0, 4, 10, 11]), (Derivative.CENTRAL, [1, 4, 8, 10]), (Derivative.JVP, [0, 4, 8, 11]),
])
def test_denoiser_form_is_t_squared_times_derivative_form_for_l2(student, teacher, grid, derivative, indices):
    z, indices = latents(), torch.tensor(indices)
    with torch.no_grad():
        eq9 = pid_residual(student, teacher, z, indices, grid=grid, metric=L2(), derivative=derivative)
        eq8 = pid_residual(student, teacher, z, indices, grid=grid, metric=L2(), derivative=derivative,
                           form=ResidualForm.DERIVATIVE)
    t_i = grid.sigmas[indices].float()
    assert torch.allclose(eq9, t_i ** 2 * eq8, rtol=1e-4, atol=0)


def test_conditional_labels_reach_student_and_teacher(grid):
    teacher = tiny_teacher(label_dim=10)
    student = PIDStudent.from_teacher(teacher, EPS, T)
    z, indices = latents(2), torch.tensor([3, 7])
    labels, other = torch.eye(10)[[2, 9]], torch.eye(10)[[4, 0]]
    for derivative in (Derivative.FORWARD, Derivative.CENTRAL, Derivative.JVP):
        with torch.no_grad():
            a = pid_residual(student, teacher, z, indices, labels, grid=grid, metric=L2(),
                             derivative=derivative)
            b = pid_residual(student, teacher, z, indices, other, grid=grid, metric=L2(),
                             derivative=derivative)
        assert not torch.allclose(a, b)


def test_invalid_requests_are_rejected(student, teacher, grid):
    z = latents(2)
    options = dict(grid=grid, metric=L2())
    with pytest.raises(ValueError, match="interior"):
        pid_residual(student, teacher, z, torch.tensor([0, 3]), derivative=Derivative.CENTRAL, **options)
    with pytest.raises(ValueError, match="interior"):
        pid_residual(student, teacher, z, torch.tensor([3, NUM_POINTS - 1]), derivative=Derivative.CENTRAL, **options)
    with pytest.raises(ValueError, match="Derivative.JVP has none"):
        pid_residual(student, teacher, z, torch.tensor([0, 3]), derivative=Derivative.JVP,
                     stop_neighbour_grad=True, **options)
    with pytest.raises(ValueError, match="one grid index per latent"):
        pid_residual(student, teacher, z, torch.tensor([0, 3, 4]), **options)
    with pytest.raises(TypeError, match="Derivative member"):
        pid_residual(student, teacher, z, torch.tensor([0, 3]), derivative="forward", **options)
    with pytest.raises(ValueError, match="one distance per sample"):
        pid_residual(student, teacher, z, torch.tensor([0, 3]), grid=grid, metric=lambda a, b: (a - b).square().mean())


# ----------------------------------------------------------------------------------------------------------
# PIDObjective: the noise stream is PID's data set.

def test_sample_batch_draws_latents_indices_then_labels():
    teacher = tiny_teacher(label_dim=10)
    grid = KarrasGrid(NUM_POINTS, RHO, EPS, T)
    objective = PIDObjective(teacher, grid, L2())
    batch = objective.sample_batch(torch.Generator().manual_seed(7), 5)
    generator = torch.Generator().manual_seed(7)
    expected_z = T * torch.randn(5, 3, 8, 8, generator=generator)
    expected_indices = torch.randint(0, NUM_POINTS, (5,), generator=generator)
    expected_classes = torch.randint(0, 10, (5,), generator=generator)
    assert batch.keys() == {"z", "indices", "class_labels"}
    assert torch.equal(batch["z"], expected_z) and torch.equal(batch["indices"], expected_indices)
    assert torch.equal(batch["class_labels"], torch.eye(10)[expected_classes])


def test_sample_batch_covers_grid_and_classes_uniformly():
    teacher = tiny_teacher(label_dim=10)
    grid = KarrasGrid(NUM_POINTS, RHO, EPS, T)
    batch = PIDObjective(teacher, grid, L2()).sample_batch(torch.Generator().manual_seed(0), 6000)
    assert set(batch["indices"].tolist()) == set(range(NUM_POINTS))
    assert batch["class_labels"].sum(0).min() > 500 and batch["z"].std().item() == pytest.approx(T, rel=0.01)
    central = PIDObjective(teacher, grid, L2(), derivative=Derivative.CENTRAL)
    indices = central.sample_batch(torch.Generator().manual_seed(0), 6000)["indices"]
    assert set(indices.tolist()) == set(range(1, NUM_POINTS - 1))


def test_unconditional_batches_have_no_labels(teacher, grid):
    batch = PIDObjective(teacher, grid, L2()).sample_batch(torch.Generator().manual_seed(0), 3)
    assert batch.keys() == {"z", "indices"} and batch["z"].shape == (3, 3, 8, 8)


def test_objective_call_is_the_pid_residual(student, teacher, grid):
    objective = PIDObjective(teacher, grid, L2(), derivative=Derivative.CENTRAL,
                             form=ResidualForm.DERIVATIVE, stop_neighbour_grad=True)
    batch = objective.sample_batch(torch.Generator().manual_seed(3), 4)
    with torch.no_grad():
        expected = pid_residual(student, teacher, batch["z"], batch["indices"], grid=grid, metric=L2(),
                                derivative=Derivative.CENTRAL, form=ResidualForm.DERIVATIVE)
        assert torch.equal(objective(student, batch), expected)


def test_objective_rejects_meaningless_options(teacher, grid):
    with pytest.raises(ValueError, match="Derivative.JVP has none"):
        PIDObjective(teacher, grid, L2(), derivative=Derivative.JVP, stop_neighbour_grad=True)
    with pytest.raises(TypeError, match="img_channels"):
        PIDObjective(torch.nn.Identity(), grid, L2())
