"""What 16-bit arithmetic does to PID's time derivative, and which recipes keep it (docs/precision.md).

Part 1, the derivative. At grid times t_i spread over the grid, for N points, every latent at t_i: dy/dt of the
student by the forward difference, the central difference and the JVP, each in fp32, bf16 and fp16 (CPU
autocast, the network's output cast to fp32 before differencing as PIDStudent does), against the same scheme
in float64; its error in Eq. 9's units t‖Δ(dy/dt)‖/‖D‖ beside the scheme's own truncation error (float64
difference against the float64 JVP); and each precision recipe (`pid.student_precision`, pid_diffusion/precision.py)
with the teacher's rounding. Models: the bundled teacher with the student initialised from it, and the CIFAR-10
DDPM++ release architecture (55.7 M parameters) with random weights.

Part 2, training. The `default` preset on the bundled teacher at equal steps for each recipe (fp32 forward; bf16
forward, accepted by name; bf16 JVP; bf16 with the student in fp32): the loss curve, and the agreement with
the teacher's Heun output (PSNR, as pid-demo measures it) at the end.

    python benchmarks/precision.py --write-docs          # docs/precision.md and docs/precision/*.png
    python benchmarks/precision.py --models bundled --num-points 10 --times 1 0.01 --latents 1 --train-steps 2

Without --write-docs everything goes to --out (precision.md, figures, precision.json). Runs resume: a model and N
measured in --out before, and a finished training run there, are read back (so the release architecture can be
measured alone first: `--models cifar10 --train-steps 0`). This machine's CPU has
no 16-bit units (fp16 is emulated, about 5 times slower than fp32), so the inputs are tiny; the release
architecture builds a full-size network: on a shared machine, run it alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pid_diffusion import precision  # noqa: E402
from pid_diffusion.config import Precision  # noqa: E402
from pid_diffusion.demo import agreement  # noqa: E402
from pid_diffusion.generate import seeded_inputs  # noqa: E402
from pid_diffusion.distill import DistillConfig, build, resolve  # noqa: E402
from pid_diffusion.grid import NUM_POINTS, KarrasGrid  # noqa: E402
from pid_diffusion.loss import Derivative, StudentPrecision  # noqa: E402
from pid_diffusion.samplers import HeunSampler, OneStepSampler  # noqa: E402
from pid_diffusion.student import PIDStudent  # noqa: E402
from pid_diffusion.teacher import load_teacher  # noqa: E402
from pid_diffusion.training.train import training_loop  # noqa: E402
from pid_diffusion.utils import fileio  # noqa: E402

from gpu_check import RECIPES, release_networks  # noqa: E402
from trends import _seconds_per_step, machine, write_page  # noqa: E402

BEGIN, END = "<!-- precision.py: generated, begin -->", "<!-- precision.py: generated, end -->"
MODELS = {"bundled": "the bundled teacher (model_zoo/edm-shapes-16x16.pt), student initialised from it",
          "cifar10": "CIFAR-10 DDPM++ (edm-cifar10-32x32-uncond-vp architecture, 55.7 M parameters), random weights"}
RELEASE = {"cifar10": "edm-cifar10-32x32-uncond-vp"}
SIXTEEN_BIT = (Precision.BF16, Precision.FP16)
# The issue's times: T's neighbourhood down to ε's (each rounded to the nearest interior grid point).
TIMES = (17.6, 2.47, 0.17, 0.011, 0.0024)
DEFAULT_TRAINING = dict(steps=200, batch=8, eval_images=32, eval_seed=1_000_000)


def recipes() -> list[precision.Recipe]:
    """Every precision × derivative with the student in that precision (16-bit differences by name), then the
    mixed recipes (16-bit teacher and distance, student in fp32)."""
    rounded = {True: StudentPrecision.TRAIN_ROUNDED_DIFFERENCE, False: StudentPrecision.TRAIN}
    plain = [precision.Recipe(p, d, rounded[p in SIXTEEN_BIT and d is not Derivative.JVP])
             for p in Precision for d in Derivative]
    mixed = [precision.Recipe(p, d, StudentPrecision.FP32) for p in SIXTEEN_BIT
             for d in (Derivative.FORWARD, Derivative.CENTRAL)]
    return plain + mixed


# The training comparison's recipes, by their keys in gpu_check.RECIPES.
TRAINING_RECIPES = ("fp32-forward", "bf16-forward-rounded", "bf16-jvp", "bf16-forward-student-fp32")


# ----------------------------------------------------------------------------------------------------------
# Part 1: the derivative's error.


def grid_indices(grid: KarrasGrid, times: Sequence[float]) -> list[int]:
    """The interior grid index nearest (in log t) to each time, each once, in grid order."""
    log_sigmas = grid.sigmas[1:-1].log()
    nearest = {1 + int((log_sigmas - math.log(t)).abs().argmin()) for t in times}
    return sorted(nearest)


def networks(model: str) -> tuple[torch.nn.Module, PIDStudent]:
    if model == "bundled":
        config = resolve("default")
        teacher = load_teacher(config.teacher.path)
        student = PIDStudent.from_teacher(teacher, config.pid.sigma_min, config.pid.sigma_max)
        return teacher, student.eval()
    teacher, student = release_networks(RELEASE[model], torch.device("cpu"))
    return teacher, student.eval()


def cached_derivatives(model: str, num_points: int, times: Sequence[float], latents: int,
                       chosen: Sequence[precision.Recipe], out: Path, log) -> tuple[list[dict], float]:
    """`measure_derivatives`' rows and seconds, read back from <out>/derivatives/ when measured there before with
    the same times and latents (the release architecture can then be measured alone, under a lock)."""
    path = out / "derivatives" / f"{model}-n{num_points}.json"
    key = {"times": list(times), "latents": latents, "recipes": [r.name for r in chosen]}
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored["key"] == key:
            log(f"{model} N={num_points}: read back from {path}")
            return stored["rows"], stored["seconds"]
    started = time.perf_counter()
    rows = measure_derivatives(model, num_points, times, latents, chosen, log)
    seconds = time.perf_counter() - started
    fileio.atomic_write_text(json.dumps({"key": key, "rows": rows, "seconds": seconds}, indent=1) + "\n", str(path))
    return rows, seconds


def measure_derivatives(model: str, num_points: int, times: Sequence[float], latents: int,
                        chosen: Sequence[precision.Recipe], log) -> list[dict]:
    """One row per (grid index, recipe): the recipe's `precision.Errors` at that t_i."""
    teacher, student = networks(model)
    pid = resolve("default").pid
    grid = KarrasGrid(num_points, pid.rho, pid.sigma_min, pid.sigma_max)
    shape = (student.img_channels, student.img_resolution, student.img_resolution)
    z = torch.randn((latents, *shape), generator=torch.Generator().manual_seed(0)) * grid.sigma_max
    rows = []
    for index in grid_indices(grid, times):
        started = time.perf_counter()
        ref = precision.reference(student, teacher, z, index, grid)
        for recipe in chosen:
            errors = precision.errors(student, teacher, z, index, grid, recipe, ref)
            rows.append({"model": model, "num_points": num_points, "index": index, "t": ref.t,
                         "recipe": recipe.name, "precision": recipe.precision.value,
                         "scheme": recipe.derivative.value, "student_precision": recipe.student_precision.value,
                         **dataclasses.asdict(errors)})
        log(f"{model} N={num_points} t_{index}={ref.t:.4g}: {time.perf_counter() - started:.0f} s")
    return rows


