"""Speed of PID training, one-step sampling and FID feature extraction, with the speed options side by side.

    python benchmarks/benchmark.py --quick                                   # CPU, a few minutes
    python benchmarks/benchmark.py                                           # CPU, larger batches, more repeats
    python benchmarks/benchmark.py --device cuda --precision bf16 --channels-last --compile

Two networks, each trained as its preset trains it: EDM's CIFAR-10 DDPM++ (`edm-cifar10-32x32-uncond-vp`,
55.7M parameters, random weights) under the `cifar10` preset (LPIPS at 224×224, RAdam, three EMAs), and the
small default network (the bundled teacher of model_zoo/ if present, else its architecture with random
weights) under the `default` preset (L2). For each:

- the training step (batch draw, PID loss, backward, optimizer, EMA; one process, no DDP wrapper) against the
  sum of its network passes timed alone (student fwd+bwd on the concatenated batch, teacher fwd, metric
  fwd+bwd), with its peak memory and its FLOP/s against the machine's peak measured in the same run;
- activation checkpointing on and off, and one concatenated student call against separate calls;
- one-step sampling against the bare network's forward, and FID feature extraction (generate, quantise,
  detect) against generation and the detector timed alone;
- the EMA update (foreach) against a per-parameter loop, and LPIPS with both images in one VGG pass against
  two passes.

Variants that are compared run in turns and are reported by their medians (see _measure.py). The table is
printed and written atomically to benchmarks/RESULTS.md with the command, the machine and the date.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import _measure
import _standins
from pid_diffusion.utils import fileio
from pid_diffusion.config import Precision
from pid_diffusion.distill import DistillConfig, resolve
from pid_diffusion.grid import KarrasGrid
from pid_diffusion.inception import Detector
from pid_diffusion.loss import Derivative, PIDObjective
from pid_diffusion.distances import PiqLPIPS, VGGLPIPS, upsample_for_lpips
from pid_diffusion.networks.edm import EDM_PRESETS, EDMPrecond
from pid_diffusion.utils.perf import (disable_activation_recomputation, enable_activation_recomputation,
                                enable_lpips_recomputation, retain_freed_cpu_memory)
from pid_diffusion.images import to_uint8
from pid_diffusion.samplers import OneStepSampler
from pid_diffusion.student import PIDStudent
from pid_diffusion.teacher import load_teacher
from pid_diffusion.teacher_training import DataConfig, NetworkConfig
from pid_diffusion.training.train import AUTOCAST_DTYPES, EMA, loss_scaler

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
BUNDLED_TEACHER = REPO / "model_zoo" / "edm-shapes-16x16.pt"
CIFAR10_PRESET = "edm-cifar10-32x32-uncond-vp"
SHAPES_CHANNELS = 3  # the bundled teacher's shapes data set is RGB
GIB = 2 ** 30

# Student evaluations per loss call, one concatenated batch (loss.py): y_i and the neighbour(s).
STUDENT_COPIES = {Derivative.FORWARD: 2, Derivative.CENTRAL: 3}

# The targets of issue 7.
MAX_STEP_OVERHEAD = 1.10  # step time / sum of its network passes
MIN_SAMPLING_EFFICIENCY = 0.90  # one-step sampler images/s / bare network forward images/s
MIN_CHECKPOINT_MEMORY_CUT = 2.0  # peak step memory without / with activation checkpointing
MAX_CHECKPOINT_SLOWDOWN = 1.4  # step time with / without activation checkpointing
NOISE = 0.05  # speed ratios within 5% of 1 count as equal (the run-to-run spread of medians measured here)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Batch sizes and rounds of one run: (CIFAR-10 network, small network)."""

    batch: tuple[int, int]
    repeats: tuple[int, int]


# CPU batches keep --quick within minutes (the CIFAR network costs ~42 GFLOP per image and forward pass).
PLANS = {
    ("cpu", True): Plan(batch=(2, 8), repeats=(1, 3)),
    ("cpu", False): Plan(batch=(4, 32), repeats=(3, 5)),
    ("cuda", True): Plan(batch=(64, 256), repeats=(5, 10)),
    ("cuda", False): Plan(batch=(128, 512), repeats=(10, 20)),
}
UPDATE_MIN_REPEATS = 5  # EMA and optimizer updates are cheap: more rounds at no real cost


