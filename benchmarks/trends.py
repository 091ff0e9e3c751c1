"""PID's published trends (docs/method.md), checked on the bundled teacher: one setting changed at a time.

Every setting distils `model_zoo/edm-shapes-16x16.pt` from the `default` preset with the same step budget,
batch and learning rate, for each seed, and measures the student's agreement with the teacher's Heun output
on fixed held-out latents (RMSE and PSNR of images in [0, 1], `pid_diffusion.demo.agreement`) at every
checkpoint along the way. Settings:

- N ∈ {10, 20, 40, 80, 160, 250} grid points, with the forward (first-order) and the central scheme;
- derivative: forward, central, JVP (at N = 40);
- initialisation: teacher, random;  stop-gradient on the neighbour: off, on;  residual form: Eq. 9, Eq. 8;
- distance: L2, L1, pseudo-Huber, and LPIPS when its weight files are in the torch hub cache (never
  downloaded here; the page says when they are absent);
- learning rate after warm-up: the preset's schedule against the other one (constant, the paper's, against
  a cosine decay to 0, `train.lr_decay`).

It writes `<out>/trends.json` (every measurement), the figures `psnr-vs-n.png` and `psnr-vs-steps.png`, and
a Markdown page with the table (mean ± spread over seeds), the figures and the command. On `--page`, the
generated part sits between two marker lines; text outside them (the reading of the claims) is kept.

The published page, docs/trends.md, is written only by the full default study (no budget option, no
--settings, no --quick) or when --page names it; every other run writes `<out>/trends.md` and its figures
under `<out>/trends/`. `--quick` checks the tool, not the claims (its page says so), and deletes each
setting's run folder once measured; the last line names what a run leaves on disk.

    python benchmarks/trends.py                       # the study of docs/trends.md (about 2 hours of one core)
    python benchmarks/trends.py --quick               # reduced: 1 seed, fewer steps, page in runs/trends-quick/
    python benchmarks/trends.py --settings baseline --seeds 1 --steps 2 --batch 2 --eval-images 2

Runs resume: a setting whose run folder already holds its last checkpoint is only re-evaluated.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from pid_diffusion.training import checkpoint
from pid_diffusion.utils import fileio, hub
from pid_diffusion.config import LRDecay, diff, from_dict
from pid_diffusion.demo import agreement
from pid_diffusion.generate import seeded_inputs
from pid_diffusion.distill import DistillConfig, build, resolve
from pid_diffusion.samplers import EulerSampler, HeunSampler, OneStepSampler
from pid_diffusion.teacher import load_teacher
from pid_diffusion.training.train import NonFiniteLossError, training_loop

BEGIN, END = "<!-- trends.py: generated, begin -->", "<!-- trends.py: generated, end -->"
PUBLISHED_PAGE = Path("docs/trends.md")  # Written by the full default study, or when --page names it.
GRID_SIZES = (10, 20, 40, 80, 160, 250)
BASELINE_N = 40  # The default preset's N; the other axes change one thing from it.
LPIPS_FILES = (hub.VGG16_IMAGENET, hub.PIQ_LPIPS_WEIGHTS)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One configuration of the study: a name, the axis it belongs to, and its overrides of the baseline."""

    name: str
    axis: str
    overrides: tuple[tuple[str, str], ...] = ()


def _n(derivative: str, n: int) -> Setting:
    name = "baseline" if (derivative, n) == ("forward", BASELINE_N) else f"{derivative} N={n}"
    return Setting(name, f"N ({derivative})", (("pid.derivative", derivative), ("pid.num_points", str(n))))


def _other_lr_decay() -> Setting:
    """The learning-rate setting: the schedule the `default` preset does not use (constant or cosine)."""
    other = LRDecay.COSINE if resolve("default").train.lr_decay is LRDecay.CONSTANT else LRDecay.CONSTANT
    return Setting(f"{other.value} lr", "learning rate", (("train.lr_decay", other.value),))


