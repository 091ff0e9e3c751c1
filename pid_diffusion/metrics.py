"""Per-sample distances d(a, b) for the PID residual (PID.md §3), on image batches in [−1, 1].

Every metric is a frozen `nn.Module` called as `metric(a, b) -> Tensor[B]`, differentiable with respect to
its inputs. The configuration names one by `Metric` and builds it with `Metric.build()`.
LPIPS follows the official PID code: images narrower than 256 pixels are bilinearly upsampled to 224×224,
then fed to the network without clamping; both images go through VGG16 in one batch.
"""

import abc
import enum
import math
import warnings

import lpips
import piq
import torch
import torch.nn.functional as F
from torch import nn

from pid_diffusion import hub

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
        hub.resolve(hub.VGG16_IMAGENET, hub.PIQ_LPIPS_WEIGHTS)
        self.lpips = _torchvision_vgg16_quietly(lambda: piq.LPIPS(replace_pooling=replace_pooling,
                                                                 reduction="none"))
        self.replace_pooling = replace_pooling
        self.resize_below = resize_below
        self.size = size
        self.requires_grad_(False)
        self.eval()

    def per_sample(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # piq.LPIPS.forward runs VGG twice; its own pieces let both images share one batch.
        x = upsample_for_lpips(torch.cat([a, b]), self.resize_below, self.size)
        features = self.lpips.get_features((x + 1) / 2)
        features_a, features_b = zip(*(f.chunk(2) for f in features))
        distances = self.lpips.compute_distance(features_a, features_b)
        # The reduction of piq's ContentLoss.forward, term for term.
        return torch.cat([(d * w.to(d)).mean(dim=[2, 3]) for d, w in zip(distances, self.lpips.weights)],
                         dim=1).sum(dim=1)

    def extra_repr(self) -> str:
        return f"replace_pooling={self.replace_pooling}, resize_below={self.resize_below}, size={self.size}"


class VGGLPIPS(Distance):
    """LPIPS of the `lpips` package (net='vgg', v0.1, its bundled linear layers). That package takes images
    in [−1, 1] itself (its ScalingLayer), so they go in unchanged: no (x + 1) / 2 here, which would otherwise
    need `normalize=True` to undo. Needs `vgg16-397923af.pth` in the hub cache."""

    def __init__(self, resize_below: int = 256, size: int = 224):
        super().__init__()
        _check_resize(resize_below, size)
        hub.resolve(hub.VGG16_IMAGENET)
        self.lpips = _torchvision_vgg16_quietly(lambda: lpips.LPIPS(net="vgg", verbose=False))
        self.resize_below = resize_below
        self.size = size
        self.requires_grad_(False)
        self.eval()

    def per_sample(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # lpips.LPIPS.forward, term for term, with both images in one VGG batch.
        x = upsample_for_lpips(torch.cat([a, b]), self.resize_below, self.size)
        layers = self.lpips.net(self.lpips.scaling_layer(x))
        total = 0
        for layer, linear in zip(layers, self.lpips.lins):
            features_a, features_b = lpips.normalize_tensor(layer).chunk(2)
            total = total + lpips.spatial_average(linear((features_a - features_b) ** 2), keepdim=True)
        return total.flatten()

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
