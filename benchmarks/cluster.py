"""Costs of cluster life: host memory while a checkpoint is written, and drawing a step's batch per rank.

    python benchmarks/cluster.py --threads 1      # CPU, a few minutes
    python benchmarks/cluster.py --device cuda    # batch drawing on the GPU

- Checkpoint save, peak host memory: the training state of the `cifar10` preset (EDM's CIFAR-10 DDPM++,
  `edm-cifar10-32x32-uncond-vp`, random weights; three EMAs; RAdam moments) written as the trainer writes
  it, streamed into the file (`fileio.atomic_torch_save`) against the former `torch.save` into a BytesIO
  then `getvalue()`. Each way runs in a fresh process; the figure is the resident-set high-water mark
  (VmHWM, reset through /proc/self/clear_refs just before the save) above the resident set before it.
- Batch drawing per step at ImageNet-64 shapes (z 3×64×64, grid indices, 1000-class one-hot labels; the
  `imagenet64` preset's PIDObjective), for one of 8 ranks: the former scheme (every rank draws the whole
  global batch on a CPU generator, keeps its eighth, copies it to the device) against the per-chunk
  generators on the rank's device (train.py), global batches 256 to 2048.

The table is printed and written atomically to benchmarks/RESULTS-cluster.md.
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _measure import describe_machine, interleaved  # noqa: E402

from pid_diffusion.utils import fileio, perf
from pid_diffusion.config import PIDConfig, resolve  # noqa: E402
from pid_diffusion.grid import KarrasGrid  # noqa: E402
from pid_diffusion.loss import PIDObjective  # noqa: E402
from pid_diffusion.distances import L2  # noqa: E402
from pid_diffusion.training.train import EMA, _rank_share  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS-cluster.md")
CIFAR10_NETWORK = "edm-cifar10-32x32-uncond-vp"
IMAGENET64_SHAPE = SimpleNamespace(img_channels=3, img_resolution=64, label_dim=1000)  # The ADM teacher's.
RANKS = 8
GLOBAL_BATCHES = (256, 512, 1024, 2048)
SAVE_WAYS = ("in_memory", "streamed")


# ----------------------------------------------------------------------------------------------------------
# Checkpoint save: one way per process.


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _training_state() -> dict:
    """The dictionary `checkpoint.save` writes at the `cifar10` preset, with random weights."""
    from pid_diffusion.networks.edm import EDM_PRESETS, EDMPrecond

    train = resolve("cifar10").train
    model = EDMPrecond(**EDM_PRESETS[CIFAR10_NETWORK])
    ema = EMA(model, train.ema_rates)
    optimizer = train.optimizer.build(model.parameters(), train)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # Allocates RAdam's two moments per parameter.
    optimizer.zero_grad(set_to_none=True)
    return {"step": 1, "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict()}


def _save_child(way: str, path: str) -> None:
    state = _training_state()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Resets VmHWM to the current resident set.
    start = time.perf_counter()
    if way == "in_memory":  # What fileio.atomic_torch_save did before it streamed.
        buffer = io.BytesIO()
        torch.save(state, buffer)
        fileio.atomic_write_bytes(buffer.getvalue(), path)
    else:
        fileio.atomic_torch_save(state, path)
    seconds = time.perf_counter() - start
    print(before, _status_kib("VmHWM"), os.path.getsize(path), seconds)


def save_rows() -> list[tuple[str, str, str]]:
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for way in SAVE_WAYS:
            child = subprocess.run([sys.executable, __file__, "--save-child", way, os.path.join(folder, "c.pt")],
                                   capture_output=True, text=True, check=True)
            before, peak, size, seconds = child.stdout.split()
            results[way] = (int(before) * 1024, int(peak) * 1024, int(size), float(seconds))
    rows = []
    for way in SAVE_WAYS:
        before, peak, size, seconds = results[way]
        rows.append((f"checkpoint save ({way.replace('_', ' ')}), `cifar10` state {size / 2**30:.2f} GiB",
                     f"+{(peak - before) / 2**20:.0f} MiB above {before / 2**30:.2f} GiB resident",
                     f"{seconds:.2f} s"))
    return rows


# ----------------------------------------------------------------------------------------------------------
# Batch drawing.


def _global_then_slice(objective: PIDObjective, seed: int, step: int, batch: int, device: torch.device) -> dict:
    """The former scheme, for rank 0 of RANKS: the whole global batch on a CPU generator, sliced, copied."""
    drawn = objective.sample_batch(torch.Generator().manual_seed(seed * 2**32 + step), batch)
    return {key: value[:batch // RANKS].to(device) for key, value in drawn.items()}


def drawing_rows(device: torch.device, repeats: int) -> list[tuple[str, str, str]]:
    pid = PIDConfig()
    grid = KarrasGrid(pid.num_points, pid.rho, pid.sigma_min, pid.sigma_max)
    objective = PIDObjective(IMAGENET64_SHAPE, grid, L2())
    seed = resolve("imagenet64").train.seed
    rows = []
    for batch in GLOBAL_BATCHES:
        per_rank = batch // RANKS
        times = interleaved({
            "before": lambda: _global_then_slice(objective, seed, 1, batch, device),
            "after": lambda: _rank_share(objective, seed, 1, per_rank, 0, device),
        }, device, repeats)
        rows.append((f"batch drawing per step, global batch {batch}, one of {RANKS} ranks ({per_rank} samples)",
                     f"{times['after'] * 1e3:.2f} ms (own share, on {device.type})",
                     f"{times['before'] * 1e3:.2f} ms (whole batch on the CPU, sliced): "
                     f"{times['before'] / times['after']:.1f}× faster"))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU; default: torch's)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds of the drawing timings")
    parser.add_argument("--out", default=RESULTS, help="results file (default: %(default)s)")
    parser.add_argument("--save-child", nargs=2, metavar=("WAY", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.save_child:
        _save_child(*args.save_child)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu":
        perf.retain_freed_cpu_memory()  # As the training loop does on the CPU (train._apply_speed_options).
    rows = save_rows() + drawing_rows(device, args.repeats)
    machine = describe_machine(device)
    command = "python benchmarks/cluster.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    lines = ["# Cluster benchmark", "", f"Command: `{command.strip()}`", ""]
    lines += [f"- {key}: {value}" for key, value in machine.items()]
    lines += ["", "| measure | result | against |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    fileio.atomic_write_text(text, args.out)


if __name__ == "__main__":
    main()
