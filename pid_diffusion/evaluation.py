"""The FID / Inception Score pipeline: batches of uint8 images → detector statistics → scores, for generated
images (`pid-fid`, the demo) and for data sets (`pid-fid-ref`, the demo's reference); and the results table
of the evaluations: of every snapshot of a run folder, of one snapshot or training state, of a teacher with
its sampler, or of a file of images.

Images stream from the sampler (or the image source) into the accumulators of fid.py batch by batch, with no
PNGs on disk; every rank measures its share and the sums are reduced across ranks, so
every rank must call these functions. The results table is a CSV with one row per (source, weights, seed
range, sampler), rewritten atomically after each evaluation: an interrupted run loses only the evaluation in
flight, and the same command run again evaluates only what is missing. A damaged snapshot or training state
(one that does not load) is skipped with one line naming it and the reason, and gets a row with the error,
retried on the next run; nothing is deleted. Several seed ranges give one row each; `best` keeps the
lowest FID, as EDM reports the best of three.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from pid_diffusion.user_error import FileFormatError, OptionError
from pid_diffusion import samplers
from pid_diffusion.training import checkpoint
from pid_diffusion.utils import dist, fileio
from pid_diffusion.dinov2 import DINOv2Detector
from pid_diffusion.fid import FeatureStats, compute_statistics, fid_from_stats
from pid_diffusion.generate import generate
from pid_diffusion.image_sources import ImageSource
from pid_diffusion.inception import Detector
from pid_diffusion.reference_stats import ReferenceStats

__all__ = ["CSV_FIELDS", "FDDINOv2", "Result", "ResultsTable", "NO_EMA", "evaluate", "evaluate_file", "evaluate_images",
           "evaluate_network", "evaluate_run", "evaluate_weights", "generated_batches", "image_batches", "reference_statistics",
           "sampler_label"]

NO_EMA = "none"  # The `ema` column (and --ema value) of the raw trained weights, which no EMA averaged.

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]  # (positions in 0..N−1, uint8 NCHW images), this rank's.


# ----------------------------------------------------------------------------------------------------------
# Batches → statistics → scores.


def generated_batches(net: nn.Module, sampler: samplers.Sampler, seeds: Sequence[int], batch_size: int,
                      device: torch.device) -> Batches:
    """This rank's share of the images of `seeds` (`generate.generate`), as the detector reads them."""
    for batch in generate(net, sampler, seeds, batch_size=batch_size, device=device):
        yield batch.positions, batch.images.permute(0, 3, 1, 2)


def image_batches(source: ImageSource, indices: np.ndarray, batch_size: int) -> Batches:
    """This rank's share, `indices[rank::world_size]`, of an image source (or a uint8 NHWC array)."""
    positions = torch.arange(dist.rank(), len(indices), dist.world_size())
    for chunk in positions.split(batch_size):
        images = [source[int(indices[position])] for position in chunk]
        shapes = {image.shape for image in images}
        if len(shapes) > 1:
            raise FileFormatError(f"the images differ in shape ({sorted(shapes)}); FID needs one resolution")
        yield chunk, torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


@dataclasses.dataclass(frozen=True)
class FDDINOv2:
    """FD_DINOv2 beside FID (EDM2's metric): the DINOv2 detector and the reference's DINOv2 statistics."""

    detector: DINOv2Detector
    reference: tuple[np.ndarray, np.ndarray]

    def accumulator(self) -> tuple[DINOv2Detector, FeatureStats]:
        """The pair `compute_statistics(also=...)` feeds."""
        return self.detector, FeatureStats(self.detector.feature_dim, device=self.detector.device)


def reference_statistics(source: ImageSource, detector: Detector, batch_size: int, indices: np.ndarray | None = None,
                         dinov2: DINOv2Detector | None = None) -> ReferenceStats:
    """The statistics of the detector's features (and DINOv2's, when given) over `source[indices]` (default: all
    of it), over all ranks, in one pass over the images."""
    indices = np.arange(len(source)) if indices is None else indices
    # The detector's feature size, from one image: EDM's Inception gives 2048, a stand-in detector another size.
    first = torch.from_numpy(np.asarray(source[int(indices[0])])[None]).permute(0, 3, 1, 2)
    also = [] if dinov2 is None else [(dinov2, FeatureStats(dinov2.feature_dim, device=dinov2.device))]
    features, _ = compute_statistics(image_batches(source, indices, batch_size), detector, len(indices),
                                     feature_dim=detector.features(first).shape[1], inception_score=False, also=also)
    return ReferenceStats(fid=features.mean_and_covariance(),
                          fd_dinov2=also[0][1].mean_and_covariance() if also else None, num_images=len(indices))