@dataclasses.dataclass(frozen=True)
class Options:
    """How every measurement runs."""

    device: torch.device
    precision: Precision
    channels_last: bool
    compile: bool
    profile: bool

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = AUTOCAST_DTYPES[self.precision]
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    @property
    def warmup(self) -> int:
        # CUDA autotunes and torch.compile compiles on first calls; plain CPU kernels have no first-call cost
        # worth a warm-up round of the 55M network (the step is warmed by its memory measurement anyway).
        return 1 if self.device.type == "cuda" or self.compile else 0

    def prepare(self, *modules: nn.Module) -> None:
        """Apply channels_last to `modules` in place (torch.compile comes later, after the EMA copies)."""
        if self.channels_last:
            for module in modules:
                module.to(memory_format=torch.channels_last)


@dataclasses.dataclass(frozen=True)
class Case:
    """One network as its preset trains it."""

    name: str
    teacher: EDMPrecond
    config: DistillConfig
    batch: int
    repeats: int


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the results table; `ratio` compares `result` with `against`."""

    network: str
    measure: str
    result: str
    against: str = ""
    ratio: str = ""
    target: str = ""

    def markdown(self) -> str:
        return "| " + " | ".join(dataclasses.astuple(self)) + " |"


HEADER = "| network | measure | result | against | ratio | target |\n|---|---|---|---|---|---|"


def _target(value: float, bound: float, at_least: bool) -> str:
    met = value >= bound if at_least else value <= bound
    return f"{'≥' if at_least else '≤'} {bound:g}: {'met' if met else 'MISSED'}"


def _compared(speedup: float) -> str:
    """'1.23× the speed of', or 'as fast as (1.02×)' within the noise of a shared machine."""
    if abs(speedup - 1) <= NOISE:
        return f"as fast as ({speedup:.2f}×, within noise)"
    return f"{speedup:.2f}× the speed of"


def _per_second(count: int, seconds: float) -> str:
    return f"{count / seconds:.3g} img/s"


def _gflops(flops_per_second: float) -> str:
    return f"{flops_per_second / 1e9:.3g} GFLOP/s"


def _memory(num_bytes: int) -> str:
    return f"{num_bytes / GIB:.3g} GiB"


# ----------------------------------------------------------------------------------------------------------
# Networks.


def small_teacher() -> tuple[EDMPrecond, str]:
    """The bundled teacher, or its architecture (pid-train-teacher's default network) with random weights."""
    if BUNDLED_TEACHER.is_file():
        return load_teacher(BUNDLED_TEACHER), f"bundled teacher {BUNDLED_TEACHER.relative_to(REPO)}"
    network, data = NetworkConfig(), DataConfig()
    teacher = EDMPrecond(img_resolution=data.resolution, img_channels=SHAPES_CHANNELS, model_type="SongUNet",
                         model_channels=network.model_channels, channel_mult=list(network.channel_mult),
                         num_blocks=network.num_blocks, attn_resolutions=list(network.attn_resolutions),
                         dropout=network.dropout)
    return teacher.eval().requires_grad_(False), "the bundled teacher's architecture, random weights (file absent)"


def cases(plan: Plan) -> tuple[list[Case], list[str]]:
    """The CIFAR-10 and the small network, and a note on where each comes from."""
    torch.manual_seed(0)
    cifar = EDMPrecond(**{**EDM_PRESETS[CIFAR10_PRESET], "dropout": 0.0}).eval().requires_grad_(False)
    small, small_source = small_teacher()
    notes = [f"CIFAR-10: EDM_PRESETS['{CIFAR10_PRESET}'], random weights, `cifar10` preset",
             f"small: {small_source}, `default` preset"]
    return [Case(f"CIFAR-10 DDPM++ ({_millions(cifar)})", cifar, resolve("cifar10"), plan.batch[0], plan.repeats[0]),
            Case(f"small 16×16 ({_millions(small)})", small, resolve("default"), plan.batch[1],
                 plan.repeats[1])], notes


def _millions(module: nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.3g}M"


# ----------------------------------------------------------------------------------------------------------
# The measurements of one network.


class Bench:
    """A network's student, teacher, metric, optimizer and EMA, and closures for each piece of a step."""

    def __init__(self, case: Case, options: Options):
        self.case, self.options = case, options
        device, pid, train = options.device, case.config.pid, case.config.train
        self.teacher = case.teacher.to(device)
        self.grid = KarrasGrid(num_points=pid.num_points, rho=pid.rho, sigma_min=pid.sigma_min,
                               sigma_max=pid.sigma_max)
        self.metric = pid.metric.build(**pid.metric_options()).to(device)
        # Checkpointing reaches the metric through a second, checkpointed build swapped in for its steps.
        self.checkpointed_metric = None
        if isinstance(self.metric, (PiqLPIPS, VGGLPIPS)):
            self.checkpointed_metric = pid.metric.build(**pid.metric_options()).to(device)
            enable_lpips_recomputation(self.checkpointed_metric)
        self.objective = PIDObjective(self.teacher, self.grid, self.metric, derivative=pid.derivative,
                                      form=pid.form, stop_neighbour_grad=pid.stop_neighbour_grad)
        torch.manual_seed(train.seed)
        self.student = PIDStudent.from_teacher(self.teacher, pid.sigma_min, pid.sigma_max,
                                               init=case.config.student.init,
                                               network_overrides={"dropout": case.config.student.dropout})
        self.student.to(device).train()
        options.prepare(self.student, self.teacher, *self.metrics)
        self.optimizer = train.optimizer.build(self.student.parameters(), train)
        self.ema = EMA(self.student, train.ema_rates)
        self.scaler = loss_scaler(options.precision, device)
        if options.compile:
            for module in (self.student.model, self.teacher.model, *self.metrics):
                module.compile()
        self.generator = torch.Generator().manual_seed(train.seed)
        fixed = self.objective.sample_batch(torch.Generator().manual_seed(train.seed + 1), case.batch)
        self.fixed = {key: value.to(device) for key, value in fixed.items()}

    @property
    def metrics(self) -> list[nn.Module]:
        return [self.metric] + ([self.checkpointed_metric] if self.checkpointed_metric is not None else [])

    # A training step, as train.py runs one (without DDP and logging).
    def step(self) -> None:
        batch_size = self.case.batch
        batch = {key: value.to(self.options.device)
                 for key, value in self.objective.sample_batch(self.generator, batch_size).items()}
        with self.options.autocast():
            losses = self.objective(self.student, batch)
        self.scaler.scale(losses.float().sum() / batch_size).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.student)

    def checkpointed_step(self, metric_too: bool = True) -> None:
        """A step with the student's U-Net blocks (and, with `metric_too`, LPIPS' VGG stages) checkpointed."""
        enable_activation_recomputation(self.student)
        if metric_too and self.checkpointed_metric is not None:
            self.objective.metric = self.checkpointed_metric
        try:
            self.step()
        finally:
            disable_activation_recomputation(self.student)
            self.objective.metric = self.metric

    # The network passes of a step, alone.
    def _student_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        copies = STUDENT_COPIES[self.case.config.pid.derivative]
        times = self.grid.times(self.fixed["indices"]).to(self.options.device, torch.float32)
        return self.fixed["z"], times, self.fixed.get("class_labels"), copies

    def student_concatenated(self) -> None:
        """Student forward and backward on the concatenated batch, as loss.py evaluates it."""
        z, times, labels, copies = self._student_inputs()
        with self.options.autocast():
            y = self.student(z.repeat(copies, 1, 1, 1), times.repeat(copies),
                             None if labels is None else labels.repeat(copies, 1))
        y.float().sum().backward()
        self.student.zero_grad(set_to_none=True)

    def student_separate(self) -> None:
        """The same evaluations as separate calls, one graph, one backward."""
        z, times, labels, copies = self._student_inputs()
        with self.options.autocast():
            total = sum(self.student(z, times, labels).float().sum() for _ in range(copies))
        total.backward()
        self.student.zero_grad(set_to_none=True)

    @torch.no_grad()
    def teacher_forward(self) -> None:
        z, times, labels, _ = self._student_inputs()
        with self.options.autocast():
            self.teacher(z, times, labels)

    def metric_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [−1, 1]: the student side (requires grad) and the teacher's target."""
        generator = torch.Generator().manual_seed(self.case.config.train.seed)
        shape = self.fixed["z"].shape
        a = (torch.rand(shape, generator=generator) * 2 - 1).to(self.options.device).requires_grad_(True)
        b = (torch.rand(shape, generator=generator) * 2 - 1).to(self.options.device)
        return a, b

    def metric_forward_backward(self) -> None:
        a, b = self.metric_pair()
        with self.options.autocast():
            distances = self.metric(a, b)
        distances.float().sum().backward()

    def optimizer_and_ema(self) -> None:
        """The update alone, on zero gradients (RAdam skips parameters without a gradient)."""
        for p in self.student.parameters():
            p.grad = torch.zeros_like(p)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.student)

    @torch.no_grad()
    def ema_loop(self) -> None:
        """The EMA update one parameter at a time (what train.EMA's foreach lerp replaces)."""
        params, buffers = list(self.student.parameters()), list(self.student.buffers())
        for rate, average in self.ema.models.items():
            for mine, theirs in zip(average.parameters(), params):
                mine.lerp_(theirs, 1.0 - rate)
            for mine, theirs in zip(average.buffers(), buffers):
                mine.copy_(theirs)


