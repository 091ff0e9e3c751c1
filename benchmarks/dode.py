"""Few-step baselines on one teacher: agreement with the many-step solution and time per image.

Rows: the teacher's Heun sampler (EDM's 18 steps, 35 calls by default), the plain and the D-ODE K-step Euler and
Heun solvers (λ's fitted here, the fit timed too), and optionally a PID student (`--student`, one call). Every
row solves the same held-out latents (`fit_batch(teacher, N, --eval-seed)`, a different generator from the
fitting batch's); the reference is EDM's Heun with `--reference-steps` steps. Images are compared as saved,
clamped to [−1, 1]: RMSE, and PSNR = 20 log10(2 / RMSE) for that peak-to-peak range of 2.

    python benchmarks/dode.py --teacher model_zoo/edm-shapes-16x16.pt --steps 3 4 6 --markdown table.md
    python benchmarks/dode.py --teacher ... --student runs/pid/checkpoint-00010000.pt --ema 0.999
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pid_diffusion.training import checkpoint
from pid_diffusion.utils import dist, fileio
from pid_diffusion.dode import DODESampler, Solver, fit_batch, fit_dode
from pid_diffusion.samplers import HeunSampler, OneStepSampler, Sampler
from pid_diffusion.teacher import load_teacher

DATA_RANGE = 2.0  # images live in [−1, 1]


@dataclass(frozen=True)
class Row:
    name: str
    network_calls: int
    rmse: float  # to the many-step solution, images clamped to [−1, 1]
    psnr_db: float
    ms_per_image: float  # sampling only, the batch solved at once
    fit_seconds: float | None = None  # D-ODE only: the distillation of its λ's

    def markdown(self) -> str:
        fit = "" if self.fit_seconds is None else f"{self.fit_seconds:.1f}"
        return (f"| {self.name} | {self.network_calls} | {self.rmse:.4f} | {self.psnr_db:.2f} | "
                f"{self.ms_per_image:.2f} | {fit} |")


HEADER = ("| sampler | network calls | RMSE to many-step | PSNR (dB) | ms / image | fit (s) |\n"
          "|---|---|---|---|---|---|")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> tuple[torch.Tensor, float]:
    """The output of `run` and its best wall time in seconds over `repeats` runs, after one warm-up run."""
    output = run()
    best = math.inf
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        output = run()
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return output, best


def measure(name: str, sampler: Sampler, net: torch.nn.Module, latents: torch.Tensor, labels: torch.Tensor | None,
            reference: torch.Tensor, repeats: int, fit_seconds: float | None = None) -> Row:
    images, seconds = timed(lambda: sampler(net, latents, labels).clamp(-1, 1), latents.device, repeats)
    rmse = (images - reference).square().mean().sqrt().item()
    return Row(name, sampler.num_network_calls, rmse, 20 * math.log10(DATA_RANGE / rmse),
               1000 * seconds / len(latents), fit_seconds)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="teacher file (as pid-sample --teacher)")
    parser.add_argument("--preset", help="EDM preset naming a plain state dict's architecture")
    parser.add_argument("--solvers", nargs="+", choices=[solver.value for solver in Solver],
                        default=[solver.value for solver in Solver],
                        help="base solvers of the D-ODE rows (default: euler heun)")
    parser.add_argument("--steps", nargs="+", type=int, default=[3, 4, 6], help="K of the D-ODE rows")
    parser.add_argument("--multiplier", type=int, default=10, help="C of the fits (default 10)")
    parser.add_argument("--fit-samples", type=int, default=64, help="fitting batch size B (default 64)")
    parser.add_argument("--fit-seed", type=int, default=0, help="seed of the fitting batch (default 0)")
    parser.add_argument("--eval-samples", type=int, default=64, help="held-out images (default 64)")
    parser.add_argument("--eval-seed", type=int, default=1, help="seed of the held-out latents (default 1)")
    parser.add_argument("--teacher-steps", type=int, default=HeunSampler.num_steps,
                        help="Heun steps of the teacher row (default EDM's 18: 35 calls)")
    parser.add_argument("--reference-steps", type=int, default=128,
                        help="Heun steps of the many-step solution (default 128)")
    parser.add_argument("--student", help="PID training checkpoint: adds the one-call student row")
    parser.add_argument("--ema", type=float, help="EMA rate of --student (default: its raw weights)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per row, best kept (default 2)")
    parser.add_argument("--markdown", help="also write the table to this file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.eval_seed == args.fit_seed:
        raise SystemExit("--eval-seed must differ from --fit-seed: the held-out latents would be the fitting batch")
    device = dist.device()
    net = load_teacher(args.teacher, preset=args.preset, device=device)
    latents, labels = fit_batch(net, args.eval_samples, args.eval_seed, device)
    with torch.no_grad():
        reference = HeunSampler(num_steps=args.reference_steps)(net, latents, labels).clamp(-1, 1)

    print(f"{args.teacher} on {device}: {args.eval_samples} held-out images, reference Heun with "
          f"{args.reference_steps} steps; fits on {args.fit_samples} samples\n{HEADER}", flush=True)
    rows = []

    def add(row: Row) -> None:
        rows.append(row)
        print(row.markdown(), flush=True)

    add(measure(f"teacher: Heun, {args.teacher_steps} steps", HeunSampler(num_steps=args.teacher_steps), net,
                latents, labels, reference, args.repeats))
    for solver in map(Solver, args.solvers):
        for num_steps in args.steps:
            add(measure(f"{solver.value}, {num_steps} steps", DODESampler.base(solver, num_steps), net, latents,
                        labels, reference, args.repeats))
            _synchronize(device)
            start = time.perf_counter()
            sampler = fit_dode(net, solver, num_steps, multiplier=args.multiplier, num_samples=args.fit_samples,
                               seed=args.fit_seed, device=device)
            _synchronize(device)
            add(measure(f"D-ODE {solver.value}, {num_steps} steps (C = {args.multiplier})", sampler, net, latents,
                        labels, reference, args.repeats, time.perf_counter() - start))
    if args.student:
        student = checkpoint.load_network(args.student, ema_rate=args.ema, device=device)
        add(measure("PID student", OneStepSampler(), student, latents, labels, reference, args.repeats))

    table = "\n".join([HEADER, *(row.markdown() for row in rows)])
    if args.markdown:
        fileio.atomic_write_text(table + "\n", args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
