"""Per-sample distances d(a, b) for the PID residual (docs/method.md §3), on image batches in [−1, 1].

Every distance is a frozen `nn.Module` called as `metric(a, b) -> Tensor[B]`, differentiable with respect to
its inputs. The configuration names one by `Metric` and builds it with `Metric.build()`.
LPIPS follows the official PID code: images narrower than 256 pixels are bilinearly upsampled to 224×224,
then fed to the network without clamping. Both images go through VGG16 in one batch, except when only one
needs a gradient (PID's target, the teacher's side, never does): that one runs without autograd, so the
backward pass skips its half of the network (benchmarks/RESULTS.md: 1.37× faster, ÷1.32 memory).
"""

import abc
import enum
import math
import warnings
from collections.abc import Callable, Sequence

import lpips
import piq
import torch
import torch.nn.functional as F
from torch import nn

from pid_diffusion.utils import hub

__all__ = ["Distance", "L1", "L2", "Metric", "PiqLPIPS", "PseudoHuber", "VGGLPIPS", "upsample_for_lpips"]


class Distance(nn.Module, abc.ABC):
    """Base class: checks that a and b are matching batches, then computes one distance per sample.
    A distance is never trained: `train()` leaves it in eval mode (no dropout in LPIPS' linear layers)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape or a.ndim < 2:
            raise ValueError(f"{type(self).__name__} compares two batches of the same shape [B, ...], got "
                             f"{tuple(a.shape)} and {tuple(b.shape)}")
        return self.per_sample(a, b)

    @abc.abstractmethod
    def per_sample(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """d(a_k, b_k) for each sample k, shape [B]."""

    def train(self, mode: bool = True) -> "Distance":
        return super().train(False)


# ----------------------------------------------------------------------------------------------------------
# Closed-form distances.

class L2(Distance):
    """Mean squared difference per sample."""

    def per_sample(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).square().flatten(1).mean(1)


class L1(Distance):
    """Mean absolute difference per sample."""

    def per_sample(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).abs().flatten(1).mean(1)


class PseudoHuber(Distance):
    """iCT's pseudo-Huber distance sqrt(‖a − b‖² + c²) − c (Song & Dhariwal 2023), ‖·‖ the Euclidean norm
    over a whole sample. c = None takes iCT's rule c = 0.00054·sqrt(d), d = values per sample (c ≈ 0.03 on
    CIFAR-10): quadratic for differences far below c, linear beyond."""

    ICT_C_PER_SQRT_DIM = 0.00054

    def __init__(self, c: float | None = None):
        super().__init__()
        if c is not None and not c > 0:
            raise ValueError(f"c must be positive (or None for iCT's 0.00054·sqrt(d)), got {c}")
        self.c = c

    def per_sample(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        c = self.c if self.c is not None else self.ICT_C_PER_SQRT_DIM * math.sqrt(a[0].numel())
        return ((a - b).square().flatten(1).sum(1) + c ** 2).sqrt() - c

    def extra_repr(self) -> str:
        return f"c={self.c}"


# ----------------------------------------------------------------------------------------------------------
# LPIPS (Zhang et al. 2018) on torchvision's ImageNet VGG16.

def upsample_for_lpips(x: torch.Tensor, resize_below: int, size: int) -> torch.Tensor:
    """Bilinear upsampling to size×size when the width is below `resize_below`, as the official PID code
    (and consistency models) does before LPIPS; other images pass unchanged."""
    if x.shape[-1] >= resize_below:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def _check_resize(resize_below: int, size: int) -> None:
    if size < 1 or resize_below < 1:
        raise ValueError(f"LPIPS resizing needs positive sizes, got resize_below={resize_below}, size={size}")


def _paired_features(features: Callable[[torch.Tensor], Sequence[torch.Tensor]], a: torch.Tensor,
                     b: torch.Tensor) -> tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]:
    """The feature maps of `a` and of `b`: one batch through the network, or two passes when only one of them
    needs a gradient, the other run under no_grad so that autograd neither stores nor backpropagates its half."""
    if torch.is_grad_enabled() and a.requires_grad != b.requires_grad:
        frozen, live = (b, a) if a.requires_grad else (a, b)
        with torch.no_grad():  # First: its activations are freed before the live pass stores its own.
            frozen_features = features(frozen)
        live_features = features(live)
        return (live_features, frozen_features) if a.requires_grad else (frozen_features, live_features)
    both = features(torch.cat([a, b]))
    return [f.chunk(2)[0] for f in both], [f.chunk(2)[1] for f in both]


def _torchvision_vgg16_quietly(build):
    """Run a library constructor that calls torchvision's deprecated `vgg16(pretrained=True)`, without
    its deprecation warnings; the weights it loads were resolved in the hub cache beforehand."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The parameter 'pretrained' is deprecated")
        warnings.filterwarnings("ignore", message="Arguments other than a weight enum")
        return build()