def _value(rows: list[dict], model: str, n: int, index: int, name: str, key: str) -> float | None:
    found = [r[key] for r in rows if (r["model"], r["num_points"], r["index"], r["recipe"]) == (model, n, index, name)]
    return found[0] if found else None


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.2g}"


def derivative_table(rows: list[dict], model: str, n: int) -> str:
    """Relative error of dy/dt (rounding) and its Eq. 9 term, per t_i, for every precision and scheme."""
    schemes = [d for d in Derivative]
    columns = [(p, d) for d in schemes for p in Precision]
    names = {(p, d): precision.Recipe(p, d, StudentPrecision.TRAIN_ROUNDED_DIFFERENCE
                                      if p in SIXTEEN_BIT and d is not Derivative.JVP else StudentPrecision.TRAIN).name
             for p, d in columns}
    indices = sorted({r["index"] for r in rows if (r["model"], r["num_points"]) == (model, n)})
    head = (["i", "t_i"] + [f"{d.value} {p.value}" for p, d in columns]
            + [f"Eq. 9 term {d.value} {p.value}" for p in SIXTEEN_BIT for d in schemes]
            + [f"truncation {d.value}" for d in schemes if d is not Derivative.JVP])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for index in indices:
        t = next(r["t"] for r in rows if (r["model"], r["num_points"], r["index"]) == (model, n, index))
        cells = [str(index), f"{t:.3g}"]
        cells += [_cell(_value(rows, model, n, index, names[c], "derivative")) for c in columns]
        cells += [_cell(_value(rows, model, n, index, names[(p, d)], "term")) for p in SIXTEEN_BIT for d in schemes]
        cells += [_cell(_value(rows, model, n, index, names[(Precision.FP32, d)], "truncation"))
                  for d in schemes if d is not Derivative.JVP]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def recipe_table(rows: list[dict], model: str, n: int) -> str:
    """Each recipe's largest errors over the measured t_i."""
    mine = [r for r in rows if (r["model"], r["num_points"]) == (model, n)]
    head = ["recipe (train.precision, pid.derivative, student)", "rel. error of dy/dt", "Eq. 9 term t‖Δ(dy/dt)‖/‖D‖",
            "Eq. 9 student side (y and t·dy/dt)", "teacher ‖ΔD‖/‖D‖", "truncation (the scheme's own)", "check_recipe"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for recipe in dict.fromkeys(r["recipe"] for r in mine):
        of = [r for r in mine if r["recipe"] == recipe]
        first = of[0]
        try:
            precision.check_recipe(Precision(first["precision"]), Derivative(first["scheme"]),
                                   StudentPrecision(first["student_precision"]))
            verdict = "accepted" if first["student_precision"] != StudentPrecision.TRAIN_ROUNDED_DIFFERENCE.value \
                else "accepted by name only"
        except ValueError:
            verdict = "refused"
        cells = [recipe] + [_cell(max(r[key] for r in of)) for key in ("derivative", "term", "target", "teacher",
                                                                        "truncation")] + [verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def derivative_figure(rows: list[dict], model: str, n: int, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    mine = [r for r in rows if (r["model"], r["num_points"]) == (model, n)
            and r["student_precision"] != StudentPrecision.FP32.value]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {Derivative.FORWARD.value: "-", Derivative.CENTRAL.value: "--", Derivative.JVP.value: ":"}
    colours = {Precision.FP32.value: "tab:blue", Precision.BF16.value: "tab:red", Precision.FP16.value: "tab:orange"}
    for recipe in dict.fromkeys(r["recipe"] for r in mine):
        of = sorted((r for r in mine if r["recipe"] == recipe), key=lambda r: r["t"])
        style = dict(linestyle=styles[of[0]["scheme"]], color=colours[of[0]["precision"]], marker="o", markersize=3)
        label = f"{of[0]['scheme']} {of[0]['precision']}"
        left.plot([r["t"] for r in of], [r["derivative"] for r in of], label=label, **style)
        right.plot([r["t"] for r in of], [r["term"] for r in of], label=label, **style)
    for scheme in (Derivative.FORWARD.value, Derivative.CENTRAL.value):
        of = sorted((r for r in mine if r["recipe"] == f"fp32 {scheme}"), key=lambda r: r["t"])
        right.plot([r["t"] for r in of], [r["truncation"] for r in of], color="black", linestyle=styles[scheme],
                   label=f"truncation {scheme} (float64)")
    left.set(xscale="log", yscale="log", xlabel="t_i", title="relative error of dy/dt against float64")
    right.set(xscale="log", yscale="log", xlabel="t_i", title="Eq. 9 term t·‖Δ(dy/dt)‖ / ‖D‖")
    for axis in (left, right):
        axis.invert_xaxis()
        axis.grid(alpha=0.3)
    right.legend(fontsize=7)
    figure.suptitle(f"{model}, N = {n}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# ----------------------------------------------------------------------------------------------------------
# Part 2: training at equal steps.


def training_config(recipe: precision.Recipe, steps: int, batch: int, num_points: int | None, out: Path
                    ) -> DistillConfig:
    name = recipe.name.replace(" ", "_").replace(",", "")
    grid = {} if num_points is None else {"pid.num_points": str(num_points)}
    return resolve("default", {**grid,
        "run.dir": str(out / "runs" / name), "run.checkpoint_every": str(steps), "run.log_every": "1",
        "run.image_every": "0", "run.snapshot_every": "0", "run.sync_check_every": "0",
        "train.steps": str(steps), "train.batch": str(batch), "train.precision": recipe.precision.value,
        "pid.derivative": recipe.derivative.value, "pid.student_precision": recipe.student_precision.value})


def train_recipes(names: Sequence[str], steps: int, batch: int, num_points: int | None, eval_images: int,
                  eval_seed: int, out: Path, log) -> list[dict]:
    """Distil the bundled teacher with each training recipe; the loss curve and the final agreement."""
    base = resolve("default")
    teacher = load_teacher(base.teacher.path)
    latents, _ = seeded_inputs(teacher, range(eval_seed, eval_seed + eval_images), "cpu")  # as pid-demo's
    with torch.no_grad():
        reference = HeunSampler(sigma_min=base.pid.sigma_min, sigma_max=base.pid.sigma_max)(teacher, latents).clamp(-1, 1)
    results = []
    for recipe in (RECIPES[name] for name in names):
        config = training_config(recipe, steps, batch, num_points, out)
        objective, student = build(config, torch.device("cpu"))
        training_loop(config, objective, student)  # Resumes: a finished run only loads its last state.
        seconds = _seconds_per_step(config.run.dir) * steps
        with torch.no_grad():
            rmse, psnr = agreement(OneStepSampler()(student.eval(), latents), reference)
        records = [json.loads(line) for line in fileio.read_bytes(fileio.join(config.run.dir, "metrics.jsonl"))
                   .decode().splitlines() if line]
        results.append({"recipe": recipe.name, "rmse": rmse, "psnr": psnr, "s_per_step": seconds / steps,
                        "loss": [(r["step"], r["loss"]) for r in records]})
        log(f"train {recipe.name}: PSNR {psnr:.2f} dB after {steps} steps, {seconds / steps:.2f} s/step")
    return results


def training_table(results: list[dict]) -> str:
    lines = ["| recipe | PSNR to teacher (dB) | RMSE | final loss (mean of last 10 steps) | s / step |",
             "|---|---|---|---|---|"]
    for r in results:
        tail = [loss for _, loss in r["loss"][-10:]]
        lines.append(f"| {r['recipe']} | {r['psnr']:.2f} | {r['rmse']:.4f} | {sum(tail) / len(tail):.4g} | "
                     f"{r['s_per_step']:.2f} |")
    return "\n".join(lines)


def training_figure(results: list[dict], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for r in results:
        axis.plot([s for s, _ in r["loss"]], [loss for _, loss in r["loss"]], label=f"{r['recipe']} ({r['psnr']:.1f} dB)",
                  linewidth=1)
    axis.set(yscale="log", xlabel="step", ylabel="loss (Eq. 9, L2)", title="bundled teacher, equal steps")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# ----------------------------------------------------------------------------------------------------------
# The page.


def generated_section(rows: list[dict], training: list[dict], args: argparse.Namespace, command: str,
                      figures: dict[str, Path], page: Path, seconds: float) -> str:
    parts = [BEGIN, f"Command: `{command}`  ",
             f"Machine: {machine()}; {datetime.date.today().isoformat()}; {seconds / 60:.0f} min in all. CPU autocast "
             f"(this CPU has no bf16/fp16 units: the arithmetic is rounded as on a GPU, only slower).  ",
             f"Latents: {args.latents} for the bundled teacher, {args.release_latents} for the release architecture "
             f"(its precisions: {', '.join(args.release_precisions)}), all at the same t_i, from seed 0; errors are "
             f"ratios of norms over them; — where not measured.", ""]
    for model in args.models:
        for n in grid_sizes(args, model):
            if not any((r["model"], r["num_points"]) == (model, n) for r in rows):
                continue
            parts += [f"#### {MODELS[model]}, N = {n}", "",
                      "Relative error of dy/dt against the same scheme in float64 (the rounding); its Eq. 9 term "
                      "t‖Δ(dy/dt)‖/‖D‖; the scheme's truncation error in the same units:", "",
                      derivative_table(rows, model, n), "", "Each recipe's largest error over these t_i:", "",
                      recipe_table(rows, model, n), "",
                      f"![{model}, N = {n}]({os.path.relpath(figures[f'{model}-n{n}'], page.parent)})", ""]
    if training:
        n = args.train_num_points or resolve("default").pid.num_points
        parts += [f"#### Training at equal steps: bundled teacher, `default` preset, N = {n}, {args.train_steps} "
                  f"steps of {args.train_batch}", "",
                  f"Agreement of the raw weights with the teacher's Heun output (35 calls) on {args.eval_images} "
                  f"held-out latents (seeds {DEFAULT_TRAINING['eval_seed']}…), images in [0, 1], as pid-demo "
                  f"measures it; s / step on this CPU (16-bit emulated: slower here, not on a GPU).", "",
                  training_table(training), "",
                  f"![loss curves]({os.path.relpath(figures['training'], page.parent)})", ""]
    parts.append(END)
    return "\n".join(parts)


def grid_sizes(args: argparse.Namespace, model: str) -> list[int]:
    return args.num_points if model == "bundled" else args.release_num_points


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--num-points", nargs="+", type=int, default=[40, NUM_POINTS], help="grid sizes N")
    parser.add_argument("--times", nargs="+", type=float, default=list(TIMES),
                        help="grid times to measure at (each the nearest interior grid point)")
    parser.add_argument("--latents", type=int, default=4, help="latents of the bundled teacher")
    parser.add_argument("--release-latents", type=int, default=1, help="latents of the release architecture")
    parser.add_argument("--release-num-points", nargs="+", type=int,
                        help="grid sizes N of the release architecture (default: --num-points)")
    parser.add_argument("--release-times", nargs="+", type=float, help="its grid times (default: --times)")
    parser.add_argument("--release-precisions", nargs="+", choices=[p.value for p in Precision],
                        default=[p.value for p in Precision],
                        help="its precisions (this CPU emulates fp16, slowly for a full-size network)")
    parser.add_argument("--train-steps", type=int, default=DEFAULT_TRAINING["steps"],
                        help="steps of the training comparison (0: none)")
    parser.add_argument("--train-batch", type=int, default=DEFAULT_TRAINING["batch"])
    parser.add_argument("--train-recipes", nargs="+", choices=list(RECIPES), default=list(TRAINING_RECIPES),
                        help="recipes of the training comparison (default: %(default)s)")
    parser.add_argument("--train-num-points", type=int, help="N of the training comparison (default: the preset's)")
    parser.add_argument("--eval-images", type=int, default=DEFAULT_TRAINING["eval_images"])
    parser.add_argument("--out", type=Path, default=Path("runs/precision"),
                        help="results, runs and (without --write-docs) the page and figures")
    parser.add_argument("--write-docs", action="store_true",
                        help="write docs/precision.md (its generated part) and docs/precision/*.png")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    args = parser.parse_args(argv)
    if min(args.latents, args.release_latents, args.train_batch, args.eval_images) < 1 or args.train_steps < 0:
        parser.error("--latents, --release-latents, --train-batch and --eval-images must be ≥ 1, --train-steps ≥ 0")
    args.release_num_points = args.release_num_points or args.num_points
    args.release_times = args.release_times or args.times
    if min(args.num_points + args.release_num_points) < 3:
        parser.error("--num-points: the central difference needs N ≥ 3")
    if min(args.times + args.release_times) <= 0:
        parser.error("--times must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = shlex.join(["python", "benchmarks/precision.py", *(sys.argv[1:] if argv is None else argv)])
    page = REPO / "docs" / "precision.md" if args.write_docs else args.out / "precision.md"
    folder = page.parent / "precision"
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def log(line: str) -> None:
        print(f"{line} ({(time.perf_counter() - started) / 60:.1f} min)", flush=True)

    rows, figures, seconds = [], {}, 0.0
    for model in args.models:
        for n in grid_sizes(args, model):
            bundled = model == "bundled"
            chosen = [r for r in recipes() if bundled or r.precision.value in args.release_precisions]
            measured, took = cached_derivatives(model, n, args.times if bundled else args.release_times,
                                                args.latents if bundled else args.release_latents, chosen,
                                                args.out, log)
            rows, seconds = rows + measured, seconds + took
            figures[f"{model}-n{n}"] = derivative_figure(rows, model, n, folder / f"{model}-n{n}.png")
    training = train_recipes(args.train_recipes, args.train_steps, args.train_batch, args.train_num_points, args.eval_images, DEFAULT_TRAINING["eval_seed"],
                             args.out, log) if args.train_steps else []
    if training:
        figures["training"] = training_figure(training, folder / "training.png")
    fileio.atomic_write_text(json.dumps({"derivatives": rows, "training": training}, indent=1) + "\n",
                             str(args.out / "precision.json"))
    seconds += sum(r["s_per_step"] for r in training) * args.train_steps
    write_page(page, generated_section(rows, training, args, command, figures, page, seconds),
               title="# Reduced precision and PID's derivative")
    for model in args.models:
        for n in grid_sizes(args, model):
            print(f"\n{model}, N = {n}\n" + recipe_table(rows, model, n))
    if training:
        print("\n" + training_table(training))
    print(f"Wrote {page}, {folder}/ and {args.out / 'precision.json'}")


if __name__ == "__main__":
    main()
