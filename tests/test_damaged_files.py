"""Damaged snapshots and training states, through every command that reads them: the launch check and
--dry-run of pid-distill, its resume, pid-fid and pid-sample. Each names the file and the reason in one line,
uses the newest file that loads (pid-fid: records a row with the error), and deletes nothing.

Two kinds of damage: a file cut short (a disk error, an interrupted copy) and a file of another format under a
snapshot's or training state's name (here a PNG)."""

import csv
import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pid_diffusion.training import checkpoint
from pid_diffusion.cli import distill as distill_cli
from pid_diffusion.cli import fid as fid_cli
from pid_diffusion.cli import sample as sample_cli
from pid_diffusion.cli.errors import USAGE_STATUS
from pid_diffusion.fid import save_reference
from pid_diffusion.utils import dist

from launch import JOB_TIMEOUT_S, REPO, subprocess_env
from factories import SMALL_FEATURE_DIM, small_detector

# Two tiny steps of the bundled default, a snapshot and a training state after each.
RUN = ["--preset=default", "--train.batch=2", "--run.log_every=1", "--run.image_every=0", "--run.snapshot_every=1",
       "--run.checkpoint_every=1", "--run.keep_checkpoints=0", "--run.sync_check_every=0",
       "--train.lr_decay_steps=2"]  # The decay of the first run's two steps: the tests extend it to three.
PNG = b"\x89PNG\r\n\x1a\n" + bytes(200)  # A file of another format.
KINDS = ["truncated", "other_format"]


