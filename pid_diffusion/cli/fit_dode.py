"""`pid-fit-dode`: distill a D-ODE solver (Kim et al., arXiv 2309.16421) for a frozen EDM teacher.

Fits one λ per step of the K-step Euler or Heun solver so that it follows the same solver with
C·(K − 1) + 1 steps on a batch of latents, and saves the sampler where `--out` says, by default in
runs/dode/ (`runs/dode/<teacher file name without extension>.dode-<solver>-<K>.pt`; never beside the teacher,
whose folder may be the repository's model_zoo/). The file records the solver, K, C, the σ
range, ρ, the seed and the fit's loss; `DODESampler.load(path)` reads it (pid-sample and pid-fid: `--sampler-file`).

    pid-fit-dode --teacher model_zoo/edm-shapes-16x16.pt --solver heun --steps 4 --multiplier 10 --num-samples 256
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence

import torch

from pid_diffusion.utils import dist
from pid_diffusion.cli import errors
from pid_diffusion.dode import Solver, fit_dode
from pid_diffusion.samplers import HeunSampler
from pid_diffusion.teacher import load_teacher


DEFAULT_FOLDER = "runs/dode"  # Derived files go with the runs (ignored by git), not beside the teacher.


def default_output(teacher: str, solver: Solver, num_steps: int) -> str:
    """`runs/dode/<teacher file name without extension>.dode-<solver>-<K>.pt`."""
    stem = os.path.splitext(teacher.rsplit("/", 1)[-1])[0]
    return f"{DEFAULT_FOLDER}/{stem}.dode-{solver.value}-{num_steps}.pt"


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer ≥ `minimum`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum {minimum}")
        return value
    return parse


def _parser() -> argparse.ArgumentParser:
    parser = errors.ArgumentParser(prog="pid-fit-dode", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True,
                        help="teacher: EDM .pkl, converted teacher .pt, or a state dict with --preset")
    parser.add_argument("--preset", help="EDM preset naming a plain state dict's architecture")
    parser.add_argument("--solver", choices=[solver.value for solver in Solver], required=True,
                        help="base solver")
    parser.add_argument("--steps", type=_int_at_least(2), required=True,
                        help="K: Karras steps of the D-ODE solver (as pid-sample --steps; Heun makes 2K − 1 calls)")
    parser.add_argument("--multiplier", type=_int_at_least(2), default=10,
                        help="C ≥ 2: the teacher solve takes C·(K − 1) + 1 steps (default 10)")
    parser.add_argument("--num-samples", type=_int_at_least(1), default=256,
                        help="B: latents in the fitting batch, solved together (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fitting batch (default 0)")
    parser.add_argument("--sigma-min", type=float, default=HeunSampler.sigma_min, help="ε (default: EDM's %(default)s)")
    parser.add_argument("--sigma-max", type=float, default=HeunSampler.sigma_max, help="T (default: EDM's %(default)s)")
    parser.add_argument("--rho", type=float, default=HeunSampler.rho, help="Karras ρ (default: EDM's %(default)s)")
    parser.add_argument("--out", help=f"sampler file to write (default: {DEFAULT_FOLDER}/<teacher name>.dode-<solver>-<K>.pt)")
    parser.add_argument("--device", type=torch.device, help="default: the first GPU, else the CPU")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments, fit, save, and print the fit."""
    with errors.reported("pid-fit-dode"):
        args = _parser().parse_args(argv)
        device = args.device or dist.device()
        solver = Solver(args.solver)
        out = args.out or default_output(args.teacher, solver, args.steps)
        net = load_teacher(args.teacher, preset=args.preset, device=device)
        start = time.perf_counter()
        sampler = fit_dode(net, solver, args.steps, multiplier=args.multiplier, num_samples=args.num_samples,
                           seed=args.seed, sigma_min=args.sigma_min, sigma_max=args.sigma_max, rho=args.rho,
                           device=device)
        seconds = time.perf_counter() - start
        sampler.save(out)
    fit = sampler.fit
    print(f"D-ODE {sampler.solver.value}, {sampler.num_steps} steps ({sampler.num_network_calls} network calls), "
          f"fitted to {args.multiplier * (args.steps - 1) + 1} steps on {fit.num_samples} samples in {seconds:.1f} s")
    print(f"MSE to the teacher solve: {fit.loss_base:.4g} (λ = 0) -> {fit.loss:.4g}")
    print("λ: " + " ".join(f"{lam:.4g}" for lam in sampler.lambdas))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
