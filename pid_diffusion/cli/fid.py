"""pid-fid: FID and Inception Score, as EDM computes them (and FD_DINOv2, as EDM2 does, with
--fd-dinov2), of a run folder, one snapshot or training state, a
teacher with its sampler, or a file of images, against reference statistics.

Images are generated, quantised to uint8 and passed to EDM's Inception detector batch by batch (no PNGs on
disk); FID is measured against an EDM reference file (`cifar10-32x32.npz`, or one made by pid-fid-ref). Every
(source, weights, seed range, sampler) gets one row of the CSV, rewritten atomically after each evaluation:
an interrupted run loses only the evaluation in flight, and running the same command again evaluates only
what is missing (new snapshots included). A file that cannot be loaded gets a row with the error, retried on
the next run. Several seed ranges give one row each; the summary and the plot of a run (FID and IS against
the step) use the best (lowest FID), as EDM reports the best of three.

    pid-fid --run runs/cifar10 --ref cifar10-32x32.npz --seeds 0-49999             # every snapshot: the curve
    pid-fid --checkpoint runs/cifar10/snapshot-00200000.pt --ema 0.9999 --ref cifar10-32x32.npz
    pid-fid --teacher edm-cifar10-32x32-uncond-vp.pkl --sampler heun --steps 18 --ref cifar10-32x32.npz
    pid-fid --teacher edm2-img512-s.pt --guide edm2-img512-xs.pt --guidance 2.1 --ref img512.pkl  # guided (EDM2)
    pid-fid --images samples.npz --ref cifar10-32x32.npz                             # EDM's `fid.py calc`
    pid-fid --checkpoint pid_cifar.pt --preset edm-cifar10-32x32-uncond-vp --ref cifar10-32x32.npz  # official PID
    pid-fid --run OPENAI_LOGDIR --preset edm-cifar10-32x32-uncond-vp --ref cifar10-32x32.npz     # an official run
    mpirun -np 8 pid-fid --run runs/cifar10 --ref cifar10-32x32.npz --seeds 0-49999 50000-99999 --batch 500
    pid-fid --run runs/img64 --ref img64.pkl --fd-dinov2                            # EDM2's reference, both metrics
    pid-fid --run runs/cifar10 --ref cifar10-32x32.npz --phema-std 0.03 0.05 0.08 0.12  # post-hoc EMA sweep

FD_DINOv2 needs EDM2's reference format (a .pkl from pid-fid-ref --fd-dinov2, or EDM2's dataset-refs) and the
DINOv2 ViT-L/14 weights in torch hub's cache (pid-fetch-weights). --phema-std reconstructs the averages of a run
trained with power-function EMAs (pid-phema) at the newest snapshot (or --phema-step), scores each, and plots
FID against the std (<run>/fid-phema.png).
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Sequence

from pid_diffusion import evaluation, official
from pid_diffusion.training import checkpoint, phema, plots, posthoc_ema
from pid_diffusion.utils import dist, fileio, preemption
from pid_diffusion.cli import errors, options
from pid_diffusion.cli.phema import relative_std
from pid_diffusion.dinov2 import load_dinov2
from pid_diffusion.image_sources import open_images
from pid_diffusion.reference_stats import load_stats
from pid_diffusion.inception import load_detector
from pid_diffusion.networks.edm import EDM_PRESETS

DEFAULT_SEEDS = "0-49999"  # EDM's 50,000 images.


def build_parser():
    parser = options.parser("pid-fid", __doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run folder: every snapshot (and training state of a step without one); or an "
                                      "official PID run folder (model<step>.pt, ema_<rate>_<step>.pt) with --preset")
    source.add_argument("--checkpoint", help="one snapshot or training state, or an official PID student file with "
                                             "--preset")
    source.add_argument("--teacher", help="a teacher (EDM .pkl, converted .pt, or a state dict with --preset)")
    source.add_argument("--images", help="images to score as they are: an .npz (pid-sample --npz), folder or zip")
    parser.add_argument("--ref", required=True, help="reference statistics: EDM's .npz (mu, sigma) or EDM2's .pkl "
                        "(fid and fd_dinov2 mu, sigma)")
    parser.add_argument("--seeds", nargs="+", type=options.seed_range,
                        help=f"seed ranges, each evaluated separately, e.g. 0-49999 50000-99999 (default {DEFAULT_SEEDS})")
    parser.add_argument("--ema", nargs="+", type=options.weights_name,
                        help=f"weights to evaluate: EMA rates and/or '{evaluation.NO_EMA}' (default: all)")
    parser.add_argument("--preset", help="EDM preset naming a plain state dict's architecture: a teacher's, or the "
                                         "official PID code's students (--checkpoint, --run)")
    options.add_guide_arguments(parser)
    parser.add_argument("--batch", type=int, default=250, help="images per rank and batch (default 250)")
    parser.add_argument("--detector", help="inception-2015-12-05.pt (default: the torch hub cache)")
    parser.add_argument("--fd-dinov2", action="store_true", help="also FD_DINOv2, as EDM2 measures it (needs EDM2's "
                        "reference format)")
    parser.add_argument("--dinov2", help="with --fd-dinov2: dinov2_vitl14_pretrain.pth (default: the torch hub cache)")
    parser.add_argument("--phema-std", nargs="+", type=relative_std, metavar="STD",
                        help="--run: reconstruct the post-hoc EMA at these relative stds (pid-phema) and score each")
    parser.add_argument("--phema-step", type=int, help="--phema-std: the snapshot step (default: the newest)")
    parser.add_argument("--csv", help="results table (default: fid.csv in the run folder, or beside the "
                                      "checkpoint or images; in the current folder for a teacher)")
    parser.add_argument("--plot", help=f"--run: PNG plot of FID and IS against step (default <run>/{plots.FID_PLOT})")
    options.add_sampler_arguments(parser)
    return parser


def _check(parser, args) -> None:
    """Options that do not apply to the source, and missing inputs: errors before anything is loaded."""
    if args.batch < 1:
        parser.error("--batch must be positive")
    if args.images and (args.seeds or args.sampler or args.steps or args.sampler_file):
        parser.error("--seeds, --sampler, --steps and --sampler-file generate images; --images scores the given ones")
    if args.ema and not (args.run or args.checkpoint):
        parser.error("--ema names weights of a snapshot or training state (--run or --checkpoint)")
    if args.preset and args.images:
        parser.error("--preset names the architecture of a plain state dict; --images are scored as they are")
    if args.plot and not args.run:
        parser.error("--plot draws FID against the step of a run (--run only)")
    if args.phema_std and (not args.run or args.ema):
        parser.error("--phema-std reconstructs averages of a run folder (--run), and scores those (not --ema)")
    if args.phema_step is not None and not args.phema_std:
        parser.error("--phema-step is the step of the --phema-std reconstruction")
    if args.dinov2 and not args.fd_dinov2:
        parser.error("--dinov2 names the weights of --fd-dinov2")
    options.check_guide_arguments(args)
    if args.run and not (checkpoint.find_weights(args.run) or official.run_files(args.run)):
        parser.error(f"no snapshot-<step>.pt or checkpoint-<step>.pt files (nor an official PID run's "
                     f"model<step>.pt, ema_<rate>_<step>.pt) in {args.run}")
    for name in ("checkpoint", "teacher", "guide", "images", "ref", "sampler_file", "dinov2"):
        path = getattr(args, name)
        if path and not fileio.exists(path):
            parser.error(f"--{name} {path}: no such file")


def _official(args) -> bool:
    """Whether --run or --checkpoint names the official PID code's files (told apart by content), which need
    --preset; this project's files record their architecture and take none."""
    if args.run:
        found = not checkpoint.find_weights(args.run)
        what = f"{args.run} is an official PID run folder"
    elif args.checkpoint:
        found = official.is_student_file(args.checkpoint)
        what = f"{args.checkpoint} is a student state dict of the official PID code"
    else:
        return False
    if found and not args.preset:
        raise errors.UserError(f"{what}, which does not record its architecture: name it with --preset, one of "
                     f"{', '.join(EDM_PRESETS)}")
    if found and args.checkpoint and args.ema:
        raise errors.UserError(f"{args.checkpoint} holds one network (the official code writes each EMA rate to its own "
                     "ema_<rate>_<step>.pt): drop --ema and pass that file")
    if not found and args.preset:
        raise errors.UserError(f"{args.run or args.checkpoint} is this project's, which records its own architecture: "
                     "drop --preset")
    return found