class PiqLPIPS(Distance):
    """LPIPS as the official PID code computes it: `piq.LPIPS(replace_pooling=True, reduction="none")`
    (max pooling replaced by average pooling) on (x + 1) / 2. Needs `vgg16-397923af.pth` and piq's
    `lpips_weights.pt` in the hub cache (see `hub`)."""

    def __init__(self, replace_pooling: bool = True, resize_below: int = 256, size: int = 224):
        super().__init__()
        _check_resize(resize_below, size)
        hub.resolve(*Metric.LPIPS_PIQ.weight_files)
        self.lpips = _torchvision_vgg16_quietly(lambda: piq.LPIPS(replace_pooling=replace_pooling,
                                                                 reduction="none"))
        self.replace_pooling = replace_pooling
        self.resize_below = resize_below
        self.size = size
        self.requires_grad_(False)
        self.eval()

    def per_sample(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # piq.LPIPS.forward runs VGG twice with autograd on both; its own pieces allow _paired_features.
        features_a, features_b = _paired_features(self._features, a, b)
        distances = self.lpips.compute_distance(features_a, features_b)
        # The reduction of piq's ContentLoss.forward, term for term.
        return torch.cat([(d * w.to(d)).mean(dim=[2, 3]) for d, w in zip(distances, self.lpips.weights)],
                         dim=1).sum(dim=1)

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """piq's VGG16 feature maps of images in [−1, 1]."""
        return self.lpips.get_features((upsample_for_lpips(x, self.resize_below, self.size) + 1) / 2)

    def extra_repr(self) -> str:
        return f"replace_pooling={self.replace_pooling}, resize_below={self.resize_below}, size={self.size}"


class VGGLPIPS(Distance):
    """LPIPS of the `lpips` package (net='vgg', v0.1, its bundled linear layers). That package takes images
    in [−1, 1] itself (its ScalingLayer), so they go in unchanged: no (x + 1) / 2 here, which would otherwise
    need `normalize=True` to undo. Needs `vgg16-397923af.pth` in the hub cache."""

    def __init__(self, resize_below: int = 256, size: int = 224):
        super().__init__()
        _check_resize(resize_below, size)
        hub.resolve(*Metric.LPIPS_VGG.weight_files)
        self.lpips = _torchvision_vgg16_quietly(lambda: lpips.LPIPS(net="vgg", verbose=False))
        self.resize_below = resize_below
        self.size = size
        self.requires_grad_(False)
        self.eval()

    def per_sample(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # lpips.LPIPS.forward, term for term, with the VGG passes of _paired_features.
        total = 0
        for features_a, features_b, linear in zip(*_paired_features(self._features, a, b), self.lpips.lins):
            total = total + lpips.spatial_average(linear((features_a - features_b) ** 2), keepdim=True)
        return total.flatten()

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The lpips package's unit-normalised VGG16 feature maps of images in [−1, 1]."""
        layers = self.lpips.net(self.lpips.scaling_layer(upsample_for_lpips(x, self.resize_below, self.size)))
        return [lpips.normalize_tensor(layer) for layer in layers]

    def extra_repr(self) -> str:
        return f"resize_below={self.resize_below}, size={self.size}"


# ----------------------------------------------------------------------------------------------------------
# Configuration.

class Metric(enum.Enum):
    """The distance d of the PID residual, as a configuration names it."""

    LPIPS_PIQ = "lpips_piq"  # the paper's default
    LPIPS_VGG = "lpips_vgg"
    L2 = "l2"
    L1 = "l1"
    PSEUDO_HUBER = "pseudo_huber"

    @property
    def is_lpips(self) -> bool:
        """Whether the distance runs VGG16, whose activations `perf.enable_lpips_recomputation` can recompute."""
        return self in (Metric.LPIPS_PIQ, Metric.LPIPS_VGG)

    @property
    def weight_files(self) -> tuple[hub.WeightFile, ...]:
        """The pretrained files the distance reads from the hub cache (`pid-fetch-weights` fetches them)."""
        return {Metric.LPIPS_PIQ: (hub.VGG16_IMAGENET, hub.PIQ_LPIPS_WEIGHTS),
                Metric.LPIPS_VGG: (hub.VGG16_IMAGENET,)}.get(self, ())

    def build(self, **options) -> Distance:
        """A new distance module; `options` go to its constructor (e.g. `c` of PSEUDO_HUBER)."""
        return _METRIC_CLASSES[self](**options)


_METRIC_CLASSES: dict[Metric, type[Distance]] = {
    Metric.LPIPS_PIQ: PiqLPIPS,
    Metric.LPIPS_VGG: VGGLPIPS,
    Metric.L2: L2,
    Metric.L1: L1,
    Metric.PSEUDO_HUBER: PseudoHuber,
}
