"""pid-fid: FID and Inception Score of every checkpoint in a run folder, trained weights and each EMA.

Images are generated, quantised to uint8 and passed to EDM's Inception detector batch by batch (no PNGs on
disk); FID is measured against an EDM reference file (`cifar10-32x32.npz`, or one made by pid-fid-ref).
Every (checkpoint, weights, seed range) gets one row of the CSV, rewritten atomically after each
evaluation: an interrupted run loses only the evaluation in flight, and running the same command again
evaluates only what is missing (new checkpoints included). A checkpoint that cannot be loaded gets a row
with the error, retried on the next run. Several seed ranges give one row each; the summary and the plot
(FID and IS against the step) use the best (lowest FID), as EDM reports the best of three.

    pid-fid --run runs/cifar10 --ref cifar10-32x32.npz --seeds 0-49999
    mpirun -np 8 pid-fid --run runs/cifar10 --ref cifar10-32x32.npz --seeds 0-49999 50000-99999 --batch 500
"""

from __future__ import annotations

from collections.abc import Sequence

from pid_diffusion import checkpoint, dist, evaluation, fileio, plots
from pid_diffusion.cli import errors, options
from pid_diffusion.fid import load_reference
from pid_diffusion.inception import load_detector


def build_parser():
    parser = options.parser("pid-fid", __doc__)
    parser.add_argument("--run", required=True, help="folder of checkpoint-<step>.pt files")
    parser.add_argument("--ref", required=True, help="reference statistics (EDM npz with mu, sigma)")
    parser.add_argument("--seeds", nargs="+", type=options.seed_range, default=[options.seed_range("0-49999")],
                        help="seed ranges, each evaluated separately, e.g. 0-49999 50000-99999 (default 0-49999)")
    parser.add_argument("--ema", nargs="+", type=options.weights_name,
                        help=f"weights to evaluate: EMA rates and/or '{evaluation.TRAINED_WEIGHTS}' (default: all)")
    parser.add_argument("--batch", type=int, default=250, help="images per rank and batch (default 250)")
    parser.add_argument("--detector", help="inception-2015-12-05.pt (default: the torch hub cache)")
    parser.add_argument("--csv", help="results table (default <run>/fid.csv)")
    parser.add_argument("--plot", help=f"PNG plot of FID and IS against step (default <run>/{plots.FID_PLOT})")
    options.add_sampler_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    with dist.abort_on_error(), errors.reported("pid-fid"):
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.batch < 1:
            parser.error("--batch must be positive")
        if not checkpoint.find_checkpoints(args.run):
            parser.error(f"no checkpoint-<step>.pt files in {args.run}")
        plot_path = args.plot or fileio.join(args.run, plots.FID_PLOT)

        dist.init()
        detector = load_detector(args.detector, dist.device())
        table = evaluation.ResultsTable(args.csv or fileio.join(args.run, "fid.csv"))

        def report(result: evaluation.Result) -> None:
            plots.plot_fid(table.best(), plot_path)
            print(f"{result.checkpoint} ema {result.ema} seeds {result.seeds}: FID {result.fid:.4f}  "
                  f"IS {result.is_mean:.3f} ± {result.is_std:.3f}", flush=True)

        evaluation.evaluate_run(args.run, table, dict(args.seeds), detector, load_reference(args.ref), args.ref,
                                weights=args.ema, sampler_for=lambda net: options.sampler_from_args(args, net),
                                batch_size=args.batch, on_result=report)
        if dist.rank() == 0:
            for result in table.best():
                print(f"best: {result.checkpoint} ema {result.ema}: FID {result.fid:.4f} (seeds {result.seeds})")
        dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main()
