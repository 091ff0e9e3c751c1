"""Disk space, through pid-distill: the launch check and --dry-run say what the run will write over its length
and the free space where it writes, warn (naming run.snapshot_every / run.keep_snapshots) when it will not fit,
and a write that fails for lack of space ends the run with the newest complete training state intact."""

import errno
import os
import shutil

import pytest
import torch

from pid_diffusion import teacher_training
from pid_diffusion.training import checkpoint, disk_plan
from pid_diffusion.cli import distill as distill_cli
from pid_diffusion.cli import train_teacher as train_teacher_cli
from pid_diffusion.cli.errors import USAGE_STATUS
from pid_diffusion.distill import resolve
from pid_diffusion.networks.edm import EDM_PRESETS, EDMPrecond
from pid_diffusion.utils import fileio

from launch import REPO
from factories import write_lpips_standins

BUNDLED_TEACHER = REPO / "model_zoo" / "edm-shapes-16x16.pt"
RUN = ["--preset=default", "--train.batch=2", "--run.log_every=1", "--run.image_every=0", "--run.snapshot_every=1",
       "--run.checkpoint_every=1", "--run.keep_checkpoints=2", "--run.sync_check_every=0"]


def no_space() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_the_estimate_before_a_run_is_the_size_of_what_it_writes(tmp_path, capsys):
    """The estimate from the teacher file (a fresh folder) against the files the run then writes."""
    run = tmp_path / "run"
    distill_cli.main([*RUN, "--train.steps=3", f"--run.dir={run}", "--dry-run"])
    report = capsys.readouterr().err
    estimate = disk_plan.plan(resolve("default", {"run.dir": str(run), "train.steps": "3", "run.snapshot_every": "1",
                                                  "run.checkpoint_every": "1"}), os.path.getsize(BUNDLED_TEACHER))
    assert not estimate.measured and estimate.snapshots == 3 and estimate.states == 3
    assert f"disk: 3 snapshot(s) × {disk_plan._size(estimate.snapshot_bytes)} (run.snapshot_every=1, all kept)" in report
    assert "free" in report and "warning" not in report

    distill_cli.main([*RUN, "--train.steps=3", f"--run.dir={run}"])
    snapshot = os.path.getsize(checkpoint.snapshot_path(str(run), 3))
    state = os.path.getsize(checkpoint.training_state_path(str(run), 3))
    # The teacher file holds one network's weights (and a little metadata): the estimate is within 0.5 %.
    assert estimate.snapshot_bytes == pytest.approx(snapshot, rel=5e-3)
    assert estimate.state_bytes == pytest.approx(state, rel=5e-3)


def test_the_cifar10_preset_says_it_keeps_80_snapshots_and_warns_when_they_do_not_fit(tmp_path, monkeypatch, capsys):
    """The paper's preset: 800k steps, a snapshot every 10k, all kept. Its teacher here is a sparse file of the
    converted release's size (one float32 network of the DDPM++ architecture); nothing is loaded."""
    with torch.device("meta"):
        network = EDMPrecond(**EDM_PRESETS["edm-cifar10-32x32-uncond-vp"])
    weights = sum(t.numel() * t.element_size() for t in network.state_dict().values())
    teacher = tmp_path / "teacher.pt"
    with open(teacher, "wb") as file:
        file.truncate(weights)  # Sparse: takes no disk.
    home = tmp_path / "torch_home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    write_lpips_standins(home / "hub" / "checkpoints")
    monkeypatch.setenv("TORCH_HOME", str(home))
    run = ["--preset=cifar10", f"--teacher.path={teacher}", f"--run.dir={tmp_path / 'run'}", "--dry-run"]

    distill_cli.main(run)
    report = capsys.readouterr().err
    snapshot = disk_plan._size(4 * weights)  # The model and three EMAs.
    assert f"disk: 80 snapshot(s) × {snapshot} (run.snapshot_every=10000, all kept) + 3 training state(s) × " \
           f"{disk_plan._size(6 * weights)}" in report
    assert 4 * weights == pytest.approx(0.89e9, rel=5e-3)  # The 0.89 GB per snapshot ...
    assert 80 * 4 * weights == pytest.approx(71e9, rel=5e-3)  # ... and 71 GB for all 80.

    free = 20 * 10**9
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=free))
    distill_cli.main(run)
    report = capsys.readouterr().err
    peak = disk_plan._size(80 * 4 * weights + 3 * 6 * weights)
    assert f"= {peak} at the run's peak" in report and f"{disk_plan._size(free)} free" in report
    assert (f"warning: the run will write {peak} more to {tmp_path / 'run'} than the 20 GB free there: keep fewer "
            "snapshots (run.keep_snapshots=0) or write them less often (run.snapshot_every=10000)") in report

    distill_cli.main([*run, "--run.keep_snapshots=10"])  # Ten snapshots fit.
    report = capsys.readouterr().err
    assert "disk: 10 snapshot(s)" in report and "warning" not in report


def full_disk_at(monkeypatch, target: str) -> None:
    """Make the atomic writer fail for lack of space on `target` after part of it was written."""
    real = fileio.atomic_write

    class Full:
        def __init__(self, path):
            self.path, self.context = str(path), real(path)

        def __enter__(self):
            file = self.context.__enter__()
            if self.path == target:
                file.write(b"partial")
                error = no_space()
                self.context.__exit__(OSError, error, None)  # The writer cleans up as after a failed write.
                raise error
            return file

        def __exit__(self, *exc):
            return self.context.__exit__(*exc)

    monkeypatch.setattr(fileio, "atomic_write", Full)


