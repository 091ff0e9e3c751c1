"""pid-phema: post-hoc EMA of a run folder (EDM2's `reconstruct_phema.py`): the average of any relative
standard deviation σ_rel at any snapshot step, reconstructed from the power-function EMAs the snapshots store
(a run trained with `--train.phema_stds=0.050,0.100`), by EDM2's least-squares solution.

The result is `<run>/phema-<step>.pt` (or `--out`), a snapshot whose `ema` entries are the reconstructions,
named `std-<σ_rel>`: sample it with `pid-sample --checkpoint <file> --ema std-0.080`, score it with
`pid-fid --checkpoint <file>`. `pid-fid --run <run> --phema-std ...` reconstructs and scores a sweep in one go.

    pid-phema runs/pid-cifar10 --std 0.03 0.08                  # at the newest snapshot
    pid-phema runs/pid-cifar10 --std 0.1 --step 200000 --out runs/pid-cifar10/phema-0.1.pt
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from pid_diffusion.training import phema, posthoc_ema
from pid_diffusion.cli import errors, options


def relative_std(text: str) -> float:
    """A σ_rel in (0, sqrt(1/12)): the range of power-function profiles with a positive exponent."""
    try:
        std = float(text)
    except ValueError:
        std = float("nan")
    if not 0 < std < phema.MAX_STD:
        raise argparse.ArgumentTypeError(f"{text!r} is not a relative standard deviation in (0, {phema.MAX_STD:.4f})")
    return std


def build_parser():
    parser = options.parser("pid-phema", __doc__)
    parser.add_argument("run", help="run folder whose snapshots hold power-function EMAs")
    parser.add_argument("--std", nargs="+", type=relative_std, required=True,
                        help="relative standard deviations to reconstruct, e.g. 0.03 0.08")
    parser.add_argument("--step", type=int, help="the snapshot step to reconstruct at (default: the newest)")
    parser.add_argument("--out", help="output file (default <run>/phema-<step>.pt); reconstructions of other "
                                      "stds at the same step already in it are kept")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    with errors.reported("pid-phema"):
        args = build_parser().parse_args(argv)
        path = posthoc_ema.reconstruct_run(args.run, args.std, step=args.step, out=args.out)
        names = ", ".join(phema.std_name(std) for std in sorted(set(args.std)))
        print(f"wrote {path} (ema {names})")


if __name__ == "__main__":
    main()
