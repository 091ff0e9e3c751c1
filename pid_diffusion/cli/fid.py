"""pid-fid: FID and Inception Score of every checkpoint in a run folder, trained weights and each EMA.

Images are generated, quantised to uint8 and passed to EDM's Inception detector batch by batch (no PNGs on
disk); FID is measured against an EDM reference file (`cifar10-32x32.npz`, or one made by pid-fid-ref).
Every (checkpoint, weights, seed range) gets one row of the CSV, which is rewritten atomically after each
evaluation: an interrupted run loses only the evaluation in flight, and running the same command again
evaluates only what is missing (new checkpoints included). A checkpoint that cannot be loaded gets a row
with the error, retried on the next run, and the others are still evaluated. Several seed ranges give one
row each; the summary and the plot use the best (lowest FID), as EDM reports the best of three.

    pid-fid --run runs/cifar10 --ref cifar10-32x32.npz --seeds 0-49999
    mpirun -np 8 pid-fid --run runs/cifar10 --ref cifar10-32x32.npz --seeds 0-49999 50000-99999 --batch 500
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch
from torch import nn

from pid_diffusion import checkpoint, dist, fileio, samplers
from pid_diffusion.cli import errors
from pid_diffusion.cli.sample import add_sampler_arguments, parse_int_list, sampler_from_args
from pid_diffusion.fid import compute_statistics, fid_from_stats, load_reference
from pid_diffusion.generate import generate
from pid_diffusion.inception import Detector, load_detector

__all__ = ["Result", "ResultsTable", "evaluate", "main", "plot_results"]

TRAINED_WEIGHTS = "none"  # the `ema` column of the trained (not averaged) weights


# ----------------------------------------------------------------------------------------------------------
# The results table.

@dataclass(frozen=True)
class Result:
    """One CSV row: the scores of one set of weights of one checkpoint on one seed range."""

    checkpoint: str  # file name inside the run folder
    step: int
    ema: str  # EMA rate as the checkpoint names it, or TRAINED_WEIGHTS
    seeds: str  # the seed range as given, e.g. 0-49999
    num_samples: int
    fid: float | None = None
    is_mean: float | None = None
    is_std: float | None = None
    sampler: str = ""
    detector: str = ""
    reference: str = ""
    error: str = ""  # why the checkpoint could not be evaluated; empty when it was

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
# Evaluation.

def evaluate(net: nn.Module, sampler: samplers.Sampler, seeds: Sequence[int], detector: Detector,
             reference: tuple[np.ndarray, np.ndarray], batch_size: int) -> tuple[float, float, float] | None:
    """(FID, IS mean, IS std) of `net` over `seeds`, images streamed from the sampler into the detector;
    on rank 0 only (None elsewhere: the matrix square root is computed once)."""
    batches = ((batch.positions, batch.images.permute(0, 3, 1, 2))
               for batch in generate(net, sampler, seeds, batch_size=batch_size, device=detector.device))
    features, scores = compute_statistics(batches, detector, len(seeds), feature_dim=len(reference[0]))
    if dist.rank() != 0:
        return None
    mu, sigma = features.mean_and_covariance()
    return fid_from_stats(mu, sigma, *reference), *scores.score()


def _ema_names(path: str) -> list[str]:
    """The EMA rates a checkpoint holds, as it names them. A local file is memory-mapped, so listing them
    reads no weights and a re-run over a long run folder stays cheap."""
    try:
        data = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except (OSError, RuntimeError):  # a blob URL, or not torch.save's zip format: read it whole
        data = fileio.torch_load(path)
    return list(data["ema"])


def _sampler_name(sampler: samplers.Sampler) -> str:
    return f"{type(sampler).__name__} ({sampler.num_network_calls} NFE)"


# ----------------------------------------------------------------------------------------------------------
# The plot (drawn with PIL: matplotlib is not a dependency).

_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
_PANEL_SIZE = (760, 300)  # pixels of one plot area
_MARGIN = dict(left=90, right=30, top=40, bottom=60)
_MAX_TICKS = 6


def _nice_ticks(low: float, high: float) -> list[float]:
    """At most about _MAX_TICKS round values (1, 2 or 5 times a power of ten) covering [low, high]."""
    if high <= low:
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / _MAX_TICKS
    power = 10 ** math.floor(math.log10(raw))
    step = next(power * m for m in (1, 2, 5, 10) if power * m >= raw)
    first, last = math.floor(low / step), math.ceil(high / step)
    return [i * step for i in range(first, last + 1)]


def _tick_label(value: float) -> str:
    if abs(value) >= 1e6 and value % 1e5 == 0:
        return f"{value / 1e6:g}M"
    if abs(value) >= 1e3 and value % 100 == 0:
        return f"{value / 1e3:g}k"
    return f"{value:.6g}"


def _draw_panel(image: PIL.Image.Image, origin: tuple[int, int], series: dict[str, list[tuple[int, float]]],
                y_label: str, font: PIL.ImageFont.ImageFont) -> None:
    """One line chart (x: training step) with its axes, ticks, labels and a legend, at `origin`."""
    draw = PIL.ImageDraw.Draw(image)
    width, height = _PANEL_SIZE
    x0, y0 = origin[0] + _MARGIN["left"], origin[1] + _MARGIN["top"]
    x1, y1 = x0 + width, y0 + height
    points = [point for line in series.values() for point in line]
    x_ticks = _nice_ticks(min(p[0] for p in points), max(p[0] for p in points))
    y_ticks = _nice_ticks(min(p[1] for p in points), max(p[1] for p in points))

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        u = (x - x_ticks[0]) / (x_ticks[-1] - x_ticks[0])
        v = (y - y_ticks[0]) / (y_ticks[-1] - y_ticks[0])
        return x0 + u * width, y1 - v * height

    # Grid, ticks and tick labels.
    for x in x_ticks:
        px = to_pixel(x, y_ticks[0])[0]
        draw.line([(px, y0), (px, y1)], fill="#e5e5e5")
        draw.line([(px, y1), (px, y1 + 5)], fill="black")
        draw.text((px, y1 + 8), _tick_label(x), fill="black", font=font, anchor="mt")
    for y in y_ticks:
        py = to_pixel(x_ticks[0], y)[1]
        draw.line([(x0, py), (x1, py)], fill="#e5e5e5")
        draw.line([(x0 - 5, py), (x0, py)], fill="black")
        draw.text((x0 - 8, py), _tick_label(y), fill="black", font=font, anchor="rm")
    draw.rectangle([x0, y0, x1, y1], outline="black")

    # Axis labels: x below the ticks, y rotated beside them.
    draw.text(((x0 + x1) / 2, y1 + 32), "training step", fill="black", font=font, anchor="mt")
    label = PIL.Image.new("RGBA", (int(draw.textlength(y_label, font=font)) + 4, font.size + 6), (0, 0, 0, 0))
    PIL.ImageDraw.Draw(label).text((2, 0), y_label, fill="black", font=font)
    label = label.rotate(90, expand=True)
    image.paste(label, (origin[0] + 8, int((y0 + y1) / 2 - label.height / 2)), label)

    # One line per EMA rate, with markers, and the legend above the plot area.
    legend_x = x0
    for colour, (name, line) in zip(itertools.cycle(_PALETTE), series.items()):
        pixels = [to_pixel(x, y) for x, y in sorted(line)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for px, py in pixels:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        draw.line([(legend_x, y0 - 18), (legend_x + 20, y0 - 18)], fill=colour, width=3)
        draw.text((legend_x + 25, y0 - 18), name, fill="black", font=font, anchor="lm")
        legend_x += 40 + int(draw.textlength(name, font=font))


def plot_results(results: Sequence[Result]) -> PIL.Image.Image:
    """FID (top) and Inception Score (bottom) against training step, one line per set of weights."""
    panels = [("FID", lambda r: r.fid), ("Inception Score", lambda r: r.is_mean)]
    panel_height = _PANEL_SIZE[1] + _MARGIN["top"] + _MARGIN["bottom"]
    image = PIL.Image.new("RGB", (_PANEL_SIZE[0] + _MARGIN["left"] + _MARGIN["right"],
                                  panel_height * len(panels)), "white")
    font = PIL.ImageFont.load_default(size=14)
    for index, (name, value) in enumerate(panels):
        series: dict[str, list[tuple[int, float]]] = {}
        for result in results:
            label = "trained weights" if result.ema == TRAINED_WEIGHTS else f"EMA {result.ema}"
            series.setdefault(label, []).append((result.step, value(result)))
        _draw_panel(image, (0, index * panel_height), series, name, font)
    return image


def _png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------
# Command line.

def _seed_range(text: str) -> tuple[str, list[int]]:
    """A seed range as written (for the CSV) and its seeds, each used once."""
    seeds = parse_int_list(text)
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seed range {text} lists a seed twice")
    return text, seeds


def _weights_name(text: str) -> str:
    """'none' or an EMA rate written as the checkpoint's `ema` keys write it (str of the float)."""
    if text == TRAINED_WEIGHTS:
        return text
    try:
        rate = float(text)
    except ValueError:
        rate = math.nan
    if not 0 < rate < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is neither an EMA rate in (0, 1) nor '{TRAINED_WEIGHTS}'")
    return str(rate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pid-fid", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="folder of checkpoint-<step>.pt files")
    parser.add_argument("--ref", required=True, help="reference statistics (EDM npz with mu, sigma)")
    parser.add_argument("--seeds", nargs="+", type=_seed_range, default=[_seed_range("0-49999")],
                        help="seed ranges, each evaluated separately, e.g. 0-49999 50000-99999 (default 0-49999)")
    parser.add_argument("--ema", nargs="+", type=_weights_name,
                        help=f"weights to evaluate: EMA rates and/or '{TRAINED_WEIGHTS}' (default: all)")
    parser.add_argument("--batch", type=int, default=250, help="images per rank and batch (default 250)")
    parser.add_argument("--detector", help="inception-2015-12-05.pt (default: the torch hub cache)")
    parser.add_argument("--csv", help="results table (default <run>/fid.csv)")
    parser.add_argument("--plot", help="PNG plot of FID and IS against step (default <run>/fid.png)")
    add_sampler_arguments(parser)
    return parser


def _evaluate_checkpoint(args: argparse.Namespace, step: int, path: str, seed_ranges: dict[str, list[int]],
                         detector: Detector, reference: tuple[np.ndarray, np.ndarray], table: ResultsTable,
                         plot_path: str) -> None:
    """Every missing (weights, seed range) of one checkpoint, each recorded as soon as it is measured."""
    name = path.rsplit("/", 1)[-1]
    is_writer = dist.rank() == 0
    try:
        available = [TRAINED_WEIGHTS, *_ema_names(path)]
    except Exception as error:  # an unreadable file of any kind: record it and go on with the others
        for text, seeds in seed_ranges.items():
            table.record(Result(name, step, "", text, len(seeds), error=f"{type(error).__name__}: {error}"),
                         write=is_writer)
        dist.print0(f"{name}: cannot be read: {error}")
        return
    for ema in args.ema or available:
        for text, seeds in seed_ranges.items():
            if table.is_done((name, ema, text)):
                continue
            result = Result(name, step, ema, text, len(seeds), detector=detector.source, reference=args.ref)
            try:
                if ema not in available:
                    raise ValueError(f"no weights {ema!r}; it has {', '.join(available)}")
                net = checkpoint.load_generator(
                    path, ema_rate=None if ema == TRAINED_WEIGHTS else float(ema), device=detector.device)
            except Exception as error:
                table.record(dataclasses.replace(result, error=f"{type(error).__name__}: {error}"), write=is_writer)
                dist.print0(f"{name} ema {ema}: cannot be loaded: {error}")
                continue
            sampler = sampler_from_args(args, net)
            scores = evaluate(net, sampler, seeds, detector, reference, args.batch)
            if is_writer:
                fid, is_mean, is_std = scores
                table.record(dataclasses.replace(result, fid=fid, is_mean=is_mean, is_std=is_std,
                                                 sampler=_sampler_name(sampler)), write=True)
                fileio.atomic_write_bytes(_png_bytes(plot_results(table.best())), plot_path)
                print(f"{name} ema {ema} seeds {text}: FID {fid:.4f}  IS {is_mean:.3f} ± {is_std:.3f}", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    with dist.abort_on_error(), errors.reported("pid-fid"):
        parser = build_parser()
        args = parser.parse_args(argv)
        seed_ranges = dict(args.seeds)
        if args.batch < 1:
            parser.error("--batch must be positive")
        csv_path = args.csv or fileio.join(args.run, "fid.csv")
        plot_path = args.plot or fileio.join(args.run, "fid.png")
        checkpoints = checkpoint.find_checkpoints(args.run)
        if not checkpoints:
            parser.error(f"no checkpoint-<step>.pt files in {args.run}")

        dist.init()
        detector = load_detector(args.detector, dist.device())
        reference = load_reference(args.ref)
        table = ResultsTable(csv_path)
        for step, path in checkpoints:
            _evaluate_checkpoint(args, step, path, seed_ranges, detector, reference, table, plot_path)
        if dist.rank() == 0:
            for result in table.best():
                print(f"best: {result.checkpoint} ema {result.ema}: FID {result.fid:.4f} (seeds {result.seeds})")
        dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main()