@pytest.mark.parametrize("target", ["snapshot", "checkpoint", "metrics"])
def test_a_full_disk_ends_the_run_with_the_last_training_state_intact_and_says_so(tmp_path, monkeypatch, capsys, target):
    run = tmp_path / "run"
    path = {"snapshot": checkpoint.snapshot_path(str(run), 2), "checkpoint": checkpoint.training_state_path(str(run), 2),
            "metrics": str(run / "metrics.jsonl")}[target]
    written = []
    if target == "metrics":  # Its second write (step 2's record): the first creates it.
        real = fileio.atomic_write_text
        monkeypatch.setattr(fileio, "atomic_write_text", lambda text, where: (
            written.append(str(where)), real(text, where) if written.count(path) < 2 else (_ for _ in ()).throw(no_space())))
    else:
        full_disk_at(monkeypatch, path)
    with pytest.raises(SystemExit) as exit_info:
        distill_cli.main([*RUN, "--train.steps=3", f"--run.dir={run}"])
    monkeypatch.undo()
    assert exit_info.value.code == USAGE_STATUS
    err = capsys.readouterr().err.strip().splitlines()
    intact = checkpoint.training_state_path(str(run), 1)
    what = f"{target} {path}" if target != "metrics" else f"to {run}"
    assert len(err) == 1 and err[0].startswith(
        f"pid-distill: error: could not write {what} (OSError: [Errno 28] No space left on device); nothing was "
        f"left in its place and the newest complete training state, {intact}, is intact. Free space on that disk, "
        "or keep fewer snapshots (run.keep_snapshots) or write them less often (run.snapshot_every), then re-run "
        "the same command to resume"), err
    assert not [name for name in os.listdir(run) if name.endswith(fileio.TEMP_SUFFIX)]
    assert checkpoint.read_training_state(intact)["step"] == 1
    if target == "checkpoint":
        assert not os.path.exists(path)

    distill_cli.main([*RUN, "--train.steps=3", f"--run.dir={run}"])  # Space again: the same command resumes.
    assert f"Resuming from {intact}" in capsys.readouterr().out
    assert checkpoint.latest_training_state(str(run))[0] == 3


# pid-train-teacher: the same launch check, its network's size counted on the meta device (no teacher file to
# measure), its power-function EMAs counted as averages.
TEACHER_RUN = ["--train.batch=2", "--data.num_images=8", "--run.log_every=1", "--run.image_every=0",
               "--run.snapshot_every=1", "--run.checkpoint_every=1", "--run.keep_checkpoints=2",
               "--train.ema_rates=0.999", "--train.phema_stds=0.05"]


def test_pid_train_teacher_estimates_what_it_writes_and_warns_when_it_will_not_fit(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    train_teacher_cli.main([*TEACHER_RUN, "--train.steps=3", f"--run.dir={run}", "--dry-run"])
    report = capsys.readouterr().err
    assert "launch check:" in report and f"run folder {run}: would start at step 0" in report
    config = teacher_training.resolve("default", {"run.dir": str(run), "train.steps": "3", "run.snapshot_every": "1",
                                                  "run.checkpoint_every": "1", "run.keep_checkpoints": "2",
                                                  "train.ema_rates": "0.999", "train.phema_stds": "0.05"})
    weights, source = teacher_training.network_size(config)
    estimate = disk_plan.plan(config, weights)
    assert not estimate.measured and estimate.snapshots == 3 and estimate.states == 3
    assert (f"disk: 3 snapshot(s) × {disk_plan._size(estimate.snapshot_bytes)} (run.snapshot_every=1, all kept) + "
            f"3 training state(s) × {disk_plan._size(estimate.state_bytes)}") in report and source in report
    assert not run.exists()  # A dry-run writes nothing.

    train_teacher_cli.main([*TEACHER_RUN, "--train.steps=3", f"--run.dir={run}"])
    assert "disk: 3 snapshot(s)" in (run / "log.txt").read_text()  # The run prints the check too.
    # The model, its EMA and its power-function EMA (and Adam's two moments): the estimate counts their tensors'
    # bytes, not the zip record torch.save adds per tensor (about 340 B: 1.3 % of a snapshot of this 1.2 M-parameter
    # network of 196 tensors, less for larger ones), so it is within 2 % here, and below the files.
    for written, estimated in ((checkpoint.snapshot_path(str(run), 3), estimate.snapshot_bytes),
                               (checkpoint.training_state_path(str(run), 3), estimate.state_bytes)):
        assert estimated == pytest.approx(os.path.getsize(written), rel=2e-2) and estimated < os.path.getsize(written)

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10**6))
    longer = tmp_path / "longer"
    train_teacher_cli.main([*TEACHER_RUN, "--train.steps=100", f"--run.dir={longer}", "--dry-run"])
    report = capsys.readouterr().err
    assert (f"than the 1 MB free there: keep fewer snapshots (run.keep_snapshots=0) or write them less often "
            "(run.snapshot_every=1)") in report
