"""Distances: closed forms, and the real LPIPS code paths (piq and the lpips package) on weight files that
the tests write into a temporary TORCH_HOME (a random VGG16, random positive piq layer weights)."""

import functools
import inspect
import math

import lpips
import piq

import pytest
import torch

from pid_diffusion.utils import hub
from pid_diffusion.distances import L1, L2, Metric, PiqLPIPS, PseudoHuber, VGGLPIPS, upsample_for_lpips

from factories import LPIPS_CHANNELS, lpips_metrics_on, refuse_download

# The tests upsample to 64×64 instead of the official 224×224: the same code path at a twelfth of the cost.
TEST_SIZE = 64


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """No test here may download anything."""
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse_download)


@pytest.fixture(scope="module")
def lpips_metrics(lpips_torch_home):
    return lpips_metrics_on(lpips_torch_home, TEST_SIZE)


def image_pair(batch: int = 2, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two image batches around [−1, 1], a few values beyond it (LPIPS inputs are not clamped)."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.rand(batch, 3, size, size, generator=generator) * 2.2 - 1.1
    b = (a + 0.3 * torch.randn(a.shape, generator=generator)).clamp(-1.1, 1.1)
    return a, b


# ----------------------------------------------------------------------------------------------------------
# Closed forms.

def test_l2_l1_closed_form():
    a = torch.zeros(3, 3, 4, 4)
    b = a + torch.tensor([0.5, -0.25, 2.0]).reshape(3, 1, 1, 1)
    torch.testing.assert_close(L2()(a, b), torch.tensor([0.25, 0.0625, 4.0]))
    torch.testing.assert_close(L1()(a, b), torch.tensor([0.5, 0.25, 2.0]))


def test_pseudo_huber_closed_form():
    d = 3 * 4 * 4
    a = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    b = a + torch.tensor([0.5, 1e-4], dtype=torch.float64).reshape(2, 1, 1, 1)
    c = 0.1
    expected = torch.tensor([math.sqrt(d * 0.5 ** 2 + c ** 2) - c, math.sqrt(d * 1e-8 + c ** 2) - c],
                            dtype=torch.float64)
    torch.testing.assert_close(PseudoHuber(c)(a, b), expected)
    # iCT's default c = 0.00054·sqrt(d); far below c the distance is ‖a − b‖² / (2c).
    c_ict = 0.00054 * math.sqrt(d)
    small = PseudoHuber()(a, a + 1e-6)
    torch.testing.assert_close(small, torch.full((2,), d * 1e-12 / (2 * c_ict), dtype=torch.float64), rtol=1e-6,
                               atol=0)
    assert PseudoHuber()(a, b)[0].item() == pytest.approx(math.sqrt(d * 0.25 + c_ict ** 2) - c_ict, rel=1e-12)


@pytest.mark.parametrize("metric", [L2(), L1(), PseudoHuber()])
def test_closed_forms_vanish_on_equal_inputs_and_rise_otherwise(metric):
    a, b = image_pair()
    assert torch.equal(metric(a, a), torch.zeros(2))
    assert (metric(a, b) > 0).all()


def test_pseudo_huber_rejects_non_positive_c():
    with pytest.raises(ValueError, match="c must be positive"):
        PseudoHuber(0.0)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="same shape"):
        L2()(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 5))


def test_metric_enum_builds_each_distance(torch_home_without_weights):
    assert isinstance(Metric("l2").build(), L2)
    assert isinstance(Metric.L1.build(), L1)
    assert Metric.PSEUDO_HUBER.build(c=0.2).c == 0.2
    # The LPIPS members reach their classes, which first look for their weight files.
    with pytest.raises(hub.MissingWeightsError, match="lpips_weights.pt"):
        Metric.LPIPS_PIQ.build()
    with pytest.raises(hub.MissingWeightsError, match="vgg16-397923af.pth"):
        Metric.LPIPS_VGG.build()


# ----------------------------------------------------------------------------------------------------------
# LPIPS.

@pytest.fixture
def torch_home_without_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    return tmp_path / "empty_torch_home"