def evaluate(net: nn.Module, sampler: samplers.Sampler, seeds: Sequence[int], detector: Detector,
             reference: tuple[np.ndarray, np.ndarray], batch_size: int, inception_score: bool = True,
             fd_dinov2: FDDINOv2 | None = None) -> tuple[float, float | None, float | None, float | None] | None:
    """(FID, IS mean, IS std, FD_DINOv2) of `net` sampled over `seeds`; on rank 0 only (None elsewhere: the
    matrix square roots are computed once). Without `inception_score` the IS entries are None (one detector
    pass); without `fd_dinov2` the last one is. The latents are drawn on `net`'s device; the detectors move the
    images to their own."""
    batches = generated_batches(net, sampler, seeds, batch_size, _device_of(net))
    also = [] if fd_dinov2 is None else [fd_dinov2.accumulator()]
    features, scores = compute_statistics(batches, detector, len(seeds), feature_dim=len(reference[0]),
                                          inception_score=inception_score, also=also)
    if dist.rank() != 0:
        return None
    return (fid_from_stats(*features.mean_and_covariance(), *reference),
            *(scores.score() if scores is not None else (None, None)), _fd(also, fd_dinov2))


def _fd(also: list[tuple[DINOv2Detector, FeatureStats]], fd_dinov2: FDDINOv2 | None) -> float | None:
    """FD_DINOv2 from the filled accumulator of `also`, or None where it was not asked for."""
    return None if fd_dinov2 is None else fid_from_stats(*also[0][1].mean_and_covariance(), *fd_dinov2.reference)


def _device_of(net: nn.Module) -> torch.device:
    """Where `net`'s weights are: where its inputs must be created."""
    return next(net.parameters()).device


# ----------------------------------------------------------------------------------------------------------
# The results table.


@dataclasses.dataclass(frozen=True)
class Result:
    """One CSV row: the scores of one set of weights of one file on one seed range with one sampler."""

    checkpoint: str  # What was scored: a snapshot or training state (file name), a teacher or image file.
    step: int | None  # Training step of a snapshot or training state; None for a teacher or images.
    ema: str  # EMA rate as the checkpoint names it, NO_EMA; empty for a teacher or images.
    seeds: str  # The seed range as given, e.g. 0-49999; empty for images.
    num_samples: int
    fid: float | None = None
    is_mean: float | None = None
    is_std: float | None = None
    fd_dinov2: float | None = None  # EDM2's Fréchet distance in DINOv2 features; empty unless pid-fid --fd-dinov2.
    sampler: str = ""
    detector: str = ""
    reference: str = ""
    error: str = ""  # Why the checkpoint could not be evaluated; empty when it was.

    @property
    def key(self) -> tuple[str, str, str, str]:
        return self.checkpoint, self.ema, self.seeds, self.sampler

    def to_row(self) -> dict[str, str]:
        return {field.name: "" if (value := getattr(self, field.name)) is None else str(value)
                for field in dataclasses.fields(self)}

    @classmethod
    def from_row(cls, row: dict[str, str]) -> Result:
        numbers = {name: float(row[name]) if row.get(name) else None for name in _NUMBERS}
        step = int(row["step"]) if row["step"] else None
        return cls(**{**row, **numbers, "step": step, "num_samples": int(row["num_samples"])})

    @property
    def order(self) -> tuple:
        return -1 if self.step is None else self.step, self.checkpoint, self.ema, self.seeds, self.sampler


CSV_FIELDS = [field.name for field in dataclasses.fields(Result)]
_NUMBERS = ("fid", "is_mean", "is_std", "fd_dinov2")
_BEFORE_FD_DINOV2 = [name for name in CSV_FIELDS if name != "fd_dinov2"]  # The columns of older tables, still read.