def all_settings(lpips: bool) -> list[Setting]:
    """The study's settings; the baseline (forward, N = 40, teacher init, Eq. 9, L2) appears once."""
    settings = [_n("forward", n) for n in GRID_SIZES] + [_n("central", n) for n in GRID_SIZES]
    settings += [
        Setting("jvp", "derivative", (("pid.derivative", "jvp"),)),
        Setting("random init", "initialisation", (("student.init", "random"),)),
        Setting("stop-grad on", "stop-gradient", (("pid.stop_neighbour_grad", "true"),)),
        Setting("Eq. 8 derivative form", "residual form", (("pid.form", "derivative"),)),
        Setting("L1", "distance", (("pid.metric", "l1"),)),
        Setting("pseudo-Huber", "distance", (("pid.metric", "pseudo_huber"),)),
        _other_lr_decay(),
    ]
    if lpips:
        settings.append(Setting("LPIPS", "distance", (("pid.metric", "lpips_piq"),)))
    return settings


# The rows of each axis in the table and the steps figure: setting names, the baseline among them.
AXES = {
    "derivative": ["baseline", "central N=40", "jvp"],
    "initialisation": ["baseline", "random init"],
    "stop-gradient": ["baseline", "stop-grad on"],
    "residual form": ["baseline", "Eq. 8 derivative form"],
    "distance": ["baseline", "L1", "pseudo-Huber", "LPIPS"],
    "learning rate": ["baseline", _other_lr_decay().name],
}
BASELINE_LABEL = {"derivative": "forward", "initialisation": "teacher init", "stop-gradient": "stop-grad off",
                  "residual form": "Eq. 9 denoiser form", "distance": "L2",
                  "learning rate": f"{resolve('default').train.lr_decay.value} lr"}


def lpips_available() -> bool:
    """Whether LPIPS' weight files are already in the hub cache (the study never downloads them)."""
    return all((hub.checkpoints_dir() / file.filename).is_file() for file in LPIPS_FILES)


@dataclasses.dataclass(frozen=True)
class Budget:
    """What every setting gets: the same steps, batch and learning rate."""

    steps: int
    batch: int
    lr: float | None  # None: the `default` preset's.
    checkpoint_every: int
    seeds: int
    eval_images: int
    eval_seed: int = 1_000_000  # The demo's held-out latents.


# 400 steps of 4 leave the ~14 dB plateau every setting sits on after 80 (docs/trends.md) at 20 dB, in about
# 2.5 min per run on one core.
FULL = Budget(steps=400, batch=4, lr=None, checkpoint_every=50, seeds=2, eval_images=32)
QUICK = Budget(steps=8, batch=2, lr=None, checkpoint_every=4, seeds=1, eval_images=8)


def config_of(setting: Setting, budget: Budget, seed: int, out: Path) -> DistillConfig:
    overrides = {
        "run.dir": str(out / "runs" / f"{setting.name.replace(' ', '_').replace('=', '').replace('.', '')}-s{seed}"),
        "run.checkpoint_every": str(budget.checkpoint_every), "run.keep_checkpoints": "0",
        "run.image_every": "0", "run.log_every": str(budget.checkpoint_every), "run.sync_check_every": "0",
        "train.steps": str(budget.steps), "train.batch": str(budget.batch),
        **({} if budget.lr is None else {"train.lr": str(budget.lr)}), "train.seed": str(seed),
        **dict(setting.overrides),
    }
    return resolve("default", overrides)


