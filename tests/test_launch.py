"""The launch of a run: --dry-run under the real launcher, --help from the schema, pid-fetch-weights for
offline machines, and log.txt with plain progress lines in a batch job."""

import os
import shutil
import subprocess
import sys
import urllib.error

import pytest
import torch

from pid_diffusion import inception
from pid_diffusion.utils import hub
from pid_diffusion.cli import distill as distill_cli
from pid_diffusion.cli import fetch_weights
from pid_diffusion.cli.errors import USAGE_STATUS
from pid_diffusion.cli.options import field_docs
from pid_diffusion.config import leaf_fields
from pid_diffusion.distill import DistillConfig, resolve
from pid_diffusion.teacher import load_teacher

from factories import edm_release, write_edm_pickle
from launch import REPO, mpirun, needs_mpirun, subprocess_env

BASE = ["--preset=default", "--run.log_every=1", "--run.image_every=0"]
DEFAULT_BATCH = resolve("default").train.batch
BUNDLED = [*BASE, "--train.steps=2"]


@needs_mpirun
def test_dry_run_under_mpirun_checks_the_batch_split_and_the_run_folder(tmp_path):
    good = mpirun(2, "-m", "pid_diffusion.cli.distill", *BUNDLED, f"--run.dir={tmp_path}", "--dry-run")
    assert good.returncode == 0, good.stderr
    half = DEFAULT_BATCH // 2
    assert f"2 rank(s): global batch {DEFAULT_BATCH} = 2 × {half} per rank, 1 micro-batch(es) of {half}" in good.stderr
    assert f"run folder {tmp_path}: would start at step 0" in good.stderr
    assert not any(tmp_path.iterdir())  # A dry-run writes nothing.

    bad = mpirun(2, "-m", "pid_diffusion.cli.distill", *BUNDLED, f"--run.dir={tmp_path}", "--train.batch=33",
                 "--dry-run")
    assert bad.returncode != 0
    message = "pid-distill: error: train.batch=33 does not split over 2 ranks"
    assert bad.stderr.count(message) == 1 and "Traceback" not in bad.stderr  # One line, from rank 0.


def test_dry_run_says_resume_or_conflict_and_gives_the_runs_own_errors(tmp_path, capsys):
    run = [*BASE, f"--run.dir={tmp_path}"]
    distill_cli.main([*run, "--train.steps=2"])
    capsys.readouterr()
    # The default preset decays its lr: a longer run keeps the stored horizon explicitly (test_schedule.py).
    longer = ["--train.steps=4", "--train.lr_decay_steps=2"]
    distill_cli.main([*run, *longer, "--run.checkpoint_every=1", "--dry-run"])
    report = capsys.readouterr().err
    assert f"would resume from {tmp_path}/checkpoint-00000002.pt at step 2" in report
    assert "changed on resume, may change: run.checkpoint_every: 250 → 1" in report
    assert "teacher model_zoo/edm-shapes-16x16.pt: found" in report

    # A conflict and a missing file: the dry-run's one-line error is the run's.
    for bad in (["--train.lr=0.5"], [f"--teacher.path={tmp_path}/missing.pt"], ["--pid.metric=lpips_piq"]):
        errors = []
        for dry in (["--dry-run"], []):
            with pytest.raises(SystemExit) as exit_info:
                distill_cli.main([*run, *longer, *bad, *dry])
            assert exit_info.value.code == USAGE_STATUS
            errors.append(capsys.readouterr().err.splitlines()[-1])
        assert errors[0] == errors[1] and errors[0].startswith("pid-distill: error: "), errors


def test_help_lists_every_key_with_its_default_and_meaning(capsys):
    with pytest.raises(SystemExit):
        distill_cli.main(["--help"])
    text = capsys.readouterr().out
    for key, section, field in leaf_fields(DistillConfig):
        assert f"--{key}=" in text, key
        assert field_docs(section)[field.name] in text, key
    default_lr = resolve("default").train.lr
    assert ("--train.lr=0.0002\n      Learning rate after warm-up (peak, with a decay). "
            f"[default preset: {default_lr}]") in text
    assert "--train.micro_batch=none" in text and "[resume: may change (same maths, other rounding)]" in text


def test_fetch_weights_downloads_each_file_or_says_where_to_put_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.chdir(tmp_path)
    offline = lambda url, dst, *args, **kwargs: (_ for _ in ()).throw(urllib.error.URLError("offline (simulated)"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(SystemExit) as exit_info:
        fetch_weights.main(["--preset=cifar10"])
    assert exit_info.value.code == 1
    text = capsys.readouterr().out
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    for file in (hub.VGG16_IMAGENET, hub.PIQ_LPIPS_WEIGHTS, inception.DETECTOR):
        assert f"download {file.url}\n      save as  {cache / file.filename}" in text
    assert "download https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl" in text
    assert "then     pid-convert-edm teachers/edm-cifar10-32x32-uncond-vp.pkl teachers/edm-cifar10-32x32-uncond-vp.pt" in text
    assert not (tmp_path / "teachers").exists()

    fetched = []
    bundled = load_teacher(REPO / "model_zoo" / "edm-shapes-16x16.pt")  # stands for the release network
    release = write_edm_pickle(tmp_path / "release.pkl", edm_release(bundled, bundled.init_kwargs))

    def online(url, dst, *args, **kwargs):
        fetched.append(url)
        if url.endswith(".pkl"):
            shutil.copy(release, dst)
        else:
            with open(dst, "wb") as file:
                file.write(b"weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", online)
    fetch_weights.main(["--preset=cifar10"])
    capsys.readouterr()
    assert sorted(os.listdir(cache)) == sorted([hub.VGG16_IMAGENET.filename, hub.PIQ_LPIPS_WEIGHTS.filename,
                                                inception.DETECTOR_FILENAME])
    assert (tmp_path / "teachers" / "edm-cifar10-32x32-uncond-vp.pkl").is_file() and len(fetched) == 4
    # The preset's teacher is the converted .pt: converted from the downloaded .pkl, the same network.
    converted = load_teacher(tmp_path / "teachers" / "edm-cifar10-32x32-uncond-vp.pt")
    assert all(torch.equal(a, b) for a, b in zip(converted.state_dict().values(), bundled.state_dict().values()))
    fetch_weights.main(["--preset=cifar10"])  # Everything present: nothing fetched again.
    assert len(fetched) == 4 and capsys.readouterr().out.count("present  ") == 4


@pytest.mark.slow
def test_a_batch_job_logs_plain_lines_into_log_txt(tmp_path):
    command = [sys.executable, "-m", "pid_diffusion.cli.distill", *BUNDLED, f"--run.dir={tmp_path}"]
    job = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stderr
    log = (tmp_path / "log.txt").read_text()
    assert "\r" not in job.stdout + job.stderr + log  # No progress bar: stdout is a pipe.
    assert "step 1/2 (50.0%)  loss" in job.stdout and "step 2/2 (100.0%)" in log
    assert f"1 rank(s): global batch {DEFAULT_BATCH}" in log and "Training PIDStudent" in log
