"""What the tests make, in one place: tiny teachers, teacher files in each format, EDM-layout pickles, stand-in
LPIPS and Inception detector files, student checkpoints and toy run folders.

Test modules import from here (and from launch.py, equality.py, toy_training.py), never from each other.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import pickle
import sys
import types
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from pid_diffusion import dinov2
from pid_diffusion.training import checkpoint
from pid_diffusion.distances import PiqLPIPS, VGGLPIPS
from pid_diffusion.grid import KarrasGrid
from pid_diffusion.inception import NUM_CLASSES
from pid_diffusion.loss import Derivative, pid_residual
from pid_diffusion.networks.edm import EDM_PRESETS, EDMPrecond
from pid_diffusion.student import PIDStudent
from pid_diffusion.utils import fileio, hub

import toy_training

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0  # PID's ε and T

# ----------------------------------------------------------------------------------------------------------
# Tiny teachers.

# The tests' tiny network: an 8×8 SongUNet with two levels and attention at 4×4. A test that needs another
# size states only what differs: `{**TINY_SONG_UNET, "model_channels": 16}`.
TINY_SONG_UNET = dict(img_resolution=8, img_channels=3, model_type="SongUNet", model_channels=8, channel_mult=[1, 2],
                      num_blocks=1, attn_resolutions=[4], dropout=0.0)
PERTURBATION = 0.05  # as EDM's reference fixtures: every weight moved by 0.05 · N(0, 1)


def perturbed(module: nn.Module, scale: float = PERTURBATION) -> nn.Module:
    """`module` with every parameter moved by scale · N(0, 1), as EDM's reference fixtures are: EDM initialises
    output layers near zero, where a network's output and the student's gradients would vanish."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn_like(parameter))
    return module


def tiny_teacher(label_dim: int = 0, seed: int = 0, **overrides) -> EDMPrecond:
    """The tiny network (TINY_SONG_UNET with `overrides`), every weight perturbed, frozen as a teacher."""
    torch.manual_seed(seed)
    teacher = perturbed(EDMPrecond(**{**TINY_SONG_UNET, "label_dim": label_dim, **overrides}))
    return teacher.eval().requires_grad_(False)


def fixture_teacher(fixtures_dir: Path, name: str = "ref_song_cond.pt") -> EDMPrecond:
    """A 16×16 EDM network with EDM's perturbed reference weights (tests/fixtures/edm/README.md)."""
    reference = torch.load(fixtures_dir / name, weights_only=True)
    teacher = EDMPrecond(**reference["precond_kwargs"])
    teacher.load_state_dict(reference["state_dict"])
    return teacher.eval().requires_grad_(False)


def release_network(name: str) -> EDMPrecond:
    """The EDM release `name` at full size with random weights; the layers EDM initialises to zero (which would
    zero every earlier gradient) get small random weights."""
    torch.manual_seed(0)
    teacher = EDMPrecond(**{**EDM_PRESETS[name], "dropout": 0.0})
    with torch.no_grad():
        for tensor in teacher.parameters():
            if not tensor.any():
                tensor.normal_(0, 0.01)
    return teacher.eval().requires_grad_(False)


def release_architecture(kwargs: dict) -> dict:
    """A release's constructor arguments without its dropout: the releases that differ only in dropout share a
    student architecture (the student sets dropout to 0)."""
    return {key: value for key, value in kwargs.items() if key != "dropout"}


# The release gradient tests (test_release_gradients.py, test_edm2_release.py): which parameters take part does not
# depend on the image size (the U-Nets are fully convolutional), so the latents are 8×8, the smallest size that
# every release's levels halve down to 1×1.
GRADIENT_LATENT_SIZE = 8
GRADIENT_GRID = KarrasGrid(num_points=10, rho=7.0, sigma_min=0.002, sigma_max=80.0)


