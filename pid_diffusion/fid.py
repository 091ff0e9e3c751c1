"""Fréchet Inception Distance and Inception Score, computed as EDM and StyleGAN2-ADA compute them.

Images stream through the detector into accumulators of float64 sums, reduced over ranks: nothing is
kept per image, any number of ranks and any batch size give the same statistics up to summation order,
and a generator of image batches can feed them directly, so FID needs no PNGs on disk.
"""

import io
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import scipy.linalg
import torch

from pid_diffusion.user_error import FileFormatError, OptionError
from pid_diffusion.utils import dist, fileio
from pid_diffusion.edm_pickle import EDMPickleError, load_edm_pickle
from pid_diffusion.images import write_npz
from pid_diffusion.inception import FEATURE_DIM, NUM_CLASSES, Detector

__all__ = [
    "IS_SPLITS",
    "FeatureStats",
    "InceptionScoreStats",
    "compute_statistics",
    "fid_from_stats",
    "load_reference",
    "save_reference",
]

IS_SPLITS = 10  # Salimans et al. 2016, kept by StyleGAN2-ADA
_NPZ_MAGIC = b"PK\x03\x04"  # an .npz is a zip archive; EDM2's reference statistics are a pickle


class FeatureStats:
    """Float64 sums of features and of their outer products (EDM fid.py), summed across ranks:
    mu = sum / N, sigma = (sum_outer - N mu mu^T) / (N - 1)."""

    def __init__(self, dim: int = FEATURE_DIM, device: torch.device | str = "cpu"):
        self.dim = dim
        self.num = torch.zeros([], dtype=torch.int64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: torch.Tensor) -> None:
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"Expected features of shape [N, {self.dim}], got {tuple(features.shape)}.")
        x = features.to(self.sum.device, torch.float64)
        self.num += len(x)
        self.sum += x.sum(0)
        self.sum_outer += x.T @ x

    def all_reduce(self) -> None:
        """Sum the accumulators of every rank (call once, on every rank, after the last update)."""
        self.num, self.sum, self.sum_outer = (dist.all_reduce_sum(t) for t in (self.num, self.sum, self.sum_outer))

    def mean_and_covariance(self) -> tuple[np.ndarray, np.ndarray]:
        """mu [dim] and the unbiased covariance sigma [dim, dim], float64."""
        num = int(self.num)
        if num < 2:
            raise OptionError(f"A covariance needs at least 2 images, got {num}.")
        mu = self.sum / num
        sigma = (self.sum_outer - torch.outer(mu, mu) * num) / (num - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


class InceptionScoreStats:
    """Per-split sums from which the Inception Score (Salimans et al. 2016) follows exactly.

    Image k of N belongs to split s when s N // S <= k < (s + 1) N // S (StyleGAN2-ADA's slicing of the
    generated images in seed order). With p̄_s the mean of the split's probabilities,
    KL_s = mean_k Σ_c p_kc log p_kc − Σ_c p̄_sc log p̄_sc; IS = mean_s exp(KL_s) ± std_s exp(KL_s).
    """

    def __init__(
        self,
        num_samples: int,
        num_classes: int = NUM_CLASSES,
        num_splits: int = IS_SPLITS,
        device: torch.device | str = "cpu",
    ):
        if num_samples < num_splits:
            raise OptionError(f"The Inception Score needs at least {num_splits} images (one per split).")
        self.num_samples = num_samples
        self.num_splits = num_splits
        self._split_ends = torch.tensor(
            [(s + 1) * num_samples // num_splits for s in range(num_splits)], device=device
        )
        self.count = torch.zeros(num_splits, dtype=torch.float64, device=device)
        self.sum_p = torch.zeros(num_splits, num_classes, dtype=torch.float64, device=device)
        self.sum_plogp = torch.zeros(num_splits, dtype=torch.float64, device=device)

    def update(self, probabilities: torch.Tensor, positions: torch.Tensor) -> None:
        """Add the class probabilities [n, C] of the images at `positions` (their index in 0..N-1)."""
        device = self.count.device
        positions = positions.to(device)
        if positions.min() < 0 or positions.max() >= self.num_samples:
            raise ValueError(f"Image positions must lie in [0, {self.num_samples}).")
        split = torch.bucketize(positions, self._split_ends, right=True)
        p = probabilities.to(device, torch.float64)
        self.count.index_add_(0, split, torch.ones_like(split, dtype=torch.float64))
        self.sum_p.index_add_(0, split, p)
        # xlogy: 0 log 0 = 0, where StyleGAN2-ADA's p * log(p) would give NaN for an underflowed class.
        self.sum_plogp.index_add_(0, split, torch.special.xlogy(p, p).sum(1))

    def all_reduce(self) -> None:
        """Sum the accumulators of every rank (call once, on every rank, after the last update)."""
        self.count, self.sum_p, self.sum_plogp = (dist.all_reduce_sum(t)
                                                  for t in (self.count, self.sum_p, self.sum_plogp))

    def score(self) -> tuple[float, float]:
        """Inception Score: mean and (population) standard deviation over the splits."""
        seen = int(self.count.sum())
        if seen != self.num_samples:
            raise ValueError(f"The Inception Score was set up for {self.num_samples} images but saw {seen}.")
        count = self.count[:, None]
        p_mean = self.sum_p / count
        kl = self.sum_plogp / self.count - torch.special.xlogy(p_mean, p_mean).sum(1)
        scores = torch.exp(kl).cpu().numpy()
        return float(np.mean(scores)), float(np.std(scores))


def compute_statistics(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    detector: Detector,
    num_samples: int,
    *,
    feature_dim: int = FEATURE_DIM,
    inception_score: bool = True,
    also: Sequence[tuple[Any, FeatureStats]] = (),
) -> tuple[FeatureStats, InceptionScoreStats | None]:
    """Feed this rank's `(positions, uint8 NCHW images)` batches to the detector and sum over ranks.

    `num_samples` is the total over all ranks; `positions` place each image in 0..N-1 for the IS splits.
    `feature_dim` is the reference statistics' dimension. The Inception Score costs a second pass of the
    detector; leave it out for reference statistics. `also`: (another detector, its accumulator) pairs fed the
    same images in the same pass (DINOv2 for FD_DINOv2), summed over ranks alike.
    """
    features = FeatureStats(feature_dim, device=detector.device)
    scores = InceptionScoreStats(num_samples, device=detector.device) if inception_score else None
    for positions, images in batches:
        for other, stats in also:
            stats.update(other.features(images))
        batch_features = detector.features(images)
        if batch_features.shape[1] != feature_dim:
            raise FileFormatError(f"The detector gives {batch_features.shape[1]}-d features, the reference statistics "
                             f"are {feature_dim}-d: were they made with another detector?")
        if (warning := detector.comparability_warning(batch_features.shape[1])) is not None:
            dist.print0(warning)
        features.update(batch_features)
        if scores is not None:
            scores.update(detector.probabilities(images), positions)
    features.all_reduce()
    for _, stats in also:
        stats.all_reduce()
    if scores is not None:
        scores.all_reduce()
    if int(features.num) != num_samples:
        raise ValueError(f"Expected statistics over {num_samples} images, the batches held {int(features.num)}.")
    return features, scores


def fid_from_stats(mu: np.ndarray, sigma: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
    """FID = ‖mu − mu_ref‖² + tr(sigma + sigma_ref − 2 sqrtm(sigma sigma_ref)), real part, no epsilon (EDM)."""
    if mu.shape != mu_ref.shape or sigma.shape != sigma_ref.shape or sigma.shape != mu.shape * 2:
        raise FileFormatError(
            f"Statistics do not match: mu {mu.shape}, sigma {sigma.shape} against mu_ref {mu_ref.shape}, "
            f"sigma_ref {sigma_ref.shape}; was the reference computed with another detector?"
        )
    m = np.square(mu - mu_ref).sum()
    s = scipy.linalg.sqrtm(np.dot(sigma, sigma_ref))
    return float(np.real(m + np.trace(sigma + sigma_ref - s * 2)))


def load_reference(path: str) -> tuple[np.ndarray, np.ndarray]:
    """mu and sigma from an EDM reference file (`cifar10-32x32.npz`: float64 `mu` [2048], `sigma` [2048, 2048])
    or from EDM2's (`img512.pkl`: a pickled dict whose `fid` entry holds them; read with the restricted
    unpickler, which rebuilds only numeric arrays and plain containers)."""
    data = fileio.read_bytes(path)
    if data[:len(_NPZ_MAGIC)] != _NPZ_MAGIC:
        mu, sigma = _edm2_reference(data, path)
    else:
        with np.load(io.BytesIO(data)) as arrays:
            missing = {"mu", "sigma"} - set(arrays.files)
            if missing:
                raise FileFormatError(
                    f"{path} is not a reference statistics file: it lacks {sorted(missing)} (has {arrays.files}). "
                    f"Make one with pid-fid-ref."
                )
            mu, sigma = arrays["mu"], arrays["sigma"]
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != mu.shape * 2:
        raise FileFormatError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not a mean and its covariance.")
    return mu, sigma


def _edm2_reference(data: bytes, path: str) -> tuple[np.ndarray, np.ndarray]:
    """EDM2's `dict(num_images, fid=dict(mu, sigma), fd_dinov2=dict(mu, sigma))`: the FID entry."""
    try:
        stats = load_edm_pickle(io.BytesIO(data))
    except EDMPickleError as error:
        raise FileFormatError(f"{path} is neither an .npz of reference statistics nor EDM2's reference pickle: "
                              f"{error}") from None
    if not (isinstance(stats, dict) and isinstance(stats.get("fid"), dict) and {"mu", "sigma"} <= stats["fid"].keys()):
        found = sorted(map(str, stats)) if isinstance(stats, dict) else type(stats).__name__
        raise FileFormatError(f"{path}: EDM2's reference pickle holds fid=dict(mu, sigma); found {found}")
    return stats["fid"]["mu"], stats["fid"]["sigma"]


def save_reference(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write reference statistics in EDM's format, atomically."""
    write_npz(path, mu=mu, sigma=sigma)