class ResultsTable:
    """The CSV of results, kept in memory and rewritten whole (temporary file, then rename) on each change."""

    def __init__(self, path: str):
        self.path = path
        self.results: dict[tuple[str, str, str, str], Result] = {}
        if fileio.exists(path):
            reader = csv.DictReader(io.StringIO(fileio.read_bytes(path).decode("utf-8")))
            if reader.fieldnames not in (CSV_FIELDS, _BEFORE_FD_DINOV2):
                raise FileFormatError(f"{path} has columns {reader.fieldnames}, not {CSV_FIELDS}; it was not written "
                                 "by this version of pid-fid: move it away or name another --csv")
            for row in reader:
                result = Result.from_row(row)
                self.results[result.key] = result

    def is_done(self, key: tuple[str, str, str, str], fd_dinov2: bool = False) -> bool:
        """Whether `key` has a score (and an FD_DINOv2, when `fd_dinov2` asks for one)."""
        result = self.results.get(key)
        return result is not None and not result.error and (not fd_dinov2 or result.fd_dinov2 is not None)

    def record(self, result: Result, *, write: bool) -> None:
        """Add or replace a result; a successful one also clears its checkpoint's failures on that range."""
        if not result.error:
            self.results = {key: old for key, old in self.results.items()
                            if not (old.error and old.checkpoint == result.checkpoint and old.seeds == result.seeds)}
        self.results[result.key] = result
        if write:
            self._write()

    def _write(self) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        for result in sorted(self.results.values(), key=lambda r: r.order):
            writer.writerow(result.to_row())
        fileio.atomic_write_text(text.getvalue(), self.path)

    def best(self) -> list[Result]:
        """Per (source, weights, sampler), the seed range with the lowest FID (EDM reports the best of three)."""
        best: dict[tuple[str, str, str], Result] = {}
        for result in self.results.values():
            if result.error:
                continue
            key = (result.checkpoint, result.ema, result.sampler)
            if key not in best or result.fid < best[key].fid:
                best[key] = result
        return sorted(best.values(), key=lambda r: r.order)


# ----------------------------------------------------------------------------------------------------------
# What can be scored: a run folder, one snapshot or training state, a network with its sampler, images.


def sampler_label(sampler: samplers.Sampler) -> str:
    """The `sampler` column: the sampler and its number of network calls, e.g. 'HeunSampler (35 NFE)'."""
    return f"{type(sampler).__name__} ({sampler.num_network_calls} NFE)"