def test_missing_lpips_weights_are_named_with_url_and_destination(torch_home_without_weights):
    checkpoints = torch_home_without_weights / "hub" / "checkpoints"
    with pytest.raises(hub.MissingWeightsError) as raised:
        PiqLPIPS()
    for file in (hub.VGG16_IMAGENET, hub.PIQ_LPIPS_WEIGHTS):
        assert file.url in str(raised.value) and str(checkpoints / file.filename) in str(raised.value)
    with pytest.raises(hub.MissingWeightsError) as raised:
        VGGLPIPS()
    assert hub.VGG16_IMAGENET.url in str(raised.value)
    assert hub.PIQ_LPIPS_WEIGHTS.filename not in str(raised.value)  # the lpips package ships its own


@pytest.mark.parametrize("cls", [PiqLPIPS, VGGLPIPS])
def test_lpips_rejects_bad_sizes(cls):
    with pytest.raises(ValueError, match="positive sizes"):
        cls(size=0)


def test_piq_url_is_the_one_piq_uses():
    assert hub.PIQ_LPIPS_WEIGHTS.url == piq.LPIPS._weights_url


def test_lpips_defaults_are_the_official_preprocessing():
    for cls in (PiqLPIPS, VGGLPIPS):
        parameters = inspect.signature(cls).parameters
        assert parameters["resize_below"].default == 256 and parameters["size"].default == 224
    assert inspect.signature(PiqLPIPS).parameters["replace_pooling"].default is True


def test_upsample_for_lpips():
    small, large = torch.rand(2, 3, 32, 32), torch.rand(1, 3, 256, 256)
    assert upsample_for_lpips(small, resize_below=256, size=224).shape == (2, 3, 224, 224)
    assert upsample_for_lpips(large, resize_below=256, size=224) is large
    # Bilinear interpolation commutes with (x + 1) / 2, so upsampling before or after the mapping agrees.
    torch.testing.assert_close(upsample_for_lpips((small + 1) / 2, 256, 224),
                               (upsample_for_lpips(small, 256, 224) + 1) / 2)


def test_piq_lpips_equals_piqs_own_two_pass_forward(lpips_metrics):
    metric, (a, b) = lpips_metrics["piq"], image_pair()
    up = lambda x: upsample_for_lpips(x, 256, TEST_SIZE)  # noqa: E731
    reference = metric.lpips((up(a) + 1) / 2, (up(b) + 1) / 2)  # piq.LPIPS(reduction="none")
    torch.testing.assert_close(metric(a, b), reference, rtol=1e-5, atol=1e-7)
    assert isinstance(metric.lpips.model[4], torch.nn.AvgPool2d)  # replace_pooling=True


def test_vgg_lpips_equals_the_packages_two_pass_forward(lpips_metrics):
    metric, (a, b) = lpips_metrics["vgg"], image_pair()
    up = lambda x: upsample_for_lpips(x, 256, TEST_SIZE)  # noqa: E731
    reference = metric.lpips(up(a), up(b)).flatten()  # lpips takes [−1, 1] inputs
    torch.testing.assert_close(metric(a, b), reference, rtol=1e-5, atol=1e-7)
    # The same as handing the package [0, 1] images with normalize=True: no double normalisation.
    normalized = metric.lpips((up(a) + 1) / 2, (up(b) + 1) / 2, normalize=True).flatten()
    torch.testing.assert_close(metric(a, b), normalized, rtol=1e-4, atol=1e-6)


# The independent reference: VGG16 written out here from the state_dict (torchvision's `features` indices),
# and both LPIPS formulas term by term, without piq or lpips code. The values, printed by this reference on
# the test weights and images, are written down as well.
VGG16_BLOCKS = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))  # conv indices; relu{b}_last ends each
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # piq's input standardisation
LPIPS_SHIFT, LPIPS_SCALE = (-0.030, -0.088, -0.188), (0.458, 0.448, 0.450)  # the lpips package's ScalingLayer
WRITTEN_DOWN = {"piq": (0.17206697, 0.18348899), "vgg": (0.032025695, 0.036243662)}  # of image_pair(), TEST_SIZE
LPIPS_RTOL = 1e-5