def _teacher_name(args) -> str:
    """The row name of --teacher: its file name, and its guide's and weight where guided (a row of its own)."""
    name = args.teacher.rsplit("/", 1)[-1]
    return name if args.guide is None else f"{name} guided by {args.guide.rsplit('/', 1)[-1]} w={args.guidance}"


def _default_csv(args) -> str:
    beside = args.run or (args.checkpoint or args.images or "").rpartition("/")[0]
    return fileio.join(beside, "fid.csv") if beside else "fid.csv"


def _reconstruct(run: str, stds: Sequence[float], step: int | None) -> str:
    """The post-hoc EMA file of `run` at `step` holding `stds` (pid-phema's), written by rank 0 where any is missing."""
    path = None
    if dist.rank() == 0:
        step, _ = posthoc_ema.snapshot_inputs(run, step)
        path = posthoc_ema.output_path(run, step)
        done = checkpoint.read_header(path)["ema"] if fileio.exists(path) else []
        missing = [std for std in stds if phema.std_name(std) not in done]
        if missing:
            posthoc_ema.reconstruct_run(run, missing, step=step, out=path)
    return dist.broadcast_object(path)


def main(argv: Sequence[str] | None = None) -> None:
    stop = preemption.StopAtOnce(preemption.STOP_SIGNALS, "pid-fid")  # Ctrl-C, a launcher's stop: status 75
    with dist.abort_on_error(), errors.reported("pid-fid"), stop:
        parser = build_parser()
        args = parser.parse_args(argv)
        _check(parser, args)
        is_official = _official(args)
        seed_ranges = dict(args.seeds or [options.seed_range(DEFAULT_SEEDS)])
        default_plot = plots.PHEMA_PLOT if args.phema_std else plots.FID_PLOT
        plot_path = args.plot or (fileio.join(args.run, default_plot) if args.run else None)
        draw = plots.plot_fid_against_std if args.phema_std else plots.plot_fid

        reference = load_stats(args.ref)  # Before any work: a reference without FD_DINOv2 fails now.
        if args.fd_dinov2 and reference.fd_dinov2 is None:
            raise errors.UserError(f"--ref {args.ref} holds no DINOv2 statistics (EDM's .npz has FID's only): use "
                                   "EDM2's reference format, e.g. from pid-fid-ref --fd-dinov2 --dest <name>.pkl")
        dist.init()
        # A teacher first: its mistakes (a guide of another family or space, w ≤ 0) end the command before the
        # detectors are read.
        teacher = options.load_guided_teacher(args, dist.device()) if args.teacher else None
        detector = load_detector(args.detector, dist.device())
        fd_dinov2 = (evaluation.FDDINOv2(load_dinov2(args.dinov2, dist.device()), reference.fd_dinov2)
                     if args.fd_dinov2 else None)
        table = evaluation.ResultsTable(args.csv or _default_csv(args))

        def report(result: evaluation.Result) -> None:
            if plot_path:
                draw(table.best(), plot_path)
            weights = f" ema {result.ema}" if result.ema else ""
            seeds = f" seeds {result.seeds}" if result.seeds else ""
            fd = f"  FD_DINOv2 {result.fd_dinov2:.4f}" if result.fd_dinov2 is not None else ""
            print(f"{result.checkpoint}{weights}{seeds} {result.sampler}: FID {result.fid:.4f}  "
                  f"IS {result.is_mean:.3f} ± {result.is_std:.3f}{fd}", flush=True)

        common = dict(batch_size=args.batch, on_result=report, fd_dinov2=fd_dinov2)
        generated = dict(weights=args.ema, sampler_for=functools.partial(options.sampler_from_args, args), **common)
        student_sampler = functools.partial(options.sampler_from_args, args, "PIDStudent")
        reference = reference.fid
        if args.phema_std:
            path = _reconstruct(args.run, args.phema_std, args.phema_step)
            generated["weights"] = [phema.std_name(std) for std in sorted(set(args.phema_std))]
            evaluation.evaluate_file(path, table, seed_ranges, detector, reference, args.ref, **generated)
        elif is_official and args.run:
            official.evaluate_run(args.run, args.preset, table, seed_ranges, detector, reference, args.ref,
                                  weights=args.ema, sampler=student_sampler(), **common)
        elif is_official:
            official.evaluate_file(args.checkpoint, args.preset, table, seed_ranges, detector, reference, args.ref,
                                   sampler=student_sampler(), **common)
        elif args.run:
            evaluation.evaluate_run(args.run, table, seed_ranges, detector, reference, args.ref, **generated)
        elif args.checkpoint:
            evaluation.evaluate_file(args.checkpoint, table, seed_ranges, detector, reference, args.ref, **generated)
        elif teacher is not None:
            sampler = options.sampler_from_args(args, type(teacher).__name__)
            evaluation.evaluate_network(_teacher_name(args), teacher, sampler, table, seed_ranges, detector,
                                        reference, args.ref, **common)
        else:
            evaluation.evaluate_images(args.images.rsplit("/", 1)[-1], open_images(args.images), table, detector,
                                       reference, args.ref, **common)
        if dist.rank() == 0 and args.run:  # EDM's best of several seed ranges: only where there are several.
            ranges = collections.Counter((r.checkpoint, r.ema, r.sampler) for r in table.results.values() if not r.error)
            for result in table.best():
                if ranges[result.checkpoint, result.ema, result.sampler] > 1:
                    print(f"best: {result.checkpoint} ema {result.ema}: FID {result.fid:.4f} (seeds {result.seeds}, "
                          f"of {ranges[result.checkpoint, result.ema, result.sampler]} ranges)")
        dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main()