def training_rows(bench: Bench, verdicts: list[str]) -> tuple[list[Row], dict[str, float]]:
    """The training step: time, throughput, memory, FLOP/s; its passes; checkpointing; batched student.
    Also returns the machine's peak FLOP/s, the best of probes just before and just after the timed rounds
    (other work on a shared machine drifts; a peak is the least disturbed probe)."""
    options, case = bench.options, bench.case
    device, name, batch = options.device, case.name, case.batch

    # FLOPs of a first step (which also creates the optimizer's state), then the memory of one step each.
    flops = _measure.count_flops(bench.step)
    memory_plain = _measure.peak_memory(bench.step, device)
    memory_checkpointed = _measure.peak_memory(bench.checkpointed_step, device)
    memory_student_only = (_measure.peak_memory(lambda: bench.checkpointed_step(metric_too=False), device)
                           if bench.checkpointed_metric is not None else memory_checkpointed)
    if options.profile:
        _profile(bench.step, f"{name}: training step")

    dtype = AUTOCAST_DTYPES[options.precision] or torch.float32
    before = _measure.measured_peak_flops(device, dtype)
    seconds = _measure.interleaved({
        "step": bench.step,
        "step, checkpointing": bench.checkpointed_step,
        "student concatenated": bench.student_concatenated,
        "student separate": bench.student_separate,
        "teacher": bench.teacher_forward,
        "metric": bench.metric_forward_backward,
        "update": bench.optimizer_and_ema,
    }, device, case.repeats, options.warmup)
    after = _measure.measured_peak_flops(device, dtype)
    peaks = {kind: max(before[kind], after[kind]) for kind in before}
    step = seconds["step"]
    passes = seconds["student concatenated"] + seconds["teacher"] + seconds["metric"]
    peak_name, peak = max(peaks.items(), key=lambda item: item[1])
    copies = STUDENT_COPIES[case.config.pid.derivative]
    slowdown = seconds["step, checkpointing"] / step
    memory_cut = memory_plain / memory_checkpointed
    batching = seconds["student separate"] / seconds["student concatenated"]
    checkpointed = "student blocks" + (" + LPIPS stages" if bench.checkpointed_metric is not None else "")

    rows = [
        Row(name, f"training step, batch {batch} ({case.config.pid.metric.value})",
            f"{step:.3g} s, {_per_second(batch, step)}, peak {_memory(memory_plain)}"),
        Row(name, "achieved FLOP/s (step)", _gflops(flops / step), f"machine peak {_gflops(peak)} ({peak_name})",
            f"{flops / step / peak:.2f}"),
        Row(name, "step vs its network passes", f"{step:.3g} s",
            f"{passes:.3g} s = student fwd+bwd ×{copies} concatenated {seconds['student concatenated']:.3g} + "
            f"teacher fwd {seconds['teacher']:.3g} + metric fwd+bwd {seconds['metric']:.3g} "
            f"(optimizer + EMA alone: {seconds['update']:.3g})",
            f"{step / passes:.3f}", _target(step / passes, MAX_STEP_OVERHEAD, at_least=False)),
        Row(name, f"activation checkpointing: step time ({checkpointed})", f"{seconds['step, checkpointing']:.3g} s",
            f"{step:.3g} s off", f"{slowdown:.2f}", _target(slowdown, MAX_CHECKPOINT_SLOWDOWN, at_least=False)),
        Row(name, f"activation checkpointing: peak memory ({checkpointed})", _memory(memory_checkpointed),
            f"{_memory(memory_plain)} off; {_memory(memory_student_only)} with the student alone checkpointed",
            f"÷{memory_cut:.2f}", _target(memory_cut, MIN_CHECKPOINT_MEMORY_CUT, at_least=True)),
        Row(name, f"student ×{copies}: one concatenated call (default)", f"{seconds['student concatenated']:.3g} s",
            f"{seconds['student separate']:.3g} s in separate calls", f"{batching:.2f}× faster"),
    ]
    verdicts.append(f"{name}: one concatenated student call is {_compared(batching)} separate calls; kept as "
                    f"the default (loss.py): one larger batch per kernel, half the kernel launches.")
    verdicts.append(f"{name}: activation checkpointing ({checkpointed}) divides step memory by {memory_cut:.2f} at "
                    f"{slowdown:.2f}× the step time; off by default, since it only costs time unless memory limits "
                    f"the batch per device.")
    return rows, peaks