def measure(setting: Setting, budget: Budget, seed: int, out: Path, latents: torch.Tensor,
            reference: torch.Tensor) -> dict:
    """Distil one setting at one seed (or resume it), then the agreement of every checkpoint's raw weights."""
    config = config_of(setting, budget, seed, out)
    one_step = OneStepSampler()
    objective, student = build(config, torch.device("cpu"))
    with torch.no_grad():
        curve = [dict(zip(("step", "rmse", "psnr"), (0, *agreement(one_step(student.eval(), latents), reference))))]
    latest, diverged = checkpoint.latest_training_state(config.run.dir), None
    if latest is None or latest[0] < budget.steps:
        try:
            training_loop(config, objective, student)  # Resuming checks that the folder holds this configuration.
        except NonFiniteLossError as error:  # A setting that diverges at this budget is a result, not a crash.
            diverged = str(error).split(";")[0]
    elif (changed := diff(from_dict(DistillConfig, json.loads(fileio.read_bytes(
            fileio.join(config.run.dir, "config.json")))), config)):
        raise SystemExit(f"{config.run.dir} holds a run of another budget ({', '.join(changed)} differ): "
                         "pass another --out, or delete the folder")
    for step, path in checkpoint.find_training_states(config.run.dir):
        with torch.no_grad():
            rmse, psnr = agreement(one_step(checkpoint.load_network(path), latents), reference)
        curve.append({"step": step, "rmse": rmse, "psnr": psnr})
    return {"setting": setting.name, "axis": setting.axis, "seed": seed, "overrides": dict(setting.overrides),
            "s_per_step": None if diverged else _seconds_per_step(config.run.dir), "diverged": diverged,
            "curve": curve}


def _seconds_per_step(run_dir: str) -> float:
    """Mean training seconds per step, from the run's own log (so a resumed study reports its training)."""
    records = [json.loads(line) for line in fileio.read_bytes(fileio.join(run_dir, "metrics.jsonl")).decode().splitlines() if line]
    steps = [0] + [record["step"] for record in records]
    seconds = sum(record["s_per_step"] * (step - previous) for record, step, previous in zip(records, steps[1:], steps))
    return seconds / steps[-1]


def euler_ceiling(teacher: torch.nn.Module, latents: torch.Tensor, reference: torch.Tensor,
                  config: DistillConfig, sizes: Sequence[int]) -> dict[int, tuple[float, float]]:
    """(RMSE, PSNR) of the teacher's Euler solver on each N-point Karras grid against its Heun output: the
    zero-residual solution of the forward scheme, so the best a student trained on that grid can reach."""
    pid = config.pid
    ceiling = {}
    for n in sizes:
        euler = EulerSampler.on_grid(num_points=n, rho=pid.rho, sigma_min=pid.sigma_min, sigma_max=pid.sigma_max)
        with torch.no_grad():
            ceiling[n] = agreement(euler(teacher, latents).clamp(-1, 1), reference)
    return ceiling


# ----------------------------------------------------------------------------------------------------------
# Summaries, figures and the page.


