"""Activation checkpointing: the same numbers, the same state_dict, less saved activation memory, and a clear
error where it cannot work (forward-mode AD). LPIPS runs on random weight files in a temporary TORCH_HOME."""

import copy
from pathlib import Path

import pytest
import torch

from pid_diffusion import distill
from pid_diffusion.distill import resolve
from pid_diffusion.grid import KarrasGrid
from pid_diffusion.loss import Derivative, pid_residual
from pid_diffusion.distances import L2
from pid_diffusion.networks.edm import EDMPrecond, UNetBlock
from pid_diffusion.utils.perf import (ActivationRecomputationError, RecomputedSequential, RecomputedUNetBlock,
                                disable_activation_recomputation, enable_activation_recomputation,
                                enable_lpips_recomputation)
from pid_diffusion.student import PIDStudent

from factories import LPIPS_CHANNELS, TINY_SONG_UNET, lpips_metrics_on

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
# Tiny networks with every block kind: resampling, attention (SongUNet at 8×8, ADM everywhere), dropout on.
SONG = {**TINY_SONG_UNET, "img_resolution": 16, "model_channels": 16, "attn_resolutions": [8], "dropout": 0.2}
ADM = dict(img_resolution=8, img_channels=3, label_dim=4, model_type="DhariwalUNet", model_channels=64,
           channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.2)


def make_student(kwargs: dict) -> PIDStudent:
    torch.manual_seed(0)
    return PIDStudent(kwargs, SIGMA_MIN, SIGMA_MAX, sigma_data=0.5).train()


def inputs(student: PIDStudent, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(1)
    shape = (batch, student.img_channels, student.img_resolution, student.img_resolution)
    z = SIGMA_MAX * torch.randn(shape, generator=generator)
    t = torch.tensor([0.01, 1.0, 40.0])[:batch]
    labels = torch.eye(student.label_dim)[:batch] if student.label_dim else None
    return z, t, labels


def output_and_grads(student: PIDStudent) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """x_θ and d(Σ x_θ²)/dθ on fixed inputs, the dropout masks drawn from a fixed seed."""
    student.zero_grad(set_to_none=True)
    torch.manual_seed(2)
    out = student(*inputs(student))
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in student.parameters()]


@pytest.mark.parametrize("kwargs", [SONG, ADM], ids=["SongUNet", "DhariwalUNet"])
def test_identical_outputs_gradients_and_state_dict(kwargs):
    plain, wrapped = make_student(kwargs), make_student(kwargs)
    blocks = sum(isinstance(m, UNetBlock) for m in wrapped.modules())
    assert enable_activation_recomputation(wrapped) == blocks > 0
    assert all(type(m) is RecomputedUNetBlock for m in wrapped.modules() if isinstance(m, UNetBlock))

    assert list(wrapped.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(wrapped.state_dict().values(), plain.state_dict().values()))
    out_plain, grads_plain = output_and_grads(plain)
    out_wrapped, grads_wrapped = output_and_grads(wrapped)
    # Bit for bit: the recomputation replays the same kernels and, through the restored RNG, the same dropout.
    assert torch.equal(out_plain, out_wrapped)
    assert all(torch.equal(a, b) for a, b in zip(grads_plain, grads_wrapped))
    assert not all(torch.equal(g, torch.zeros_like(g)) for g in grads_wrapped)