def assert_one_pid_step_reaches_every_parameter(student: PIDStudent, teacher: nn.Module, derivative: Derivative,
                                                metric: nn.Module) -> None:
    """One PID step (batch 1, 8×8 latents, class 3 when conditional) gives every student parameter a finite,
    non-zero gradient: a parameter without one stops DDP at the second step."""
    generator = torch.Generator().manual_seed(0)
    size = GRADIENT_LATENT_SIZE
    z = GRADIENT_GRID.sigma_max * torch.randn(1, teacher.img_channels, size, size, generator=generator)
    indices = GRADIENT_GRID.sample_indices(1, generator, interior_only=derivative is Derivative.CENTRAL)
    labels = torch.eye(teacher.label_dim)[[3]] if teacher.label_dim else None
    loss = pid_residual(student, teacher, z, indices, labels, grid=GRADIENT_GRID, metric=metric,
                        derivative=derivative)
    loss.sum().backward()

    missing = [key for key, tensor in student.named_parameters() if tensor.grad is None]
    zero = [key for key, tensor in student.named_parameters() if tensor.grad is not None and not tensor.grad.any()]
    assert not missing and not zero, f"no gradient: {missing}; zero gradient: {zero}"
    assert all(torch.isfinite(tensor.grad).all() for tensor in student.parameters())


# ----------------------------------------------------------------------------------------------------------
# Teacher and student files.

def write_teacher_file(path, teacher: EDMPrecond) -> None:
    """A converted teacher checkpoint (network_kwargs, state_dict), as teacher.load_teacher reads it."""
    torch.save(dict(network_kwargs=teacher.init_kwargs, state_dict=teacher.state_dict()), path)


WEIGHT_NOISE = 0.02  # how far test weights are moved from the teacher's, so every checkpoint and EMA differs


def write_student_checkpoint(path: str, teacher: EDMPrecond, step: int, ema_rates=("0.999",)) -> None:
    """A training checkpoint in the ARCHITECTURE.md layout (the entries load_network reads), its trained
    weights and each EMA moved randomly away from the teacher's."""
    student = PIDStudent.from_teacher(teacher, SIGMA_MIN, SIGMA_MAX)
    generator = torch.Generator().manual_seed(step)

    def moved() -> dict[str, torch.Tensor]:
        return {key: value + WEIGHT_NOISE * torch.randn(value.shape, generator=generator)
                for key, value in student.state_dict().items()}

    fileio.atomic_torch_save(dict(step=step, model_spec=checkpoint.model_spec(student), model=moved(),
                                  ema={rate: moved() for rate in ema_rates}), path)


def load_npz(path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return dict(data)


# ----------------------------------------------------------------------------------------------------------
# EDM-layout pickles, written the way EDM writes them (`torch_utils.persistence`): every EDM object becomes a
# call `_reconstruct_persistent_obj(meta)` carrying its source file and `__dict__`. The fake `torch_utils`
# module that writing needs exists only while writing, so every load runs without it.

EDM_PERSISTENCE_VERSION = 6  # `torch_utils.persistence._version` at EDM commit 008a4e5.
EDM_PICKLE_PROTOCOL = 4  # pickle.DEFAULT_PROTOCOL of the Python versions EDM supports.
HARMLESS_SRC = "# Stands for EDM's training/networks.py; a safe loader never reads it.\n"


class EDMLoss:
    """Stands for EDM's `training.loss.EDMLoss`, a persistent class that is not a module."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data
        self._init_args, self._init_kwargs = (), dict(P_mean=P_mean, P_std=P_std, sigma_data=sigma_data)


class AugmentPipe:
    """Stands for EDM's `training.augment.AugmentPipe`; holds NumPy scalars to exercise those globals."""

    def __init__(self, p: float = 0.12):
        self.p, self.xflip, self.yflip = np.float32(p), np.float64(1e8), 1
        self._init_args, self._init_kwargs = (), dict(p=p)


TORCH_CONTAINERS = (nn.ModuleDict, nn.ModuleList, nn.Sequential)  # Pickled by torch, not by EDM's persistence.


def mark_persistent(network: nn.Module, init_kwargs: dict) -> nn.Module:
    """Record constructor arguments as EDM's persistent classes do in `__init__` (`_init_args`, `_init_kwargs`)."""
    for module in network.modules():
        if not isinstance(module, TORCH_CONTAINERS):
            module._init_args, module._init_kwargs = (), dict(getattr(module, "init_kwargs", {}))
    network._init_kwargs = dict(init_kwargs)
    return network


@contextlib.contextmanager
def edm_persistence_module():
    """A fake `torch_utils.persistence`, importable only inside the block (pickle checks the global exists)."""
    def _reconstruct_persistent_obj(meta):
        raise AssertionError("a safe loader never calls EDM's reconstruct function")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    package, persistence = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package.persistence = persistence
    sys.modules.update({"torch_utils": package, "torch_utils.persistence": persistence})
    try:
        yield _reconstruct_persistent_obj
    finally:
        del sys.modules["torch_utils"], sys.modules["torch_utils.persistence"]


class EDMPickler(pickle.Pickler):
    """EDM's `persistent_class.__reduce__`: an object becomes `_reconstruct_persistent_obj(meta)`."""

    def __init__(self, file, protocol: int, reconstruct, module_src: str):
        super().__init__(file, protocol=protocol)
        self.reconstruct, self.module_src = reconstruct, module_src

    def reducer_override(self, obj):
        if isinstance(obj, (nn.Module, EDMLoss, AugmentPipe)) and not isinstance(obj, TORCH_CONTAINERS):
            meta = dict(type="class", version=EDM_PERSISTENCE_VERSION, module_src=self.module_src,
                        class_name=type(obj).__name__, state=dict(vars(obj)))
            return self.reconstruct, (meta,)
        return NotImplemented


def write_edm_pickle(path: Path, data: dict, *, protocol: int = EDM_PICKLE_PROTOCOL,
                     module_src: str = HARMLESS_SRC) -> Path:
    with edm_persistence_module() as reconstruct, open(path, "wb") as file:
        EDMPickler(file, protocol, reconstruct, module_src).dump(data)
    assert "torch_utils" not in sys.modules and "torch_utils.persistence" not in sys.modules
    return path


def edm_release(network: EDMPrecond, kwargs: dict) -> dict:
    """A release / CIFAR-10 snapshot: `dict(ema, loss_fn, augment_pipe, dataset_kwargs)`."""
    return dict(ema=mark_persistent(network, kwargs), loss_fn=EDMLoss(), augment_pipe=AugmentPipe(),
                dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="cifar10-32x32.zip",
                                    use_labels=True, xflip=False, cache=True, resolution=32, max_size=50000))