def update_rows(bench: Bench, verdicts: list[str]) -> list[Row]:
    """The EMA update (foreach) against a per-parameter loop; the optimizer as configured against foreach."""
    optimizer = bench.optimizer
    foreach = type(optimizer)(bench.student.parameters(), **{**optimizer.defaults, "foreach": True})

    def step(chosen: torch.optim.Optimizer) -> None:
        for p in bench.student.parameters():
            p.grad = torch.zeros_like(p)
        chosen.step()
        chosen.zero_grad(set_to_none=True)

    seconds = _measure.interleaved({"foreach": lambda: bench.ema.update(bench.student), "loop": bench.ema_loop,
                                    "optimizer": lambda: step(optimizer), "optimizer foreach": lambda: step(foreach)},
                                   bench.options.device, max(bench.case.repeats, UPDATE_MIN_REPEATS),
                                   bench.options.warmup)
    name, kind = bench.case.name, type(optimizer).__name__
    ema_speedup = seconds["loop"] / seconds["foreach"]
    optimizer_speedup = seconds["optimizer"] / seconds["optimizer foreach"]
    verdicts.append(f"{name}: the foreach EMA update (train.EMA) is {_compared(ema_speedup)} a per-parameter "
                    f"loop; kept: a foreach call launches one kernel per group of tensors instead of one per "
                    f"parameter, which matters on CUDA.")
    verdicts.append(f"{name}: {kind}(foreach=True) is {_compared(optimizer_speedup)} {kind} as config.py builds "
                    f"it (foreach=None, which torch resolves to foreach on CUDA): kept as built.")
    return [Row(name, f"EMA update, {len(bench.ema.models)} rate(s): foreach (default)",
                f"{seconds['foreach'] * 1e3:.3g} ms", f"{seconds['loop'] * 1e3:.3g} ms per-parameter loop",
                f"{ema_speedup:.2f}× faster"),
            Row(name, f"{kind} step: foreach=True", f"{seconds['optimizer foreach'] * 1e3:.3g} ms",
                f"{seconds['optimizer'] * 1e3:.3g} ms as configured (foreach=None)",
                f"{optimizer_speedup:.2f}× faster")]


