"""pid-plot: draw a run folder's plots from its files: training.png (loss, gradient norm and learning rate
against the step, from metrics.jsonl) and, once pid-fid has written fid.csv, fid.png (FID and Inception
Score against the step, the best seed range of each set of weights).

    pid-plot runs/pid-default
    pid-plot runs/pid-cifar10 --csv runs/pid-cifar10/fid.csv
"""

from __future__ import annotations

from collections.abc import Sequence

from pid_diffusion.training import plots
from pid_diffusion.utils import fileio
from pid_diffusion.cli import errors, options
from pid_diffusion.evaluation import ResultsTable


def main(argv: Sequence[str] | None = None) -> None:
    with errors.reported("pid-plot"):
        parser = options.parser("pid-plot", __doc__)
        parser.add_argument("run", help="run folder (with metrics.jsonl, and fid.csv after pid-fid)")
        parser.add_argument("--csv", help="pid-fid's results table (default <run>/fid.csv)")
        args = parser.parse_args(argv)
        metrics, csv = fileio.join(args.run, "metrics.jsonl"), args.csv or fileio.join(args.run, "fid.csv")
        if not (fileio.exists(metrics) or fileio.exists(csv)):
            parser.error(f"nothing to plot: {args.run} has neither metrics.jsonl nor fid.csv (train, or run pid-fid)")
        if fileio.exists(metrics):
            plots.plot_training(plots.read_metrics(metrics), fileio.join(args.run, plots.TRAINING_PLOT))
            print(f"wrote {fileio.join(args.run, plots.TRAINING_PLOT)}")
        if fileio.exists(csv):
            plots.plot_fid(ResultsTable(csv).best(), fileio.join(args.run, plots.FID_PLOT))
            print(f"wrote {fileio.join(args.run, plots.FID_PLOT)}")


if __name__ == "__main__":
    main()
