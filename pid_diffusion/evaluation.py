"""The FID / Inception Score pipeline: batches of uint8 images → detector statistics → scores, for generated
images (`pid-fid`, the demo) and for data sets (`pid-fid-ref`, the demo's reference); and the results table
of a run folder's evaluations.

Images stream from the sampler (or the image source) into the accumulators of fid.py batch by batch, with no
PNGs on disk; every rank measures its share and the sums are reduced across ranks, so
every rank must call these functions. The results table is a CSV with one row per (checkpoint, weights,
seed range), rewritten atomically after each evaluation: an interrupted run loses only the evaluation in
flight, and the same command run again evaluates only what is missing. A checkpoint that cannot be loaded
gets a row with the error, retried on the next run. Several seed ranges give one row each; `best` keeps the
lowest FID, as EDM reports the best of three.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from pid_diffusion import checkpoint, dist, fileio, samplers
from pid_diffusion.fid import compute_statistics, fid_from_stats
from pid_diffusion.generate import generate
from pid_diffusion.image_sources import ImageSource
from pid_diffusion.inception import Detector

__all__ = ["CSV_FIELDS", "Result", "ResultsTable", "TRAINED_WEIGHTS", "evaluate", "evaluate_run",
           "generated_batches", "image_batches", "reference_statistics"]

TRAINED_WEIGHTS = "none"  # The `ema` column of the trained (not averaged) weights.

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
            raise ValueError(f"the images differ in shape ({sorted(shapes)}); FID needs one resolution")
        yield chunk, torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


def reference_statistics(source: ImageSource, detector: Detector, batch_size: int,
                         indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """mu and sigma of the detector's features over `source[indices]` (default: all of it), over all ranks."""
    indices = np.arange(len(source)) if indices is None else indices
    features, _ = compute_statistics(image_batches(source, indices, batch_size), detector, len(indices),
                                     inception_score=False)
    return features.mean_and_covariance()


def evaluate(net: nn.Module, sampler: samplers.Sampler, seeds: Sequence[int], detector: Detector,
             reference: tuple[np.ndarray, np.ndarray], batch_size: int, inception_score: bool = True
             ) -> tuple[float, float | None, float | None] | None:
    """(FID, IS mean, IS std) of `net` sampled over `seeds`; on rank 0 only (None elsewhere: the matrix
    square root is computed once). Without `inception_score` the IS entries are None (one detector pass)."""
    batches = generated_batches(net, sampler, seeds, batch_size, detector.device)
    features, scores = compute_statistics(batches, detector, len(seeds), feature_dim=len(reference[0]),
                                          inception_score=inception_score)
    if dist.rank() != 0:
        return None
    mu, sigma = features.mean_and_covariance()
    return fid_from_stats(mu, sigma, *reference), *(scores.score() if scores is not None else (None, None))


# ----------------------------------------------------------------------------------------------------------
# The results table.


@dataclasses.dataclass(frozen=True)
class Result:
    """One CSV row: the scores of one set of weights of one checkpoint on one seed range."""

    checkpoint: str  # File name inside the run folder.
    step: int
    ema: str  # EMA rate as the checkpoint names it, or TRAINED_WEIGHTS.
    seeds: str  # The seed range as given, e.g. 0-49999.
    num_samples: int
    fid: float | None = None
    is_mean: float | None = None
    is_std: float | None = None
    sampler: str = ""
    detector: str = ""
    reference: str = ""
    error: str = ""  # Why the checkpoint could not be evaluated; empty when it was.

    @property
    def key(self) -> tuple[str, str, str]:
        return self.checkpoint, self.ema, self.seeds

    def to_row(self) -> dict[str, str]:
        return {field.name: "" if (value := getattr(self, field.name)) is None else str(value)
                for field in dataclasses.fields(self)}

    @classmethod
    def from_row(cls, row: dict[str, str]) -> Result:
        numbers = {name: float(row[name]) if row[name] else None for name in ("fid", "is_mean", "is_std")}
        return cls(**{**row, **numbers, "step": int(row["step"]), "num_samples": int(row["num_samples"])})


CSV_FIELDS = [field.name for field in dataclasses.fields(Result)]