# ----------------------------------------------------------------------------------------------------------
# Stand-in pretrained weights: LPIPS (a random VGG16, random positive piq layer weights) and the Inception
# detector (a TorchScript module with its call signature), written where torch hub's cache is read.

LPIPS_CHANNELS = (64, 128, 256, 512, 512)  # VGG16 relu1_2 … relu5_3


def random_vgg16_state_dict() -> dict[str, torch.Tensor]:
    """Every key and shape of torchvision's VGG16: He-initialised convolutions (activations stay of order 1
    through the 13 layers), zero classifier (LPIPS never uses it; zeros cost nothing to create)."""
    with torch.device("meta"):
        shapes = {key: value.shape for key, value in torchvision.models.vgg16().state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in shapes.items():
        if key.startswith("features.") and key.endswith(".weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            state[key] = torch.randn(shape, generator=generator) * math.sqrt(2 / fan_in)
        elif key.startswith("features."):
            state[key] = 0.1 * torch.randn(shape, generator=generator)
        else:
            state[key] = torch.zeros(shape)
    return state


def write_lpips_standins(checkpoints: Path) -> None:
    """A random but loadable VGG16 and random positive piq LPIPS weights in a hub `checkpoints` folder."""
    torch.save(random_vgg16_state_dict(), checkpoints / hub.VGG16_IMAGENET.filename)
    generator = torch.Generator().manual_seed(1)
    torch.save([torch.rand(1, c, 1, 1, generator=generator) + 0.1 for c in LPIPS_CHANNELS],
               checkpoints / hub.PIQ_LPIPS_WEIGHTS.filename)


def torch_home_with_lpips(root: Path) -> Path:
    """A TORCH_HOME under `root` whose hub cache holds the LPIPS stand-ins."""
    checkpoints = root / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    write_lpips_standins(checkpoints)
    return root


def refuse_download(url, dst, *args, **kwargs):
    """Stands in for torch.hub.download_url_to_file where no test may download anything."""
    raise urllib.error.URLError("network unreachable (simulated)")


def lpips_metrics_on(torch_home: Path, size: int) -> dict[str, nn.Module]:
    """Both LPIPS metrics ("piq", "vgg"), upsampling to `size`, built from the weight files in `torch_home`
    (a TORCH_HOME made by torch_home_with_lpips); a download fails."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(torch_home))
        patch.setattr(torch.hub, "download_url_to_file", refuse_download)
        return {"piq": PiqLPIPS(size=size), "vgg": VGGLPIPS(size=size)}


DINOV2_REFERENCE = Path(__file__).resolve().parent / "fixtures" / "dinov2" / "ref_dinov2_tiny.pt"


@functools.cache
def tiny_dinov2_reference() -> dict:
    """The tiny DINOv2 fixture: its weights, shape and reference outputs (tests/fixtures/dinov2/README.md)."""
    return torch.load(DINOV2_REFERENCE, weights_only=True)


def write_tiny_dinov2_weights(folder: Path) -> Path:
    """The tiny DINOv2 where the hub cache keeps ViT-L/14's file, with its heads (not in any shape) recorded."""
    reference = tiny_dinov2_reference()
    path = folder / "hub" / "checkpoints" / dinov2.DINOV2_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    heads = reference["model_kwargs"]["num_heads"]
    torch.save({"state_dict": reference["state_dict"], "model_kwargs": {"num_heads": heads}}, path)
    return path


DETECTOR_POOL = 4  # the stand-in detector's average pooling (the fixture's detector_def)
SMALL_FEATURE_DIM = 16  # the stand-in detector of the pid-fid tests: small enough for a fast sqrtm


class StandInDetector(torch.nn.Module):
    """The fixture's `detector_def`, f = tanh((avg_pool2d(img.float(), 4).flatten(1) / 255) @ W + b), with a
    linear classifier for the class probabilities, behind the Inception detector's call signature."""

    def __init__(self, W: torch.Tensor, b: torch.Tensor, W_out: torch.Tensor, b_out: torch.Tensor):
        super().__init__()
        self.pool = DETECTOR_POOL
        for name, value in dict(W=W, b=b, W_out=W_out, b_out=b_out).items():
            self.register_buffer(name, value)

    def forward(self, img: torch.Tensor, return_features: bool = False, no_output_bias: bool = False):
        features = torch.tanh((F.avg_pool2d(img.float(), self.pool).flatten(1) / 255) @ self.W + self.b)
        if return_features:
            return features
        logits = features @ self.W_out
        if not no_output_bias:
            logits = logits + self.b_out
        return torch.softmax(logits, 1)


def write_detector(path, W: torch.Tensor, b: torch.Tensor, seed: int = 0) -> str:
    generator = torch.Generator().manual_seed(seed)
    W_out = torch.randn(W.shape[1], NUM_CLASSES, generator=generator)
    b_out = torch.randn(NUM_CLASSES, generator=generator)
    with warnings.catch_warnings():  # torch deprecates TorchScript; the real detector exists only in it
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(StandInDetector(W, b, W_out, b_out)).save(str(path))
    return str(path)


def small_detector(path) -> str:
    generator = torch.Generator().manual_seed(1)
    # 16×16 images pooled to 4×4; small weights keep tanh unsaturated, so no feature is constant.
    W = torch.randn(3 * 4 * 4, SMALL_FEATURE_DIM, generator=generator) * 0.1
    return write_detector(path, W, torch.randn(SMALL_FEATURE_DIM, generator=generator))


# ----------------------------------------------------------------------------------------------------------
# Run folders of the toy task (toy_training.py).

TOY_SCRIPT = str(Path(toy_training.__file__).resolve())


def steps_in(folder) -> list[int]:
    """Steps of the run folder's training states."""
    return [step for step, _ in checkpoint.find_training_states(str(folder))]


def logged_steps(folder) -> list[int]:
    """Steps of metrics.jsonl (the toy logs every step); [0] before the first."""
    path = Path(folder) / "metrics.jsonl"
    if not path.exists():
        return [0]
    return [json.loads(line)["step"] for line in fileio.read_bytes(path).decode().splitlines()]


def latest(folder) -> dict:
    """The newest training state of a run folder."""
    return fileio.torch_load(checkpoint.latest_training_state(str(folder))[1])


def train_toy(folder, *overrides: str) -> dict:
    """Run the toy task in this process; returns the newest checkpoint."""
    toy_training.main([f"--run.dir={folder}", *overrides])
    return latest(folder)


def initial_toy_state() -> dict:
    torch.manual_seed(0)  # toy_training.main's initial weights
    return toy_training.ToyNet().state_dict()


# pid-fid over a run folder (the `run_folder` fixture of conftest.py).
NUM_SEEDS = 30  # images per evaluation in the pid-fid tests (3 per Inception Score split)


def fid_args(paths: dict, *extra: str) -> list[str]:
    return ["--run", paths["run"], "--ref", paths["ref"], "--detector", paths["detector"], "--csv", paths["csv"],
            "--plot", paths["plot"], "--seeds", f"0-{NUM_SEEDS - 1}", "--batch", "8", *extra]