def plain_vgg16_features(state: dict[str, torch.Tensor], x: torch.Tensor, pool) -> list[torch.Tensor]:
    """relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of VGG16, channel-normalised as both LPIPS do."""
    features = []
    for block, convs in enumerate(VGG16_BLOCKS):
        if block:
            x = pool(x, 2)
        for index in convs:
            x = torch.relu(torch.nn.functional.conv2d(x, state[f"features.{index}.weight"],
                                                      state[f"features.{index}.bias"], padding=1))
        features.append(x / (x.square().sum(1, keepdim=True).sqrt() + 1e-10))
    return features


@functools.lru_cache(maxsize=1)
def saved_vgg16(path: str) -> dict[str, torch.Tensor]:
    """The VGG16 convolutions of a weight file (read once: the file holds 0.5 GB, mostly the classifier)."""
    return {key: value for key, value in torch.load(path, weights_only=True).items() if key.startswith("features.")}


def channel_constants(values) -> torch.Tensor:
    return torch.tensor(values).reshape(1, 3, 1, 1)


def reference_lpips(name: str, a: torch.Tensor, b: torch.Tensor, lpips_torch_home) -> torch.Tensor:
    """LPIPS of the official PID code (piq: [0, 1] images, ImageNet standardisation, average pooling, piq's
    layer weights) or of the lpips package ([−1, 1] images, its scaling layer, max pooling, its linear layers)."""
    checkpoints = lpips_torch_home / "hub" / "checkpoints"
    state = saved_vgg16(str(checkpoints / hub.VGG16_IMAGENET.filename))
    def up(x):
        return torch.nn.functional.interpolate(x, size=(TEST_SIZE, TEST_SIZE), mode="bilinear", align_corners=False)

    if name == "piq":
        def prepare(x):
            return ((up(x) + 1) / 2 - channel_constants(IMAGENET_MEAN)) / channel_constants(IMAGENET_STD)
        pool = torch.nn.functional.avg_pool2d
        layer_weights = torch.load(checkpoints / hub.PIQ_LPIPS_WEIGHTS.filename, weights_only=True)
    else:
        def prepare(x):
            return (up(x) - channel_constants(LPIPS_SHIFT)) / channel_constants(LPIPS_SCALE)
        pool = torch.nn.functional.max_pool2d
        packaged = torch.load(lpips.__path__[0] + "/weights/v0.1/vgg.pth", map_location="cpu", weights_only=True)
        layer_weights = [packaged[f"lin{k}.model.1.weight"] for k in range(len(LPIPS_CHANNELS))]
    total = 0
    for fa, fb, w in zip(plain_vgg16_features(state, prepare(a), pool), plain_vgg16_features(state, prepare(b), pool),
                         layer_weights, strict=True):
        total = total + ((fa - fb).square() * w.reshape(1, -1, 1, 1)).sum(1).mean((1, 2))
    return total


def check_lpips(metric, name: str, lpips_torch_home) -> float:
    """The metric equals the independent reference to LPIPS_RTOL; returns the margin (distance ÷ tolerance)."""
    a, b = image_pair()
    expected = reference_lpips(name, a, b, lpips_torch_home)
    torch.testing.assert_close(metric(a, b), expected, rtol=LPIPS_RTOL, atol=0)
    return (expected.min() / (LPIPS_RTOL * expected.max())).item()


@pytest.mark.parametrize("name", ["piq", "vgg"])
def test_lpips_equals_an_independent_vgg_forward(lpips_metrics, lpips_torch_home, name):
    # Measured: the metric is within 1e-7 (relative) of the reference; the distances are ≈ 9e4 tolerances.
    assert check_lpips(lpips_metrics[name], name, lpips_torch_home) > 1e4
    a, b = image_pair()
    torch.testing.assert_close(reference_lpips(name, a, b, lpips_torch_home), torch.tensor(WRITTEN_DOWN[name]),
                               rtol=1e-4, atol=0)


def max_pooling_mutant(metric, monkeypatch):
    """piq's LPIPS without replace_pooling: max pooling, not the official average pooling."""
    for index, module in enumerate(metric.lpips.model):
        if isinstance(module, torch.nn.AvgPool2d):
            monkeypatch.setitem(metric.lpips.model._modules, str(index), torch.nn.MaxPool2d(2, 2))


def unnormalised_mutant(metric, monkeypatch):
    """piq's features without LPIPS' channel normalisation."""
    monkeypatch.setattr(metric.lpips, "normalize_features", False)