class ResultsTable:
    """The CSV of results, kept in memory and rewritten whole (temporary file, then rename) on each change."""

    def __init__(self, path: str):
        self.path = path
        self.results: dict[tuple[str, str, str], Result] = {}
        if fileio.exists(path):
            reader = csv.DictReader(io.StringIO(fileio.read_bytes(path).decode("utf-8")))
            if reader.fieldnames != CSV_FIELDS:
                raise ValueError(f"{path} has columns {reader.fieldnames}, not {CSV_FIELDS}; it was not written "
                                 "by this version of pid-fid: move it away or name another --csv")
            for row in reader:
                result = Result.from_row(row)
                self.results[result.key] = result

    def is_done(self, key: tuple[str, str, str]) -> bool:
        result = self.results.get(key)
        return result is not None and not result.error

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
        for result in sorted(self.results.values(), key=lambda r: (r.step, r.ema, r.seeds)):
            writer.writerow(result.to_row())
        fileio.atomic_write_text(text.getvalue(), self.path)

    def best(self) -> list[Result]:
        """Per (checkpoint, ema), the seed range with the lowest FID (EDM reports the best of three)."""
        best: dict[tuple[str, str], Result] = {}
        for result in self.results.values():
            if result.error:
                continue
            key = (result.checkpoint, result.ema)
            if key not in best or result.fid < best[key].fid:
                best[key] = result
        return sorted(best.values(), key=lambda r: (r.step, r.ema))


# ----------------------------------------------------------------------------------------------------------
# A run folder.


def _ema_names(path: str) -> list[str]:
    """The EMA rates a checkpoint holds, as it names them. A local file is memory-mapped, so listing them
    reads no weights and a re-run over a long run folder stays cheap."""
    try:
        data = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except (OSError, RuntimeError):  # A blob URL, or not torch.save's zip format: read it whole.
        data = fileio.torch_load(path)
    return list(data["ema"])


def _error(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def evaluate_run(run_dir: str, table: ResultsTable, seed_ranges: dict[str, list[int]], detector: Detector,
                 reference: tuple[np.ndarray, np.ndarray], reference_name: str, *, weights: Sequence[str] | None,
                 sampler_for: Callable[[nn.Module], samplers.Sampler], batch_size: int,
                 on_result: Callable[[Result], None] = lambda result: None) -> None:
    """Every missing (checkpoint, weights, seed range) of `run_dir`, each recorded in `table` (written by rank
    0) as soon as it is measured; `on_result` is called on rank 0 after each recorded score. `weights`:
    EMA names and/or TRAINED_WEIGHTS; None: all that each checkpoint holds. `sampler_for(net)` gives the
    sampler of each loaded network."""
    is_writer = dist.rank() == 0
    for step, path in checkpoint.find_checkpoints(run_dir):
        name = path.rsplit("/", 1)[-1]
        try:
            available = [TRAINED_WEIGHTS, *_ema_names(path)]
        except Exception as error:  # An unreadable file of any kind: record it and go on with the others.
            for text, seeds in seed_ranges.items():
                table.record(Result(name, step, "", text, len(seeds), error=_error(error)), write=is_writer)
            dist.print0(f"{name}: cannot be read: {error}")
            continue
        for ema in weights or available:
            for text, seeds in seed_ranges.items():
                if table.is_done((name, ema, text)):
                    continue
                result = Result(name, step, ema, text, len(seeds), detector=detector.source, reference=reference_name)
                try:
                    if ema not in available:
                        raise ValueError(f"no weights {ema!r}; it has {', '.join(available)}")
                    net = checkpoint.load_generator(
                        path, ema_rate=None if ema == TRAINED_WEIGHTS else float(ema), device=detector.device)
                except Exception as error:
                    table.record(dataclasses.replace(result, error=_error(error)), write=is_writer)
                    dist.print0(f"{name} ema {ema}: cannot be loaded: {error}")
                    continue
                sampler = sampler_for(net)
                scores = evaluate(net, sampler, seeds, detector, reference, batch_size)
                if is_writer:
                    fid, is_mean, is_std = scores
                    sampler_name = f"{type(sampler).__name__} ({sampler.num_network_calls} NFE)"
                    result = dataclasses.replace(result, fid=fid, is_mean=is_mean, is_std=is_std, sampler=sampler_name)
                    table.record(result, write=True)
                    on_result(result)