def final(results: list[dict], name: str) -> list[tuple[float, float]]:
    """(RMSE, PSNR) at the last step of each seed of setting `name` that did not diverge."""
    return [(r["curve"][-1]["rmse"], r["curve"][-1]["psnr"]) for r in results
            if r["setting"] == name and not r.get("diverged")]


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half the range over seeds (0 for one seed)."""
    return statistics.fmean(values), (max(values) - min(values)) / 2


def _cell(values: Sequence[float], digits: int) -> str:
    mean, spread = mean_spread(values)
    return f"{mean:.{digits}f} ± {spread:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def table(results: list[dict]) -> str:
    names = list(dict.fromkeys(r["setting"] for r in results))
    axis_of = {r["setting"]: r["axis"] for r in results}
    lines = ["| setting | axis | PSNR (dB) | RMSE | seeds | s / step |", "|---|---|---|---|---|---|"]
    for name in names:
        pairs = final(results, name)
        runs = [r for r in results if r["setting"] == name]
        timed = [r["s_per_step"] for r in runs if r["s_per_step"] is not None]
        seconds = f"{statistics.fmean(timed):.2f}" if timed else "—"
        failed = len(runs) - len(pairs)
        note = f" ({failed} of {len(runs)} seeds diverged: non-finite loss)" if failed and pairs else ""
        psnr, rmse = ((_cell([p for _, p in pairs], 2) + note, _cell([e for e, _ in pairs], 4)) if pairs else
                      (f"diverged in all {len(runs)} seeds (non-finite loss)", "—"))
        lines.append(f"| {name} | {axis_of[name]} | {psnr} | {rmse} | {len(pairs)} | {seconds} |")
    return "\n".join(lines)


def _curve(results: list[dict], name: str) -> tuple[list[int], list[float], list[float]]:
    """Steps, mean PSNR and spread over seeds along the run of setting `name`."""
    runs = [r["curve"] for r in results if r["setting"] == name and not r.get("diverged")]
    steps = [point["step"] for point in runs[0]]
    stats = [mean_spread([run[i]["psnr"] for run in runs]) for i in range(len(steps))]
    return steps, [m for m, _ in stats], [s for _, s in stats]


def figures(results: list[dict], ceiling: dict[int, tuple[float, float]], folder: Path) -> tuple[Path, Path]:
    """PSNR against N (both schemes) and PSNR against steps (one panel per axis), as PNG files."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = {r["setting"] for r in results if not r.get("diverged")}
    folder.mkdir(parents=True, exist_ok=True)
    figure, ax = plt.subplots(figsize=(5.5, 3.8))
    for derivative in ("forward", "central"):
        points = [(n, final(results, _n(derivative, n).name)) for n in GRID_SIZES
                  if final(results, _n(derivative, n).name)]
        if points:
            stats = [mean_spread([p for _, p in pairs]) for _, pairs in points]
            ax.errorbar([n for n, _ in points], [m for m, _ in stats], yerr=[s for _, s in stats], marker="o",
                        capsize=3, label=f"{derivative} difference")
    ax.plot(list(ceiling), [psnr for _, psnr in ceiling.values()], "k--", label="teacher Euler on the grid (ceiling)")
    ax.set(xscale="log", xlabel="grid points N", ylabel="PSNR to the teacher (dB)", title="PSNR against N")
    ax.set_xticks(GRID_SIZES, [str(n) for n in GRID_SIZES])
    ax.grid(alpha=0.3)
    ax.legend()
    vs_n = folder / "psnr-vs-n.png"
    figure.tight_layout()
    figure.savefig(vs_n, dpi=110)
    plt.close(figure)

    panels = {"N (forward)": [_n("forward", n).name for n in GRID_SIZES],
              "N (central)": [_n("central", n).name for n in GRID_SIZES], **AXES}
    panels = {axis: [name for name in names if name in present] for axis, names in panels.items()}
    panels = {axis: names for axis, names in panels.items() if names}
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for ax, (axis, names) in zip(axes.flat, panels.items()):
        for name in names:
            steps, mean, spread = _curve(results, name)
            label = BASELINE_LABEL.get(axis, "forward N=40") if name == "baseline" else name
            line, = ax.plot(steps, mean, marker=".", label=label)
            ax.fill_between(steps, [m - s for m, s in zip(mean, spread)], [m + s for m, s in zip(mean, spread)],
                            color=line.get_color(), alpha=0.2)
        ax.set(title=axis, xlabel="step", ylabel="PSNR (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    vs_steps = folder / "psnr-vs-steps.png"
    figure.tight_layout()
    figure.savefig(vs_steps, dpi=110)
    plt.close(figure)
    return vs_n, vs_steps


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
              if line.startswith("model name")] if cpuinfo.is_file() else []
    return (f"{models[0] if models else platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible, "
            f"torch {torch.__version__} with {torch.get_num_threads()} thread(s), Python {platform.python_version()}")


def ceiling_table(ceiling: dict[int, tuple[float, float]]) -> str:
    lines = ["| N | " + " | ".join(str(n) for n in ceiling) + " |", "|---|" + "---|" * len(ceiling),
             "| PSNR (dB) of teacher Euler on the grid | " + " | ".join(f"{p:.2f}" for _, p in ceiling.values()) + " |"]
    return "\n".join(lines)


def _schedule(budget: Budget) -> str:
    """The baseline's optimizer and learning-rate schedule, in words."""
    train = config_of(Setting("baseline", "N (forward)"), budget, 0, Path(".")).train
    warmup = f", {train.warmup_steps} warm-up steps" if train.warmup_steps else ""
    decay = "constant" if train.lr_decay is LRDecay.CONSTANT else f"with {train.lr_decay.value} decay to 0"
    return f"{train.optimizer.value.replace('radam', 'RAdam').replace('adam', 'Adam')} lr {train.lr:g} {decay}{warmup}"