def lpips_rows(bench: Bench, verdicts: list[str]) -> list[Row]:
    """PiqLPIPS with both images in one VGG pass (distances.py) against piq's own two passes, and against two
    passes whose target side (the teacher's denoised image, never differentiated) runs without autograd."""
    metric = bench.metric
    if not isinstance(metric, PiqLPIPS):
        return []
    a, b = bench.metric_pair()

    def prepared(x: torch.Tensor) -> torch.Tensor:
        return (upsample_for_lpips(x, metric.resize_below, metric.size) + 1) / 2

    def one_pass():
        with bench.options.autocast():
            distances = metric(a, b)
        distances.float().sum().backward()

    def two_passes():
        with bench.options.autocast():
            distances = metric.lpips(prepared(a), prepared(b))
        distances.float().sum().backward()

    def two_passes_target_no_grad():
        # piq's per-layer distances; the reduction to one number per sample costs nothing and is left out.
        with bench.options.autocast():
            features_a = metric.lpips.get_features(prepared(a))
            with torch.no_grad():
                features_b = metric.lpips.get_features(prepared(b))
            distances = metric.lpips.compute_distance(features_a, features_b)
        sum(d.float().sum() for d in distances).backward()

    seconds = _measure.interleaved({"one": one_pass, "two": two_passes, "no_grad": two_passes_target_no_grad},
                                   bench.options.device, bench.case.repeats, bench.options.warmup)
    memory_one = _measure.peak_memory(one_pass, bench.options.device)
    memory_no_grad = _measure.peak_memory(two_passes_target_no_grad, bench.options.device)
    name, batch = bench.case.name, bench.case.batch
    best = min(seconds, key=seconds.get)
    verdicts.append(f"{name}: LPIPS fwd+bwd at batch {batch}: one VGG pass {seconds['one']:.3g} s, two passes "
                    f"{seconds['two']:.3g} s, two passes with the target under no_grad {seconds['no_grad']:.3g} s; "
                    f"fastest: {best}" + (" (the default)." if best == "one" else
                                         ". PID's target (the teacher's denoised image) needs no gradient, yet in "
                                         "one concatenated pass autograd backpropagates through its half of the "
                                         "batch as well: distances.py should run the target's VGG pass under "
                                         "torch.no_grad (the lead's to change; the default is kept meanwhile)."))
    return [
        Row(name, f"LPIPS fwd+bwd, batch {batch}: one VGG pass (default)", f"{seconds['one']:.3g} s",
            f"{seconds['two']:.3g} s in two passes (piq.LPIPS.forward)",
            f"{seconds['two'] / seconds['one']:.2f}× faster"),
        Row(name, "LPIPS fwd+bwd: two passes, target under no_grad", f"{seconds['no_grad']:.3g} s",
            f"{seconds['one']:.3g} s one pass", f"{seconds['one'] / seconds['no_grad']:.2f}× faster"),
        Row(name, "LPIPS fwd+bwd peak memory: target under no_grad", _memory(memory_no_grad),
            f"{_memory(memory_one)} one pass", f"÷{memory_one / memory_no_grad:.2f}"),
    ]