def _error(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def _score(table: ResultsTable, result: Result, net: nn.Module, sampler: samplers.Sampler, seeds: Sequence[int],
           detector: Detector, reference: tuple[np.ndarray, np.ndarray], batch_size: int,
           on_result: Callable[[Result], None], fd_dinov2: FDDINOv2 | None) -> None:
    scores = evaluate(net, sampler, seeds, detector, reference, batch_size, fd_dinov2=fd_dinov2)
    if dist.rank() == 0:
        fid, is_mean, is_std, fd = scores
        result = dataclasses.replace(result, fid=fid, is_mean=is_mean, is_std=is_std, fd_dinov2=fd)
        table.record(result, write=True)
        on_result(result)


def evaluate_file(path: str, table: ResultsTable, seed_ranges: dict[str, list[int]], detector: Detector,
                  reference: tuple[np.ndarray, np.ndarray], reference_name: str, *, weights: Sequence[str] | None,
                  sampler_for: Callable[[str], samplers.Sampler], batch_size: int,
                  on_result: Callable[[Result], None] = lambda result: None, fd_dinov2: FDDINOv2 | None = None) -> None:
    """Every missing (weights, seed range) of one snapshot or training state, each recorded in `table`
    (written by rank 0) as soon as it is measured; `on_result` is called on rank 0 after each recorded score.
    `weights`: EMA names and/or NO_EMA; None: all the file holds. `sampler_for(model class)` gives
    the sampler, chosen before any weights are read. A file or a set of weights that cannot be
    loaded gets a row with the error. `fd_dinov2`: FD_DINOv2 as well (rows without it are measured again)."""
    is_writer = dist.rank() == 0
    name = path.rsplit("/", 1)[-1]
    try:
        header = checkpoint.read_header(path)  # A local file is memory-mapped: a re-run reads no weights.
        step, available = header["step"], [NO_EMA, *header["ema"]]
        model_class = header["model_spec"]["class"]
        sampler = sampler_for(model_class)
    except Exception as error:  # An unreadable file of any kind: record it and go on with the others.
        for text, seeds in seed_ranges.items():
            table.record(Result(name, checkpoint.step_of(path), "", text, len(seeds), error=_error(error)),
                         write=is_writer)
        dist.print0(f"{checkpoint.skip_note(path, error)}; its row in {table.path} records why")
        return
    files = {ema: (name, functools.partial(checkpoint.load_network, path,
                                           ema_rate=None if ema == NO_EMA else ema,
                                           device=detector.device))
             for ema in available}
    evaluate_weights(table, files, name, step, weights, sampler, seed_ranges, detector, reference, reference_name,
                     batch_size=batch_size, on_result=on_result, fd_dinov2=fd_dinov2)


def evaluate_weights(table: ResultsTable, files: Mapping[str, tuple[str, Callable[[], nn.Module]]], fallback_name: str,
                     step: int | None, weights: Sequence[str] | None, sampler: samplers.Sampler,
                     seed_ranges: dict[str, list[int]], detector: Detector, reference: tuple[np.ndarray, np.ndarray],
                     reference_name: str, *, batch_size: int, on_result: Callable[[Result], None],
                     fd_dinov2: FDDINOv2 | None = None) -> None:
    """Every missing (weights, seed range) of one step: `files` maps each set of weights it has (an EMA name,
    NO_EMA) to (the file name of its rows, a loader of the network); `weights` None: all of them.
    Weights that are not there, or do not load, get a row with the error (named `fallback_name` when absent).
    `fd_dinov2`: FD_DINOv2 as well (rows without it are measured again)."""
    is_writer = dist.rank() == 0
    for ema in weights or list(files):
        name, load = files.get(ema, (fallback_name, None))
        for text, seeds in seed_ranges.items():
            result = Result(name, step, ema, text, len(seeds), sampler=sampler_label(sampler),
                            detector=detector.source, reference=reference_name)
            if table.is_done(result.key, fd_dinov2 is not None):
                continue
            try:
                if load is None:
                    raise OptionError(f"no weights {ema!r}; it has {', '.join(files)}")
                net = load()
            except Exception as error:
                table.record(dataclasses.replace(result, error=_error(error)), write=is_writer)
                dist.print0(f"{name} ema {ema}: cannot be loaded: {error}")
                continue
            _score(table, result, net, sampler, seeds, detector, reference, batch_size, on_result, fd_dinov2)


def evaluate_run(run_dir: str, table: ResultsTable, seed_ranges: dict[str, list[int]], detector: Detector,
                 reference: tuple[np.ndarray, np.ndarray], reference_name: str, **options) -> None:
    """`evaluate_file` on every snapshot of `run_dir` (and each training state of a step without one),
    oldest first: the points of FID against the step."""
    for _, path in checkpoint.find_weights(run_dir):
        evaluate_file(path, table, seed_ranges, detector, reference, reference_name, **options)


def evaluate_network(name: str, net: nn.Module, sampler: samplers.Sampler, table: ResultsTable,
                     seed_ranges: dict[str, list[int]], detector: Detector, reference: tuple[np.ndarray, np.ndarray],
                     reference_name: str, *, batch_size: int,
                     on_result: Callable[[Result], None] = lambda result: None, fd_dinov2: FDDINOv2 | None = None) -> None:
    """Every missing seed range of one network with its sampler (a teacher: EDM's baseline), as a row named
    `name` without a step or weights."""
    for text, seeds in seed_ranges.items():
        result = Result(name, None, "", text, len(seeds), sampler=sampler_label(sampler), detector=detector.source,
                        reference=reference_name)
        if not table.is_done(result.key, fd_dinov2 is not None):
            _score(table, result, net, sampler, seeds, detector, reference, batch_size, on_result, fd_dinov2)


def evaluate_images(name: str, source: ImageSource, table: ResultsTable, detector: Detector,
                    reference: tuple[np.ndarray, np.ndarray], reference_name: str, *, batch_size: int,
                    on_result: Callable[[Result], None] = lambda result: None, fd_dinov2: FDDINOv2 | None = None) -> None:
    """FID and IS (and FD_DINOv2) of every image of `source` (an .npz of samples, a folder, a zip), as EDM's `fid.py calc`
    scores a folder of images: one row named `name`."""
    result = Result(name, None, "", "", len(source), detector=detector.source, reference=reference_name)
    if table.is_done(result.key, fd_dinov2 is not None):
        return
    also = [] if fd_dinov2 is None else [fd_dinov2.accumulator()]
    features, scores = compute_statistics(image_batches(source, np.arange(len(source)), batch_size), detector,
                                          len(source), feature_dim=len(reference[0]), inception_score=True, also=also)
    if dist.rank() == 0:
        mu, sigma = features.mean_and_covariance()
        result = dataclasses.replace(result, fid=fid_from_stats(mu, sigma, *reference), fd_dinov2=_fd(also, fd_dinov2),
                                     **dict(zip(("is_mean", "is_std"), scores.score())))
        table.record(result, write=True)
        on_result(result)
