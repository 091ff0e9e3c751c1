"""The one-command demo: distil the bundled teacher into a one-step student on a CPU, and show the change.

From the same latents, the teacher's Heun samples (35 network calls) are compared with the student's
one-step samples before and after distillation: a labelled PNG of the three rows, and a table of the
agreement (RMSE and PSNR of images in [0, 1]) and, when EDM's Inception detector is on disk, FID against
the bundled data set. The distilled student is evaluated by its raw weights unless an EMA is asked for: the
`default` preset decays its learning rate to 0, and at the end of the decay the raw weights agree with the
teacher better than its EMAs do.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os

import numpy as np
import torch
from torch import nn

from pid_diffusion.user_error import OptionError
from pid_diffusion import evaluation, inception
from pid_diffusion.training import checkpoint
from pid_diffusion.utils import dist, fileio, hub
from pid_diffusion.distill import DistillConfig, build, fingerprints
from pid_diffusion.fid import load_reference, save_reference
from pid_diffusion.images import labelled_rows_png
from pid_diffusion.samplers import HeunSampler, OneStepSampler, Sampler
from pid_diffusion.toydata import ShapesSpec, make_shapes
from pid_diffusion.generate import sampler_preview, seeded_inputs
from pid_diffusion.training.train import training_loop

__all__ = ["DemoOptions", "Row", "agreement", "run_demo", "format_table"]

_FID_BATCH = 100  # Images per detector batch.
ZOO_STUDENT = "model_zoo/pid-shapes-16x16.pt"  # The bundled teacher's distilled student (model_zoo/README.md).


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    """What the demo measures and draws, besides the distillation configuration."""

    eval_images: int = 64                # Latents compared between teacher and student (RMSE, PSNR).
    eval_seed: int = 1_000_000           # Latent k comes from seed eval_seed + k (EDM's per-image seeds).
    grid_columns: int = 10               # Images per row in the PNG.
    grid_scale: int = 4                  # Pixel magnification in the PNG (16×16 → 64×64).
    ema_rate: float | None = None        # Evaluate the student's EMA at this rate; None: the raw weights.
    fid_images: int = 1000               # Samples and data images per FID (only with a detector).
    detector: str | None = None          # Inception detector file; None: the torch hub cache (never downloaded).
    data: ShapesSpec = ShapesSpec()      # The data set the bundled teacher was trained on (FID reference).
    zoo_student: str | None = ZOO_STUDENT  # A row for this snapshot when present and of the run's teacher file.

    def __post_init__(self):
        if self.eval_images < 1:
            raise OptionError(f"eval_images must be ≥ 1, got {self.eval_images}")
        if not 1 <= self.grid_columns:
            raise OptionError(f"grid_columns must be ≥ 1, got {self.grid_columns}")
        if self.grid_scale < 1:
            raise OptionError(f"grid_scale must be ≥ 1, got {self.grid_scale}")
        if self.fid_images < 2:
            raise OptionError(f"fid_images must be ≥ 2 (a covariance needs two samples), got {self.fid_images}")


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the result table."""

    name: str
    network_calls: int
    rmse: float | None          # Against the teacher's Heun output from the same latents, images in [0, 1].
    psnr: float | None          # 20 log10(1 / rmse), in dB.
    fid: float | None = None    # Against the data set; None without a detector.


# ----------------------------------------------------------------------------------------------------------
# Pieces.