def sampling_rows(bench: Bench, detector: Detector) -> list[Row]:
    """One-step sampling against the bare network, FID features against generation and detection alone."""
    student, options, batch = bench.student, bench.options, bench.case.batch
    shape = (batch, student.img_channels, student.img_resolution, student.img_resolution)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(options.device)
    labels = bench.fixed.get("class_labels")
    noise_labels = torch.zeros(batch, device=options.device)  # the values do not change the cost
    sampler = OneStepSampler()
    images = to_uint8(torch.rand(shape) * 2 - 1).permute(0, 3, 1, 2).to(options.device)

    @torch.no_grad()
    def bare_forward():
        with options.autocast():
            student.model(latents, noise_labels, labels)

    def generate():
        with options.autocast():
            return sampler(student, latents, labels)

    def features():
        detector.features(to_uint8(generate()).permute(0, 3, 1, 2))

    student.eval()
    try:
        seconds = _measure.interleaved({"bare": bare_forward, "sampler": generate, "fid": features,
                                        "detector": lambda: detector.features(images)},
                                       options.device, bench.case.repeats, options.warmup)
    finally:
        student.train()
    name = bench.case.name
    efficiency = seconds["bare"] / seconds["sampler"]
    pipeline_bound = seconds["sampler"] + seconds["detector"]  # images/s if nothing else costs time
    return [
        Row(name, f"one-step sampling, batch {batch}", _per_second(batch, seconds["sampler"]),
            f"{_per_second(batch, seconds['bare'])} bare network forward", f"{efficiency:.3f}",
            _target(efficiency, MIN_SAMPLING_EFFICIENCY, at_least=True)),
        Row(name, "FID features (generate, uint8, detect)", _per_second(batch, seconds["fid"]),
            f"{_per_second(batch, pipeline_bound)} = generation {_per_second(batch, seconds['sampler'])} then "
            f"detector alone {_per_second(batch, seconds['detector'])}", f"{pipeline_bound / seconds['fid']:.3f}"),
    ]