def test_pid_residual_gradients_unchanged():
    """Through the PID loss (one concatenated student batch, a teacher under no_grad), as training runs it."""
    torch.manual_seed(3)
    teacher = EDMPrecond(**{**SONG, "dropout": 0.0}).eval().requires_grad_(False)
    grid = KarrasGrid(num_points=10, rho=7.0, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
    z, _, _ = inputs(make_student(SONG))
    indices = torch.tensor([0, 4, 9])

    def loss_grads(student):
        torch.manual_seed(4)
        pid_residual(student, teacher, z, indices, grid=grid, metric=L2()).sum().backward()
        return [p.grad for p in student.parameters()]

    plain, wrapped = make_student(SONG), make_student(SONG)
    enable_activation_recomputation(wrapped)
    assert all(torch.equal(a, b) for a, b in zip(loss_grads(plain), loss_grads(wrapped)))


def saved_activation_bytes(module: torch.nn.Module, *args: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of `module(*args)` (parameters excluded)."""
    parameters = {p.data_ptr() for p in module.parameters()}
    saved = {}

    def pack(tensor):
        if tensor.data_ptr() not in parameters:
            saved[tensor.data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(*args)
    return sum(saved.values())


def test_saves_less_activation_memory():
    plain, wrapped = make_student(SONG), make_student(SONG)
    enable_activation_recomputation(wrapped)
    # Only each block's inputs are kept: far below half of what the plain network stores.
    assert saved_activation_bytes(wrapped, *inputs(wrapped)) < 0.5 * saved_activation_bytes(plain, *inputs(plain))


def test_forward_mode_ad_trains_without_checkpointing_and_is_refused_with_it():
    student = make_student(SONG)
    teacher = EDMPrecond(**{**SONG, "dropout": 0.0}).eval().requires_grad_(False)
    grid = KarrasGrid(num_points=10, rho=7.0, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
    z, _, _ = inputs(student)
    indices = torch.tensor([0, 4, 9])

    def jvp_loss():
        return pid_residual(student, teacher, z, indices, grid=grid, metric=L2(), derivative=Derivative.JVP).sum()

    # Without checkpointing the JVP residual trains: reverse mode through the forward-mode tangent (attention
    # included) reaches every weight that x_θ depends on.
    loss = jvp_loss()
    loss.backward()
    grads = {name: p.grad for name, p in student.named_parameters()}
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    attention = [g for name, g in grads.items() if ".qkv." in name]
    assert attention and all(g.abs().max() > 0 for g in attention)
    enable_activation_recomputation(student)
    with pytest.raises(ActivationRecomputationError, match="forward-mode AD"):
        jvp_loss()


def test_disable_copy_and_bad_input():
    student = make_student(SONG)
    reference, _ = output_and_grads(student)
    count = enable_activation_recomputation(student)
    assert enable_activation_recomputation(student) == count  # idempotent
    clone = copy.deepcopy(student)  # what the EMA does
    assert all(type(m) is RecomputedUNetBlock for m in clone.modules() if isinstance(m, UNetBlock))
    assert torch.equal(output_and_grads(clone)[0], reference)
    assert disable_activation_recomputation(student) == count
    assert all(type(m) is UNetBlock for m in student.modules() if isinstance(m, UNetBlock))
    assert torch.equal(output_and_grads(student)[0], reference)
    with pytest.raises(TypeError, match="no SongUNet or DhariwalUNet"):
        enable_activation_recomputation(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------------------------------------
# LPIPS.

LPIPS_SIZE = 32  # upsampling target: the code path of the official 224×224 at a fiftieth of the cost


@pytest.fixture(scope="module")
def lpips_metrics(lpips_torch_home):
    """Two builds of each LPIPS metric on random weight files: (plain, to checkpoint)."""
    plain, wrapped = (lpips_metrics_on(lpips_torch_home, LPIPS_SIZE) for _ in range(2))
    return {name: (plain[name], wrapped[name]) for name in plain}


@pytest.mark.parametrize("name", ["piq", "vgg"])
def test_lpips_checkpointing_keeps_distances_and_gradients(lpips_metrics, name):
    plain, wrapped = lpips_metrics[name]
    assert enable_lpips_recomputation(wrapped) == enable_lpips_recomputation(wrapped) >= len(LPIPS_CHANNELS)
    generator = torch.Generator().manual_seed(5)
    a = (torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1).requires_grad_(True)
    b = torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1

    def distances_and_gradient(metric):
        a.grad = None
        distances = metric(a, b)
        distances.sum().backward()
        return distances.detach(), a.grad.clone()

    (d_plain, g_plain), (d_wrapped, g_wrapped) = distances_and_gradient(plain), distances_and_gradient(wrapped)
    assert torch.equal(d_plain, d_wrapped) and torch.equal(g_plain, g_wrapped)
    assert d_plain.min() > 0 and g_plain.abs().max() > 0
    assert any(isinstance(m, RecomputedSequential) for m in wrapped.modules())
    # The five feature maps stay (the distances need them), the activations inside each stage go.
    assert saved_activation_bytes(wrapped, a, b) < 0.7 * saved_activation_bytes(plain, a, b)


def test_distillation_applies_the_speed_options_to_teacher_and_metric(lpips_torch_home, monkeypatch):
    # The training loop applies them to the student; distill.build to the teacher and the metric it builds.
    monkeypatch.setenv("TORCH_HOME", str(lpips_torch_home))
    options = {"pid.metric": "lpips_vgg", "train.activation_checkpointing": "true", "train.channels_last": "true"}
    options["teacher.path"] = str(Path(__file__).parents[1] / "model_zoo" / "edm-shapes-16x16.pt")
    objective, _ = distill.build(resolve("default", options), torch.device("cpu"))
    assert sum(isinstance(m, RecomputedSequential) for m in objective.metric.modules()) == len(LPIPS_CHANNELS)
    convolutions = [p for p in objective.teacher.parameters() if p.ndim == 4]
    assert convolutions and all(p.is_contiguous(memory_format=torch.channels_last) for p in convolutions)
    plain, _ = distill.build(resolve("default", {**options, "train.activation_checkpointing": "false",
                                                 "train.channels_last": "false"}), torch.device("cpu"))
    assert not any(isinstance(m, RecomputedSequential) for m in plain.metric.modules())
    assert not all(p.is_contiguous(memory_format=torch.channels_last) for p in plain.teacher.parameters()
                   if p.ndim == 4)


def test_lpips_checkpointing_rejects_other_metrics():
    with pytest.raises(TypeError, match="not an LPIPS metric"):
        enable_lpips_recomputation(L2())