def doubly_normalised_mutant(metric, monkeypatch):
    """(x + 1) / 2 before the lpips package's own [−1, 1] scaling layer."""
    features = metric._features
    monkeypatch.setattr(metric, "_features", lambda x: features((x + 1) / 2))


@pytest.mark.parametrize("mutate, name", [(max_pooling_mutant, "piq"), (unnormalised_mutant, "piq"),
                                          (doubly_normalised_mutant, "vgg")])
def test_lpips_check_fails_on_mutants(lpips_metrics, lpips_torch_home, monkeypatch, mutate, name):
    # The module's own metric objects, broken for this test only (monkeypatch restores them). Measured:
    # the mutants miss the reference by 1e4 (max pooling), 1e7 (unnormalised), 8e4 (doubly normalised)
    # tolerances.
    mutate(lpips_metrics[name], monkeypatch)
    with pytest.raises(AssertionError):
        check_lpips(lpips_metrics[name], name, lpips_torch_home)


def test_vgg_lpips_uses_the_packaged_linear_layers(lpips_metrics):
    packaged = torch.load(lpips.__path__[0] + "/weights/v0.1/vgg.pth", map_location="cpu", weights_only=True)
    state = lpips_metrics["vgg"].lpips.state_dict()
    for key, value in packaged.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["piq", "vgg"])
def test_lpips_is_a_frozen_differentiable_distance(lpips_metrics, name):
    metric = lpips_metrics[name]
    a, b = image_pair()
    a.requires_grad_(True)
    distance = metric(a, b)
    assert distance.shape == (2,) and torch.isfinite(distance).all() and (distance > 0).all()
    distance.sum().backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in metric.parameters())
    assert all(p.grad is None for p in metric.parameters())

    torch.testing.assert_close(metric(b, a.detach()), distance.detach(), rtol=1e-4, atol=1e-6)  # symmetric
    torch.testing.assert_close(metric(b, b), torch.zeros(2), rtol=0, atol=1e-6)

    metric.train()  # a distance has no training mode: the lpips package's dropout stays off
    assert not any(module.training for module in metric.modules())
    torch.testing.assert_close(metric(a.detach(), b), distance.detach(), rtol=0, atol=0)


def saved_activation_bytes(module: torch.nn.Module, compute) -> int:
    """Bytes of the storages autograd keeps for the backward pass of `compute()`, each counted once, except
    `module`'s parameters."""
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        compute()
    return sum(saved.values())


@pytest.mark.parametrize("name", ["piq", "vgg"])
def test_lpips_target_without_gradient_runs_outside_autograd(lpips_metrics, name):
    # PID's target needs no gradient: its VGG pass runs under no_grad, with the same distances and gradients
    # as the one-batch pass (up to the summation order of another batch size) and the library's own forward.
    metric, (a, b) = lpips_metrics[name], image_pair()
    up = lambda x: upsample_for_lpips(x, 256, TEST_SIZE)  # noqa: E731
    reference = (metric.lpips((up(a) + 1) / 2, (up(b) + 1) / 2) if name == "piq" else metric.lpips(up(a), up(b))).flatten()

    def distances_and_gradient(target_needs_grad: bool):
        live, target = a.clone().requires_grad_(True), b.clone().requires_grad_(target_needs_grad)
        distances = metric(live, target)
        distances.sum().backward()
        return distances.detach(), live.grad

    (split, grad_split), (joint, grad_joint) = distances_and_gradient(False), distances_and_gradient(True)
    torch.testing.assert_close(split, reference, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(split, joint, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_split, grad_joint, rtol=1e-4, atol=1e-8)
    assert grad_split.abs().max() > 0
    # Either argument may be the target: the split is symmetric.
    torch.testing.assert_close(metric(b, a.clone().requires_grad_(True)).detach(), metric(b, a), rtol=1e-5,
                               atol=1e-7)
    # Autograd keeps activations of the live half only (0.64 of the one-batch pass here; 1.0 without the split).
    live = a.clone().requires_grad_(True)
    frozen_bytes = saved_activation_bytes(metric, lambda: metric(live, b))
    joint_bytes = saved_activation_bytes(metric, lambda: metric(live, b.clone().requires_grad_(True)))
    assert frozen_bytes < 0.75 * joint_bytes
