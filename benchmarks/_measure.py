"""Measurement helpers of benchmarks/benchmark.py: synchronised timing of interleaved variants, peak memory,
FLOP counts, the machine's measured peak and its description.

Timings on a shared machine drift, so variants that are compared run in turns (A, B, C, A, B, C, …) and each
is reported by its median; ratios are only ever taken between numbers of the same round.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

# The machine's peak is measured on one large matmul and one large 3×3 convolution, sized per device.
PEAK_MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}
PEAK_CONV_SHAPE = {"cpu": (8, 256, 32), "cuda": (64, 256, 64)}  # (batch, channels, resolution)
PEAK_REPEATS = 5


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(variants: Mapping[str, Callable[[], object]], device: torch.device, repeats: int,
                warmup: int = 1, summary: Callable[[list[float]], float] = statistics.median) -> dict[str, float]:
    """Median (or `summary`) seconds of each variant over `repeats` rounds that run every variant once, in turn."""
    for run in variants.values():
        for _ in range(warmup):
            run()
    seconds = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return {name: summary(values) for name, values in seconds.items()}


def memory_method(device: torch.device) -> str:
    """How `peak_memory` measures on `device`, for the results table."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated above the memory allocated before the call"
    return ("the peak of live tensor bytes reconstructed from torch.profiler's allocation and free events "
            "(profile_memory=True), above the bytes live before the call (CPU: no allocator statistics)")


def peak_memory(run: Callable[[], object], device: torch.device) -> int:
    """Bytes allocated at the peak of `run`, beyond those allocated when it starts."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        run()
    # Allocations are attributed to the op that makes them and frees appear as "[memory]" events: in start
    # order, the running sum of each event's own (self) bytes is the live-tensor curve.
    live = peak = 0
    for event in sorted(profiler.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def count_flops(run: Callable[[], object]) -> int:
    """Floating-point operations of `run` as torch.utils.flop_counter counts them (matmuls and convolutions)."""
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def measured_peak_flops(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """FLOP/s of one large matmul and one large 3×3 convolution in `dtype`, best of a few runs (a peak: the
    fastest run is the one least disturbed by other work on the machine)."""
    n = PEAK_MATMUL_SIZE[device.type]
    a = torch.randn(n, n, device=device, dtype=dtype)
    batch, channels, size = PEAK_CONV_SHAPE[device.type]
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
    w = torch.randn(channels, channels, 3, 3, device=device, dtype=dtype)
    with torch.no_grad():
        seconds = interleaved({"matmul": lambda: a @ a, "conv": lambda: F.conv2d(x, w, padding=1)}, device,
                              PEAK_REPEATS, summary=min)
    flops = {"matmul": 2 * n ** 3, "conv": 2 * batch * channels * channels * 9 * size * size}
    return {name: flops[name] / seconds[name] for name in flops}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(device: torch.device) -> dict[str, str]:
    """CPU model, cores and threads, torch version, GPU name, date: what a reader needs to compare numbers."""
    load = f", load average {os.getloadavg()[0]:.1f} at start" if hasattr(os, "getloadavg") else ""
    info = {
        "CPU": f"{_cpu_model()}, {os.cpu_count()} logical cores, torch uses {torch.get_num_threads()} "
               f"thread(s){load}",
        "torch": torch.__version__,
        "GPU": torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU run)",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    return info