def agreement(images: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """RMSE and PSNR (dB) between two image batches in [−1, 1], measured on the [0, 1] scale over all pixels."""
    rmse = ((images - reference) / 2).square().mean().sqrt().item()
    psnr = math.inf if rmse == 0 else -20 * math.log10(rmse)
    return rmse, psnr


def format_table(rows: list[Row], fid_note: str) -> str:
    """The result table as text, with a line about FID."""
    lines = [f"{'':44} {'calls':>5} {'RMSE':>8} {'PSNR (dB)':>10} {'FID':>8}"]
    for row in rows:
        rmse = "—" if row.rmse is None else f"{row.rmse:.4f}"
        psnr = "—" if row.psnr is None else f"{row.psnr:.2f}"
        fid = "—" if row.fid is None else f"{row.fid:.2f}"
        lines.append(f"{row.name:44} {row.network_calls:>5} {rmse:>8} {psnr:>10} {fid:>8}")
    lines.append(fid_note)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# FID, when the detector is on disk.


def _find_detector(options: DemoOptions) -> tuple[inception.Detector | None, str]:
    """The detector, or None and the reason; the demo installs nothing, so it never downloads one."""
    path = options.detector or str(hub.checkpoints_dir() / inception.DETECTOR_FILENAME)
    if not fileio.exists(path):
        return None, (f"FID: not measured — no Inception detector at {path}. Copy {inception.DETECTOR_URL} there "
                      f"(or pass --detector) to add FID against the data set.")
    return inception.load_detector(path, dist.device()), f"FID: {options.fid_images} samples against {options.fid_images} data images."


def _reference_statistics(detector: inception.Detector, options: DemoOptions, run_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """Inception statistics of the first `fid_images` data images, cached in the run folder (every rank)."""
    path = fileio.join(run_dir, f"fid-ref-shapes-{options.fid_images}.npz")
    if not fileio.exists(path):
        data = make_shapes(dataclasses.replace(options.data, num_images=options.fid_images))
        stats = evaluation.reference_statistics(data.images.permute(0, 2, 3, 1).numpy(), detector, _FID_BATCH)
        if dist.rank() == 0:
            save_reference(path, *stats.fid)
        dist.barrier()
    return load_reference(path)


# ----------------------------------------------------------------------------------------------------------
# The demo.


def run_demo(config: DistillConfig, options: DemoOptions = DemoOptions()) -> list[Row]:
    """Distil as `config` says, compare teacher and student before/after; write demo.png and results.json.

    Works under plain python, torchrun or mpirun: every rank trains, rank 0 evaluates and writes.
    """
    dist.init()
    device = dist.device()
    objective, student = build(config, device)
    teacher = objective.teacher
    if teacher.label_dim:
        raise OptionError("the demo compares unconditional samples; the teacher is class-conditional "
                         f"(label_dim = {teacher.label_dim})")
    pid = config.pid
    heun = HeunSampler(sigma_min=pid.sigma_min, sigma_max=pid.sigma_max)
    one_step = OneStepSampler()
    latents, _ = seeded_inputs(teacher, range(options.eval_seed, options.eval_seed + options.eval_images), device)
    is_main = dist.rank() == 0

    # Before: the teacher's reference trajectories and the initialised student (kept for FID).
    initial = copy.deepcopy(student).eval()
    if is_main:
        dist.print0(f"Teacher: Heun, {heun.num_network_calls} network calls, on {options.eval_images} latents ...")
        reference = heun(teacher, latents).clamp(-1, 1)
        before = one_step(initial, latents)

    # Distil: every rank trains.
    preview = sampler_preview(one_step, student, config.run.image_count, config.train.seed, device)
    training_loop(config, objective, student, preview, fingerprints(objective))

    # After: the newest checkpoint's weights, as pid-sample would load them; every rank shares the FIDs.
    _, path = checkpoint.latest_training_state(config.run.dir)
    distilled = checkpoint.load_network(path, ema_rate=options.ema_rate, device=device)
    fids, fid_note = _fids(config, options, [(teacher, heun), (initial, one_step), (distilled, one_step)])
    rows: list[Row] = []
    if is_main:
        after = one_step(distilled, latents)
        weights = "raw weights" if options.ema_rate is None else f"EMA {options.ema_rate}"
        rows = [
            Row("teacher, Heun", heun.num_network_calls, None, None, fids[0]),
            Row("student initialised from teacher", one_step.num_network_calls, *agreement(before, reference),
                fids[1]),
            Row(f"student distilled ({config.train.steps} steps, {weights})", one_step.num_network_calls,
                *agreement(after, reference), fids[2]),
        ]
        zoo = _zoo_student(config, options, device)
        if zoo is not None:
            net, train = zoo
            rows.append(Row(f"model_zoo student ({train['steps']} steps of {train['batch']}, raw weights)",
                            one_step.num_network_calls, *agreement(one_step(net, latents), reference)))
        _write_outputs(config, options, rows, fid_note, [reference, before, after], heun.num_network_calls)
    dist.barrier()
    return rows


def _zoo_student(config: DistillConfig, options: DemoOptions, device: torch.device
                 ) -> tuple[nn.Module, dict] | None:
    """The model_zoo student and its `train` section, when its file is present and was distilled from the run's
    teacher file (the same file on disk); None otherwise."""
    path = options.zoo_student
    if path is None or not os.path.isfile(path):
        return None
    zoo_config = fileio.torch_load(path)["config"]
    teacher_path = zoo_config["teacher"]["path"]
    same_teacher = (os.path.isfile(teacher_path) and os.path.isfile(config.teacher.path)
                    and os.path.samefile(teacher_path, config.teacher.path))
    if not same_teacher:
        return None
    return checkpoint.load_network(path, device=device), zoo_config["train"]


def _fids(config: DistillConfig, options: DemoOptions, models: list[tuple[nn.Module, Sampler]]
          ) -> tuple[list[float | None], str]:
    """FID of each (network, sampler) against the data set, when a detector is on disk (on rank 0; None
    elsewhere and without a detector); and a note. Every rank takes its share of the images."""
    detector, note = _find_detector(options)
    if detector is None:
        return [None] * len(models), note
    dist.print0(f"FID over {options.fid_images} images each (teacher, student before, student after) ...")
    reference = _reference_statistics(detector, options, config.run.dir)
    seeds = range(options.eval_seed, options.eval_seed + options.fid_images)  # Image k: the latents' k.
    fids = []
    for net, sampler in models:
        scores = evaluation.evaluate(net, sampler, seeds, detector, reference, _FID_BATCH, inception_score=False)
        fids.append(None if scores is None else scores[0])
    return fids, note


def _write_outputs(config: DistillConfig, options: DemoOptions, rows: list[Row], fid_note: str,
                   images: list[torch.Tensor], heun_calls: int) -> None:
    """demo.png (three labelled rows from the same latents), demo-results.json, and the table on stdout."""
    reference, before, after = images
    png = fileio.join(config.run.dir, "demo.png")
    fileio.atomic_write_bytes(labelled_rows_png([
        (f"teacher: Heun, {heun_calls} network calls", reference),
        ("student before distillation: 1 call", before),
        (f"student after {config.train.steps} PID steps: 1 call", after),
    ], options.grid_columns, options.grid_scale), png)
    results = {"rows": [dataclasses.asdict(row) for row in rows], "fid_note": fid_note, "png": png,
               "eval_images": options.eval_images, "eval_seed": options.eval_seed}
    fileio.atomic_write_text(json.dumps(results, indent=2) + "\n", fileio.join(config.run.dir, "demo-results.json"))
    dist.print0("\n" + format_table(rows, fid_note))
    dist.print0(f"Teacher and student from the same latents: {png}")