def _profile(run: Callable[[], object], title: str) -> None:
    """Print the ops that take the most time in `run` (--profile)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        run()
    sort = "cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(f"\n{title}\n{profiler.key_averages().table(sort_by=sort, row_limit=20)}", flush=True)


# ----------------------------------------------------------------------------------------------------------
# The run.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="small batches and one round (CPU: minutes)")
    parser.add_argument("--precision", type=Precision, choices=list(Precision), default=Precision.FP32,
                        metavar="{" + ",".join(p.value for p in Precision) + "}",
                        help="autocast of every pass (default: fp32, no autocast)")
    parser.add_argument("--channels-last", action="store_true",
                        help="weights in NHWC (torch.channels_last); convolution outputs follow")
    parser.add_argument("--compile", action="store_true", help="torch.compile the student, teacher and metric")
    parser.add_argument("--batch", type=int, nargs=2, metavar=("CIFAR", "SMALL"),
                        help="training batch of each network (default: per device and --quick)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU; default: torch's)")
    parser.add_argument("--return-freed-memory", action="store_true",
                        help="CPU: leave glibc's malloc returning freed memory to the OS (default: "
                             "perf.retain_freed_cpu_memory, which avoids re-faulting every step's pages)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of each step")
    parser.add_argument("--out", default=str(RESULTS), help="results file (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; run on a GPU machine or use --device cpu")
    if args.batch is not None and min(args.batch) < 1:
        parser.error(f"--batch {args.batch}: batches must be ≥ 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    options = Options(device, args.precision, args.channels_last, args.compile, args.profile)
    plan = PLANS[device.type, args.quick]
    if args.batch is not None:
        plan = dataclasses.replace(plan, batch=tuple(args.batch))
    retained = device.type == "cpu" and not args.return_freed_memory and retain_freed_cpu_memory()
    machine = _measure.describe_machine(device)
    machine["CPU malloc"] = ("freed memory retained (perf.retain_freed_cpu_memory)" if retained else
                             "the C library's default")
    print(" | ".join(f"{key}: {value}" for key, value in machine.items()), flush=True)

    rows, verdicts, peaks = [], [], {}
    with _standins.lpips_weights() as lpips_source:
        detector, detector_source = _standins.detector(device)
        network_cases, notes = cases(plan)
        for case in network_cases:
            print(f"{case.name}: batch {case.batch}, {case.repeats} round(s)", flush=True)
            bench = Bench(case, options)
            training, peaks[case.name] = training_rows(bench, verdicts)
            for part in (training, lpips_rows(bench, verdicts),
                         update_rows(bench, verdicts), sampling_rows(bench, detector)):
                rows += part
                print("\n".join(row.markdown() for row in part), flush=True)
            del bench

    command = "python benchmarks/benchmark.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    report = _report(command, machine, options, peaks, notes + [f"LPIPS: {lpips_source}",
                                                                f"FID detector: {detector_source}"],
                     rows, verdicts, time.perf_counter() - started)
    fileio.atomic_write_text(report, args.out)
    print(f"\n{HEADER}\n" + "\n".join(row.markdown() for row in rows))
    print(f"\nwritten to {args.out}")


def _report(command: str, machine: dict[str, str], options: Options, peaks: dict[str, dict[str, float]],
            notes: list[str],
            rows: list[Row], verdicts: list[str], seconds: float) -> str:
    lines = ["# Benchmark results", "", f"Command: `{command}` ({seconds / 60:.1f} min)", ""]
    lines += [f"- {key}: {value}" for key, value in machine.items()]
    lines += [f"- options: precision {options.precision.value}, channels_last {options.channels_last}, "
              f"torch.compile {options.compile}",
              *(f"- machine peak, best of probes around the {network} step rounds: " +
                ", ".join(f"{name} {_gflops(value)}" for name, value in network_peaks.items())
                for network, network_peaks in peaks.items()),
              f"- peak memory: {_measure.memory_method(options.device)}"]
    lines += [f"- {note}" for note in notes]
    lines += ["", "Times are medians of interleaved rounds; ratios compare numbers of the same round.", "",
              HEADER, *(row.markdown() for row in rows), "", "## Defaults", ""]
    lines += [f"- {verdict}" for verdict in verdicts]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