def damage(path, kind: str) -> bytes:
    """Damage `path` in place as `kind` says; returns the damaged bytes."""
    data = open(path, "rb").read()
    data = data[: len(data) // 2] if kind == "truncated" else PNG
    with open(path, "wb") as file:
        file.write(data)
    return data


def reason(kind: str, data: bytes, path) -> str:
    size = {"truncated": len(data), "other_format": len(PNG)}[kind]
    return (f"FileFormatError: {path}: truncated, or not a zip-format torch.save file: no zip end record in its "
            f"{size} bytes")


def listing(folder) -> dict[str, bytes]:
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A run folder of the bundled default after two steps: snapshots and training states 1 and 2."""
    folder = tmp_path_factory.mktemp("two_steps") / "run"
    distill_cli.main([*RUN, "--train.steps=2", f"--run.dir={folder}"])
    return folder


@pytest.fixture
def run(two_steps, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(two_steps, folder)
    return folder


@pytest.mark.parametrize("kind", KINDS)
def test_launch_check_and_dry_run_name_the_damaged_file_resume_from_the_older_and_change_nothing(run, kind, capsys):
    newest = str(run / "checkpoint-00000002.pt")
    data = damage(newest, kind)
    before = listing(run)
    capsys.readouterr()
    distill_cli.main([*RUN, "--train.steps=3", f"--run.dir={run}", "--dry-run"])
    report = capsys.readouterr().err
    assert f"Skipping damaged checkpoint {newest} ({reason(kind, data, newest)})" in report
    assert f"would resume from {run}/checkpoint-00000001.pt at step 1" in report
    assert listing(run) == before  # Nothing moved, nothing deleted.


@pytest.mark.parametrize("kind", KINDS)
def test_resume_skips_the_damaged_newest_moves_it_aside_and_trains_on(run, kind, capsys):
    newest = str(run / "checkpoint-00000002.pt")
    data = damage(newest, kind)
    capsys.readouterr()
    distill_cli.main([*RUN, "--train.steps=3", f"--run.dir={run}"])
    out = capsys.readouterr().out
    note = f"Skipping damaged checkpoint {newest} ({reason(kind, data, newest)})"
    assert f"{note}; the run moves it aside" in out  # The launch check, before anything is loaded ...
    assert f"{note}; moved to {newest}.damaged" in out  # ... and the resume.
    assert f"Resuming from {run}/checkpoint-00000001.pt at step 1" in out
    assert open(newest + ".damaged", "rb").read() == data  # Kept, under another name.
    assert [step for step, _ in checkpoint.find_training_states(str(run))] == [1, 2, 3]


def test_no_loadable_training_state_is_one_line_and_nothing_changes(run, capsys):
    for step in (1, 2):
        damage(run / f"checkpoint-{step:08d}.pt", "truncated")
    before = listing(run)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        distill_cli.main([*RUN, "--train.steps=3", f"--run.dir={run}"])
    assert exit_info.value.code == USAGE_STATUS
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"pid-distill: error: no checkpoint in {run} loads (Skipping damaged")
    assert listing(run) == before


@pytest.mark.slow
def test_the_issues_report_truncated_newest_then_more_steps(run):
    """The report of issue 21 through `python -m pid_diffusion.cli.distill`: the newest training state cut to
    4096 bytes, then the same run with more steps: it resumes from the one before and finishes."""
    newest = run / "checkpoint-00000002.pt"
    data = open(newest, "rb").read()[:4096]
    newest.write_bytes(data)
    job = subprocess.run([sys.executable, "-m", "pid_diffusion.cli.distill", *RUN, "--train.steps=3",
                          f"--run.dir={run}"], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                         timeout=JOB_TIMEOUT_S)
    assert job.returncode == 0, job.stderr
    assert (f"Skipping damaged checkpoint {newest} (FileFormatError: {newest}: truncated, or not a zip-format "
            f"torch.save file: no zip end record in its 4096 bytes); moved to {newest}.damaged") in job.stdout
    assert (run / "checkpoint-00000003.pt").is_file() and (run / "checkpoint-00000002.pt.damaged").read_bytes() == data


@pytest.mark.parametrize("kind", KINDS)
def test_pid_fid_skips_a_damaged_snapshot_with_a_row_and_scores_the_others(run, kind, tmp_path, capsys):
    damaged = str(run / "snapshot-00000002.pt")
    data = damage(damaged, kind)
    before = listing(run)
    save_reference(str(tmp_path / "ref.npz"), np.zeros(SMALL_FEATURE_DIM), np.eye(SMALL_FEATURE_DIM))
    table = tmp_path / "fid.csv"
    capsys.readouterr()
    fid_cli.main(["--run", str(run), "--ref", str(tmp_path / "ref.npz"), "--detector",
                  small_detector(tmp_path / "detector.pt"), "--csv", str(table), "--plot", str(tmp_path / "fid.png"),
                  "--seeds", "0-9", "--batch", "10", "--ema", "none"])
    dist.shutdown()
    out = capsys.readouterr().out
    assert f"Skipping damaged snapshot {damaged} ({reason(kind, data, damaged)}); its row in {table} records why" in out
    rows = list(csv.DictReader(io.StringIO(table.read_text())))
    by_file = {row["checkpoint"]: row for row in rows}
    assert by_file["snapshot-00000001.pt"]["fid"] and not by_file["snapshot-00000001.pt"]["error"]
    assert not by_file["snapshot-00000002.pt"]["fid"]
    assert reason(kind, data, damaged) in by_file["snapshot-00000002.pt"]["error"]
    assert listing(run) == before


@pytest.mark.parametrize("kind", KINDS)
def test_pid_sample_names_a_damaged_file_and_takes_a_run_folders_newest_loadable_one(run, kind, tmp_path, capsys):
    damaged = str(run / "snapshot-00000002.pt")
    data = damage(damaged, kind)
    damage(run / "checkpoint-00000002.pt", kind)
    before = listing(run)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        sample_cli.main(["--checkpoint", damaged, "--seeds", "0-1", "--grid", str(tmp_path / "a.png")])
    assert exit_info.value.code == USAGE_STATUS
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"pid-sample: error: {damaged} does not load ({reason(kind, data, damaged)})")
    assert "the run folder itself to use its newest loadable one" in err[0]

    sample_cli.main(["--checkpoint", str(run), "--seeds", "0-1", "--grid", str(tmp_path / "b.png")])
    dist.shutdown()
    out = capsys.readouterr().out
    assert f"Skipping damaged snapshot {damaged} ({reason(kind, data, damaged)})" in out
    assert f"Skipping damaged checkpoint {run}/checkpoint-00000002.pt" in out
    assert f"Sampling {run}/snapshot-00000001.pt" in out
    assert (tmp_path / "b.png").is_file() and not (tmp_path / "a.png").exists()
    assert listing(run) == before