def quick_note(budget: Budget) -> str:
    """What a --quick page is for: it checks that the tool runs end to end; its numbers test no claim."""
    return (f"**`--quick`: this page checks the tool, not the claims.** {budget.steps} steps of {budget.batch} "
            f"latents leave every setting on the first plateau, so the table measures nothing about the trends; "
            f"the study's own budget is `python benchmarks/trends.py` (docs/trends.md). The run folders were "
            f"deleted once measured; trends.json and the figures remain.  ")


def generated_section(results: list[dict], ceiling: dict[int, tuple[float, float]], budget: Budget, command: str,
                      lpips: bool, figure_paths: Sequence[Path], page: Path, quick: bool = False) -> str:
    relative = [os.path.relpath(path, page.parent) for path in figure_paths]
    lpips_note = ("LPIPS: measured (its weight files are in the hub cache)." if lpips else
                  f"LPIPS: not measured — its weight files ({', '.join(f.filename for f in LPIPS_FILES)}) are not in "
                  f"the torch hub cache on the machine that ran this, and the study never downloads them.")
    core_minutes = sum(r["s_per_step"] or 0 for r in results) * budget.steps / 60
    return "\n".join([
        BEGIN,
        *([quick_note(budget)] if quick else []),
        f"Command: `{command}`  ",
        f"Machine: {machine()}; {datetime.date.today().isoformat()}; training {core_minutes:.0f} min in all.  ",
        f"Budget of every setting: {budget.steps} steps of {budget.batch} latents, {_schedule(budget)} "
        f"(the `default` preset otherwise: forward difference, N = {BASELINE_N}, teacher init, Eq. 9, L2), "
        f"{budget.seeds} seed(s); agreement of the raw weights with the teacher's Heun output (35 calls) on "
        f"{budget.eval_images} held-out latents (seeds {budget.eval_seed}…), images in [0, 1]; ± is half the "
        f"range over seeds; s / step is the measured training time per step (shared machine: compare ratios).  ",
        lpips_note,
        "",
        table(results),
        "",
        "The zero-residual solution of the forward scheme on N points is the teacher's Euler solver on that grid; "
        "its agreement with Heun bounds what a student trained on that grid can reach:",
        "",
        ceiling_table(ceiling),
        "",
        f"![PSNR against N]({relative[0]})",
        "",
        f"![PSNR against steps]({relative[1]})",
        END,
    ])


def write_page(page: Path, section: str, title: str = "# PID's trends on the bundled teacher") -> None:
    """Put `section` between the marker lines it starts and ends with, keeping the text around them in `page`
    (or start a new page under `title`)."""
    begin, end = section.splitlines()[0], section.splitlines()[-1]
    text = page.read_text(encoding="utf-8") if page.is_file() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = title + "\n\n" + section + "\n" + text
    fileio.atomic_write_text(text, str(page))


# ----------------------------------------------------------------------------------------------------------
# The study.


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Budget, list[Setting], bool]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the reduced study (1 seed, 8 steps of 2 latents)")
    parser.add_argument("--settings", nargs="+", help="only these settings, by name (default: all)")
    parser.add_argument("--steps", type=int, help="optimizer steps of every setting")
    parser.add_argument("--batch", type=int, help="latents per step")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: the `default` preset's)")
    parser.add_argument("--checkpoint-every", type=int, help="steps between the measured checkpoints")
    parser.add_argument("--seeds", type=int, help="seeds per setting (0, 1, ...)")
    parser.add_argument("--eval-images", type=int, help="held-out latents")
    parser.add_argument("--out", type=Path, help="runs and results (default: runs/trends or runs/trends-quick)")
    parser.add_argument("--page", type=Path, help=f"the Markdown page (default: {PUBLISHED_PAGE} for the full "
                        "default study, <out>/trends.md for any other run); figures go to <page folder>/trends/")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    budget = dataclasses.replace(base, **{key: value for key, value in (
        ("steps", args.steps), ("batch", args.batch), ("lr", args.lr), ("checkpoint_every", args.checkpoint_every),
        ("seeds", args.seeds), ("eval_images", args.eval_images)) if value is not None})
    if min(budget.steps, budget.batch, budget.checkpoint_every, budget.seeds, budget.eval_images) < 1 or (budget.lr is not None and budget.lr <= 0):
        parser.error(f"steps, batch, checkpoint-every, seeds and eval-images must be ≥ 1 and lr > 0, got {budget}")
    lpips = lpips_available()
    settings = all_settings(lpips)
    if args.settings:
        known = {s.name: s for s in settings}
        unknown = [name for name in args.settings if name not in known]
        if unknown:
            parser.error(f"unknown setting(s) {', '.join(map(repr, unknown))}; choose from "
                         f"{', '.join(map(repr, known))}" + ("" if lpips else " (LPIPS: weights not in the hub cache)"))
        settings = [known[name] for name in args.settings]
    args.out = args.out or Path("runs/trends-quick" if args.quick else "runs/trends")
    full_study = not (args.quick or args.settings) and budget == FULL
    args.page = args.page or (PUBLISHED_PAGE if full_study else args.out / "trends.md")
    return args, budget, settings, lpips


