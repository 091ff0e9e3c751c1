"""One prepared check of every CUDA path on one GPU, in at most about 8 minutes; prints one table.

    python benchmarks/gpu_check.py                      # on a machine with one CUDA device
    python benchmarks/gpu_check.py --out benchmarks/GPU_CHECK.md

Rows: the CUDA-marked tests (`pytest -m cuda`); the synchronising CUDA calls per step of the training loop
itself, in fp32 and under fp16 loss scaling (`torch.cuda.set_sync_debug_mode`; more than one, the loss,
preemption and overflow read-back, fails); the user's
commands as they are typed, in subprocesses on the GPU: `pid-distill` (3 steps of the `cifar10` preset on a
random-weight teacher, LPIPS on stand-in weights, killed after its first training state and resumed),
`pid-sample` and `pid-fid` of the result (a stand-in detector), `pid-demo` with a few steps; one PID step (student forward, teacher, L2 residual,
backward, RAdam) of the CIFAR-10 DDPM++ and ImageNet ADM release architectures (random weights, full
size) in fp32, bf16 autocast and fp16 (the ADM teacher's own `use_fp16` image path, with loss scaling),
with channels_last and with torch.compile; the same for EDM2's img512-s guided by img512-xs (w 2.1, 4×64×64
latents, pseudo-Huber on latents) in bf16 and fp16 (EDM2's own `use_fp16` U-Net path); one PID step of each
precision recipe (pid_diffusion/precision.py,
docs/precision.md) with the relative error of its dy/dt against an fp32 pass on the same latents, at the grid
time nearest ε and at the middle of the grid; a one-rank NCCL process group (all-reduce and a DDP step);
one-step sampling; FID feature extraction (a stand-in TorchScript detector of the real one's signature,
as nothing is downloaded). Each row reports its status, the time of one step (median of a few after a
warm-up) and the peak GPU memory. A row that fails records its error and the others still run; rows
stop once the time budget is spent.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pid_diffusion import precision, samplers  # noqa: E402
from pid_diffusion.training import checkpoint  # noqa: E402
from pid_diffusion.guidance import GuidedDenoiser  # noqa: E402
from pid_diffusion.config import Precision  # noqa: E402
from pid_diffusion.fid import FEATURE_DIM, save_reference  # noqa: E402
from pid_diffusion.generate import generate  # noqa: E402
from pid_diffusion.grid import NUM_POINTS, RHO, SIGMA_MAX, SIGMA_MIN, KarrasGrid  # noqa: E402
from pid_diffusion.loss import Derivative, PIDObjective, StudentPrecision  # noqa: E402
from pid_diffusion.distances import Metric  # noqa: E402
from pid_diffusion.networks.edm import EDM_PRESETS, EDMPrecond  # noqa: E402
from pid_diffusion.networks.edm2 import EDM2_PRESETS, Precond  # noqa: E402
from pid_diffusion.student import PIDStudent  # noqa: E402
from pid_diffusion.teacher import TeacherFile, TeacherFormat  # noqa: E402
from pid_diffusion.training.train import loss_scaler  # noqa: E402

ARCHITECTURES = {"cifar10": "edm-cifar10-32x32-uncond-vp", "imagenet64": "edm-imagenet-64x64-cond-adm",
                 "edm2-img512-s": "edm2-img512-s"}
BATCH = {"cifar10": 32, "imagenet64": 8, "edm2-img512-s": 8}  # per step; small enough for any current GPU
VARIANTS = ["fp32", "bf16", "fp16", "fp32+channels_last", "fp32+compile"]
EDM2_VARIANTS = ["bf16", "fp16"]  # EDM2 trains in fp16; bf16 is the other half precision of today's GPUs
EDM2_GUIDE, EDM2_GUIDANCE = "edm2-img512-xs", 2.1  # edm2-img512-s-autog-fid's guide and weight
TIMED_STEPS = 3
RECIPES = {  # docs/precision.md: the recipes that keep the derivative, the fp32 baselines, and the named unsafe one
    "fp32-forward": precision.Recipe(Precision.FP32, Derivative.FORWARD),
    "fp32-jvp": precision.Recipe(Precision.FP32, Derivative.JVP),
    "bf16-forward-student-fp32": precision.Recipe(Precision.BF16, Derivative.FORWARD, StudentPrecision.FP32),
    "fp16-forward-student-fp32": precision.Recipe(Precision.FP16, Derivative.FORWARD, StudentPrecision.FP32),
    "bf16-jvp": precision.Recipe(Precision.BF16, Derivative.JVP),
    "fp16-jvp": precision.Recipe(Precision.FP16, Derivative.JVP),
    "bf16-forward-rounded": precision.Recipe(Precision.BF16, Derivative.FORWARD,
                                             StudentPrecision.TRAIN_ROUNDED_DIFFERENCE),
}
ERROR_LATENTS = 4  # Latents of the derivative's error (each at the same grid time).


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="CUDA device (default: cuda)")
    parser.add_argument("--budget-minutes", type=float, default=8.0, help="stop starting rows after this long")
    parser.add_argument("--skip-tests", action="store_true", help="leave out the CUDA-marked tests")
    parser.add_argument("--architectures", nargs="+", choices=list(ARCHITECTURES), default=list(ARCHITECTURES))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES),
                        help="precision recipes: a PID step each, and its dy/dt error against fp32")
    parser.add_argument("--out", help="also write the table (markdown) to this file")
    args = parser.parse_args(argv)
    if args.budget_minutes <= 0:
        parser.error("--budget-minutes must be positive")
    return args


def _timed(device: torch.device, step: Callable[[], None]) -> tuple[float, float]:
    """(median seconds of one step after a warm-up step, peak memory in MiB)."""
    torch.cuda.reset_peak_memory_stats(device)
    step()
    times = []
    for _ in range(TIMED_STEPS):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), torch.cuda.max_memory_allocated(device) / 2**20


def _random_denoiser(name: str, device: torch.device) -> torch.nn.Module:
    """A release architecture with random weights (seed 0, output layers not zero)."""
    torch.manual_seed(0)
    if name in EDM2_PRESETS:
        network = Precond(**{**EDM2_PRESETS[name], "dropout": 0.0})
        network.encoder = None  # random latents: nothing is decoded here
    else:
        network = EDMPrecond(**{**EDM_PRESETS[name], "dropout": 0.0})
    with torch.no_grad():
        for tensor in network.parameters():  # EDM and EDM2 zero-initialise output gains; make every layer matter
            if not tensor.any():
                tensor.normal_(0, 0.01) if tensor.ndim else tensor.fill_(0.5)
    return network.to(device).eval().requires_grad_(False)


def paper_grid() -> KarrasGrid:
    """PID's grid with the paper's N, ρ, ε and T (the students here use the paper's ε and T)."""
    return KarrasGrid(NUM_POINTS, RHO, SIGMA_MIN, SIGMA_MAX)


def release_networks(name: str, device: torch.device) -> tuple[torch.nn.Module, PIDStudent]:
    """A release architecture with random weights as the teacher (EDM2's img512-s guided by img512-xs) and its
    student."""
    teacher = _random_denoiser(name, device)
    student = PIDStudent.from_teacher(teacher, SIGMA_MIN, SIGMA_MAX, network_overrides={"dropout": 0.0}).to(device)
    if name in EDM2_PRESETS:
        teacher = GuidedDenoiser(teacher, _random_denoiser(EDM2_GUIDE, device), EDM2_GUIDANCE)
    return teacher, student


def _optimizer_step(objective: PIDObjective, student: PIDStudent, model: torch.nn.Module, batch: int,
                    autocast: contextlib.AbstractContextManager, scaler: torch.amp.GradScaler,
                    device: torch.device) -> Callable[[], None]:
    """One RAdam step of `objective` on `model` (the student or its compiled form), as pid-distill takes it: a
    batch from one generator on `device`, the loss in `autocast`, scaled by `scaler`."""
    optimizer = torch.optim.RAdam(student.parameters(), lr=1e-5)
    generator = torch.Generator(device).manual_seed(0)

    def step() -> None:
        data = objective.sample_batch(generator, batch)
        with autocast:
            loss = objective(model, data).mean()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return step


def pid_step(architecture: str, variant: str, device: torch.device) -> Callable[[], None]:
    """One optimizer step of PID on the release architecture, in the variant's precision and layout."""
    teacher, student = release_networks(ARCHITECTURES[architecture], device)
    precision = variant.split("+")[0]
    if "channels_last" in variant:
        teacher.to(memory_format=torch.channels_last)
        student.to(memory_format=torch.channels_last)
    if precision == "fp16" and not student.use_fp16:  # SongUNet has no fp16 flag of its own: autocast
        autocast = torch.autocast("cuda", dtype=torch.float16)
    elif precision == "bf16":
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext()
    if precision != "fp16":  # fp32 and bf16 leave ADM's and EDM2's own half-precision paths off
        for network in (student, *teacher.modules()):  # a guided teacher's main network and guide too
            if hasattr(network, "use_fp16"):
                network.use_fp16 = False
    model = torch.compile(student) if "compile" in variant else student
    grid = paper_grid()
    metric = Metric.PSEUDO_HUBER if architecture in EDM2_PRESETS else Metric.L2  # latents: no LPIPS
    objective = PIDObjective(teacher, grid, metric.build())
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    return _optimizer_step(objective, student, model, BATCH[architecture], autocast, scaler, device)


def recipe_step(teacher: EDMPrecond, student: PIDStudent, recipe: precision.Recipe, batch: int,
                device: torch.device) -> Callable[[], None]:
    """One optimizer step of PID (L2, the paper's grid) in `recipe`, as pid-distill runs it: the recipe's autocast around
    the objective, loss scaling for fp16, the student's arithmetic set by the recipe alone."""
    student.use_fp16 = False  # as distill.build: never the teacher's own fp16 image path
    grid = paper_grid()
    objective = PIDObjective(teacher, grid, Metric.L2.build(), derivative=recipe.derivative,
                             student_precision=recipe.student_precision)
    return _optimizer_step(objective, student, student, batch, recipe.autocast(device.type),
                           loss_scaler(recipe.precision, device), device)


def derivative_error(teacher: EDMPrecond, student: PIDStudent, recipe: precision.Recipe,
                     device: torch.device) -> str:
    """The relative error of the recipe's dy/dt against the same scheme in fp32 on the same latents, at the
    grid time nearest ε (the largest, docs/precision.md) and at the middle of the grid."""
    student.use_fp16 = False
    grid = paper_grid()
    shape = (student.img_channels, student.img_resolution, student.img_resolution)
    generator = torch.Generator(device).manual_seed(0)
    z = torch.randn((ERROR_LATENTS, *shape), generator=generator, device=device) * grid.sigma_max
    labels = None
    if student.label_dim:
        classes = torch.randint(student.label_dim, (ERROR_LATENTS,), generator=generator, device=device)
        labels = torch.nn.functional.one_hot(classes, student.label_dim).float()
    cells = []
    for index in (NUM_POINTS - 2, NUM_POINTS // 2):  # N = 250: where 16-bit rounding is largest
        ref = precision.reference(student, teacher, z, index, grid, labels, dtype=torch.float32)
        errors = precision.errors(student, teacher, z, index, grid, recipe, ref, labels)
        cells.append(f"{errors.derivative:.2g} at t={ref.t:.3g}")
    return "; ".join(cells)


def nccl_step(device: torch.device) -> Callable[[], None]:
    """A one-rank NCCL group: DDP step of the CIFAR-10 student (its gradient all-reduce)."""
    import torch.distributed as torch_dist
    from torch.nn.parallel import DistributedDataParallel
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    teacher, student = release_networks(ARCHITECTURES["cifar10"], device)
    model = DistributedDataParallel(student, device_ids=[device.index or 0])
    objective = PIDObjective(teacher, paper_grid(), Metric.L2.build())
    optimizer = torch.optim.RAdam(model.parameters(), lr=1e-5)
    generator = torch.Generator(device).manual_seed(0)

    def step() -> None:
        loss = objective(model, objective.sample_batch(generator, BATCH["cifar10"])).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def sampling_step(device: torch.device) -> Callable[[], None]:
    """One-step sampling of 500 CIFAR-10 images (seeded per image, as pid-sample)."""
    _, student = release_networks(ARCHITECTURES["cifar10"], device)
    student.eval()
    return lambda: [None for _ in generate(student, samplers.OneStepSampler(), range(500), batch_size=250,
                                           device=device)]


class StandInDetector(torch.nn.Module):
    """The real detector's call signature (uint8 NCHW images), 2048-d features, 1008 classes; random weights."""

    def __init__(self):
        super().__init__()
        self.register_buffer("W", torch.randn(3 * 8 * 8, FEATURE_DIM) * 0.05)

    def forward(self, img: torch.Tensor, return_features: bool = False, no_output_bias: bool = False):
        features = torch.tanh(torch.nn.functional.adaptive_avg_pool2d(img.float() / 255, 8).flatten(1) @ self.W)
        return features if return_features else torch.softmax(features[:, :1008], 1)


def fid_step(device: torch.device) -> Callable[[], None]:
    """Sampling 500 images and streaming them through a stand-in TorchScript detector into FID statistics."""
    from pid_diffusion.fid import compute_statistics
    from pid_diffusion.inception import Detector

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        detector = Detector(torch.jit.script(StandInDetector()), device, source="stand-in")
    _, student = release_networks(ARCHITECTURES["cifar10"], device)
    student.eval()

    def step() -> None:
        batches = ((b.positions, b.images.permute(0, 3, 1, 2))
                   for b in generate(student, samplers.OneStepSampler(), range(500), batch_size=250, device=device))
        compute_statistics(batches, detector, 500)
    return step


# ----------------------------------------------------------------------------------------------------------
# Synchronising calls of the training loop, and the user's commands on the GPU.

SYNC_WARNING = "called a synchronizing CUDA operation"  # torch's message in set_sync_debug_mode("warn")
SYNCS_PER_STEP = 1  # the step's one read-back: the loss and the preemption flag, all-reduced together
SYNC_STEPS = (3, 6)  # two runs that differ only in their length: setup and the last step's writes cancel


def count_syncs(run: Callable[[], object], set_mode: Callable[[str], None] | None = None) -> int:
    """Synchronising CUDA calls made by `run()`, as torch's sync debug mode reports them (one warning each)."""
    set_mode = set_mode or torch.cuda.set_sync_debug_mode
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        set_mode("warn")
        try:
            run()
        finally:
            set_mode("default")
    return sum(SYNC_WARNING in str(warning.message) for warning in caught)


def syncs_per_step(short: int, long: int) -> float:
    """Synchronising calls per step from the counts of the two runs of SYNC_STEPS."""
    return (long - short) / (SYNC_STEPS[1] - SYNC_STEPS[0])


def sync_status(per_step: float) -> str:
    verdict = "ok" if per_step <= SYNCS_PER_STEP else f"FAIL: more than {SYNCS_PER_STEP}"
    return f"{verdict}: {per_step:g} synchronising call(s) per step"


def write_random_teacher(path: Path, network_kwargs: dict) -> Path:
    """A converted teacher file (pid-convert-edm's format) of `network_kwargs` with random weights; the layers EDM
    initialises to zero get small random values, so every layer of the student matters."""
    torch.manual_seed(0)
    network = EDMPrecond(**network_kwargs)
    with torch.no_grad():
        for tensor in network.parameters():
            if not tensor.any():
                tensor.normal_(0, 0.01)
    payload = TeacherFile(dict(network_kwargs), network.state_dict(), TeacherFormat.CONVERTED)
    torch.save(payload.to_file_dict("random weights (benchmarks/gpu_check.py)"), path)
    return path


@contextlib.contextmanager
def command_files(folder: Path, network_kwargs: dict) -> Iterator[dict[str, str]]:
    """What the command rows read: a random-weight teacher, LPIPS stand-in weights (a TORCH_HOME, set for the
    block), a stand-in detector and a reference of its width."""
    from _standins import lpips_weights

    teacher = write_random_teacher(folder / "teacher.pt", network_kwargs)
    detector = folder / "detector.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(StandInDetector()).save(str(detector))
    reference = folder / "ref.npz"
    save_reference(str(reference), torch.zeros(FEATURE_DIM).numpy(), torch.eye(FEATURE_DIM).numpy())
    with lpips_weights():
        yield dict(teacher=str(teacher), detector=str(detector), ref=str(reference), run=str(folder / "run"),
                   demo=str(folder / "demo"))


def distill_command(files: dict[str, str], preset: str, batch: int, steps: int) -> list[str]:
    return ["-m", "pid_diffusion.cli.distill", f"--preset={preset}", f"--teacher.path={files['teacher']}",
            f"--run.dir={files['run']}", f"--train.steps={steps}", f"--train.batch={batch}", "--run.log_every=1",
            "--run.checkpoint_every=1", "--run.snapshot_every=1", "--run.image_every=0"]


def sample_command(files: dict[str, str]) -> list[str]:
    return ["-m", "pid_diffusion.cli.sample", "--checkpoint", files["run"], "--seeds", "0-63", "--grid",
            f"{files['run']}/grid.png"]


def fid_command(files: dict[str, str], step: int, images: int) -> list[str]:
    """FID of the run's last snapshot (one file: one 2048-d matrix square root)."""
    return ["-m", "pid_diffusion.cli.fid", "--checkpoint", checkpoint.snapshot_path(files["run"], step), "--ref",
            files["ref"], "--detector", files["detector"], "--seeds", f"0-{images - 1}", "--batch", "50", "--ema",
            "none"]


def demo_command(files: dict[str, str], steps: int, fid_images: int | None) -> list[str]:
    """pid-demo on its bundled teacher; with `fid_images`, its FID on the stand-in detector (on the run's device)."""
    fid = [] if fid_images is None else ["--detector", files["detector"], "--fid-images", str(fid_images)]
    return ["-m", "pid_diffusion.cli.demo", f"--run.dir={files['demo']}", f"--train.steps={steps}",
            "--eval-images", "16", *fid]


def _python(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _failed(job: subprocess.CompletedProcess | subprocess.Popen, output: str) -> str:
    lines = output.strip().splitlines() or ["no output"]
    return f"FAIL: exit {job.returncode}: {lines[-1][:160]}"


def command_rows(files: dict[str, str], preset: str, batch: int, steps: int, demo_steps: int, fid_images: int,
                 demo_fid_images: int | None, timeout: float = 300.0) -> list[tuple[str, str, float]]:
    """(row, status, seconds) of the user's commands: pid-distill killed (SIGKILL) once its first training state
    is complete and run again to resume, then pid-sample of the run folder, pid-fid of its last snapshot
    (`fid_images` images), and pid-demo (FID over `demo_fid_images`, or none)."""
    rows = []
    command = distill_command(files, preset, batch, steps)
    start = time.perf_counter()
    job = subprocess.Popen([sys.executable, *command], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    first = checkpoint.training_state_path(files["run"], 1)
    deadline = time.monotonic() + timeout
    while not os.path.exists(first) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    killed = job.poll() is None
    if killed:
        job.send_signal(signal.SIGKILL)  # no handler runs: the run folder holds what a crash leaves
    output = job.communicate()[0]
    if not os.path.exists(first):
        rows.append((f"pid-distill --preset={preset}, {steps} steps", _failed(job, output), time.perf_counter() - start))
        return rows
    resumed = _python(command, timeout)
    newest = checkpoint.latest_training_state(files["run"])
    if resumed.returncode != 0 or newest is None or newest[0] != steps or "Resuming from" not in resumed.stdout:
        status = _failed(resumed, resumed.stdout + resumed.stderr)
    else:
        status = f"ok: {'killed after step 1, ' if killed else ''}resumed, step {steps} written"
    rows.append((f"pid-distill --preset={preset}, {steps} steps, killed and resumed", status,
                 time.perf_counter() - start))
    for name, args in (("pid-sample of the run folder", sample_command(files)),
                       (f"pid-fid of the last snapshot, {fid_images} images", fid_command(files, steps, fid_images)),
                       (f"pid-demo, {demo_steps} steps", demo_command(files, demo_steps, demo_fid_images))):
        start = time.perf_counter()
        job = _python(args, timeout)
        status = "ok" if job.returncode == 0 else _failed(job, job.stdout + job.stderr)
        rows.append((name, status, time.perf_counter() - start))
    return rows


FP16_SAFE = {"train.precision": "fp16", "pid.student_precision": "fp32"}  # fp16's safe recipe (docs/precision.md)


def trainer_syncs(folder: Path, files: dict[str, str], preset: str, batch: int,
                  overrides: dict[str, str] | None = None) -> float:
    """Synchronising calls per step of `pid_diffusion.training.train.training_loop` on `preset` with `overrides` (in this
    process): two runs of SYNC_STEPS steps with the same periodic work (the last step's log record and training
    state)."""
    from pid_diffusion.distill import build, fingerprints, resolve
    from pid_diffusion.training.train import training_loop
    from pid_diffusion.utils import dist

    counts = []
    for steps in SYNC_STEPS:
        run_dir = folder / f"sync-{steps}-{'-'.join(sorted(overrides or {})) or 'preset'}"
        config = resolve(preset, {"teacher.path": files["teacher"], "run.dir": str(run_dir),
                                  "train.steps": str(steps), "train.batch": str(batch), "run.log_every": "1000",
                                  "run.checkpoint_every": "1000", "run.snapshot_every": "0", "run.image_every": "0",
                                  "run.sync_check_every": "0", **(overrides or {})})
        objective, student = build(config, dist.device())
        prints = fingerprints(objective)
        counts.append(count_syncs(lambda: training_loop(config, objective, student, None, prints)))
    return syncs_per_step(*counts)


def cuda_tests() -> tuple[str, float]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests", "-p", "no:cacheprovider"],
                            cwd=REPO, capture_output=True, text=True)
    summary = (result.stdout.strip().splitlines() or ["no output"])[-1]
    return ("ok: " if result.returncode == 0 else "FAIL: ") + summary, time.perf_counter() - start


def _recipe_check(architecture: str, name: str, device: torch.device) -> tuple[Callable[[], None], str]:
    """A recipe's step (timed by the caller) and its derivative's error, on the release architecture."""
    teacher, student = release_networks(ARCHITECTURES[architecture], device)
    error = derivative_error(teacher, student, RECIPES[name], device)
    return recipe_step(teacher, student, RECIPES[name], BATCH[architecture], device), error


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check.py needs a CUDA device; none is visible (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return 2
    device = torch.device(args.device)
    torch.cuda.set_device(device)
    deadline = time.monotonic() + 60 * args.budget_minutes
    rows: list[tuple[str, ...]] = []
    if not args.skip_tests:
        status, seconds = cuda_tests()
        rows.append(("CUDA-marked tests", status, f"{seconds:.1f} s total", "", ""))

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as folder, \
            command_files(Path(folder), {**EDM_PRESETS[ARCHITECTURES["cifar10"]], "dropout": 0.0}) as files:
        # The preset's fp32, and fp16 with loss scaling, whose overflow check rides the step's one read-back.
        for label, overrides in (("", {}), (" fp16", FP16_SAFE)):
            start = time.perf_counter()
            try:
                status = sync_status(trainer_syncs(Path(folder), files, "cifar10", BATCH["cifar10"], overrides))
            except Exception as error:  # record it and go on: the table is the result
                status = f"FAIL: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
            rows.append((f"synchronising calls per training step, cifar10{label} (batch {BATCH['cifar10']})", status,
                         f"{time.perf_counter() - start:.1f} s total", "", ""))
        for name, status, seconds in command_rows(files, "cifar10", BATCH["cifar10"], steps=3, demo_steps=5,
                                                  fid_images=1000, demo_fid_images=100):
            rows.append((name, status, f"{seconds:.1f} s total", "", ""))

    # Each check builds (the step to time, what else its row reports).
    checks: list[tuple[str, Callable[[], tuple[Callable[[], None], str]]]] = [
        (f"PID step {a} (batch {BATCH[a]}) {v}", lambda a=a, v=v: (pid_step(a, v, device), ""))
        for a in args.architectures if a not in EDM2_PRESETS for v in args.variants]
    checks += [(f"PID step {a} guided by {EDM2_GUIDE} (batch {BATCH[a]}) {v}",
                lambda a=a, v=v: (pid_step(a, v, device), ""))
               for a in args.architectures if a in EDM2_PRESETS for v in EDM2_VARIANTS]
    checks += [(f"PID recipe {a} (batch {BATCH[a]}) {r}", lambda a=a, r=r: _recipe_check(a, r, device))
               for a in args.architectures if a not in EDM2_PRESETS for r in args.recipes]
    checks += [("NCCL 1 rank, DDP step cifar10", lambda: (nccl_step(device), "")),
               ("one-step sampling, 500 cifar10 images", lambda: (sampling_step(device), "")),
               ("FID extraction, 500 cifar10 images", lambda: (fid_step(device), ""))]
    for name, build in checks:
        if time.monotonic() > deadline:
            rows.append((name, "not run: time budget spent", "", "", ""))
            continue
        try:
            step, note = build()
            seconds, peak = _timed(device, step)
            rows.append((name, "ok", f"{1000 * seconds:.1f} ms", f"{peak:,.0f} MiB", note))
        except Exception as error:  # record it and go on: the table is the result
            rows.append((name, f"FAIL: {type(error).__name__}: {str(error).splitlines()[0][:120]}", "", "", ""))
        finally:
            torch.cuda.empty_cache()

    table = [f"GPU check on {torch.cuda.get_device_name(device)}, torch {torch.__version__}", "",
             "| check | status | step time | peak memory | dy/dt error vs fp32 |", "|---|---|---|---|---|"]
    table += [f"| {' | '.join(row)} |" for row in rows]
    text = "\n".join(table) + "\n"
    print(text, end="")
    if args.out:
        with tempfile.NamedTemporaryFile("w", dir=Path(args.out).parent, delete=False) as file:
            file.write(text)
        os.replace(file.name, args.out)
    return 0 if all(not row[1].startswith("FAIL") for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