def main(argv: Sequence[str] | None = None) -> None:
    args, budget, settings, lpips = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = shlex.join(["python", "benchmarks/trends.py", *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()

    # The reference: the teacher's Heun output on the held-out latents, once.
    base = config_of(settings[0], budget, 0, args.out)
    teacher = load_teacher(base.teacher.path, base.teacher.preset)
    latents, _ = seeded_inputs(teacher, range(budget.eval_seed, budget.eval_seed + budget.eval_images), "cpu")
    with torch.no_grad():
        reference = HeunSampler(sigma_min=base.pid.sigma_min, sigma_max=base.pid.sigma_max)(teacher, latents).clamp(-1, 1)

    results, log = [], args.out / "progress.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    for index, setting in enumerate(settings):
        for seed in range(budget.seeds):
            result = measure(setting, budget, seed, args.out, latents, reference)
            results.append(result)
            if args.quick:  # Its measurements are in `result`; the checkpoints would fill the disk (1.2 GB).
                shutil.rmtree(config_of(setting, budget, seed, args.out).run.dir)
            outcome = (result["diverged"] if result["diverged"] else
                       f"PSNR {result['curve'][-1]['psnr']:.2f} dB after {result['curve'][-1]['step']} steps "
                       f"({result['s_per_step']:.2f} s/step)")
            line = (f"[{index + 1}/{len(settings)}] {setting.name} seed {seed}: {outcome}; "
                    f"{(time.perf_counter() - started) / 60:.1f} min so far")
            print(line, flush=True)
            with log.open("a", encoding="utf-8") as stream:
                stream.write(line + "\n")
    if args.quick and not any((args.out / "runs").iterdir()):
        (args.out / "runs").rmdir()  # Emptied setting by setting above (another run's folders are kept).
    sizes = sorted({config_of(s, budget, 0, args.out).pid.num_points for s in settings})
    ceiling = euler_ceiling(teacher, latents, reference, base, sizes)
    fileio.atomic_write_text(json.dumps({"budget": dataclasses.asdict(budget), "lpips": lpips, "results": results,
                                         "euler_ceiling": {str(n): value for n, value in ceiling.items()}},
                                        indent=1) + "\n", str(args.out / "trends.json"))

    figure_paths = figures(results, ceiling, args.page.parent / "trends")
    write_page(args.page, generated_section(results, ceiling, budget, command, lpips, figure_paths, args.page,
                                            quick=args.quick))
    print(table(results))
    print(f"Wrote {args.page}, {figure_paths[0]}, {figure_paths[1]} and {args.out / 'trends.json'}")
    left = sum(path.stat().st_size for path in args.out.rglob("*") if path.is_file())
    runs = "" if args.quick else f" (the run folders under {args.out / 'runs'}: delete them once the page is written)"
    print(f"Left on disk: {args.out}, {left / 2**20:.1f} MiB{runs}")


if __name__ == "__main__":
    main()
