"""The one-command demo at reduced size on the bundled teacher, and its measuring and drawing pieces."""

import json
import math
import re
from pathlib import Path

import numpy as np

import PIL.Image
import pytest
import torch

from pid_diffusion.cli import demo as demo_cli
from pid_diffusion.cli import sample as sample_cli
from pid_diffusion.demo import DemoOptions, agreement

REPO = Path(__file__).resolve().parents[1]
BUNDLED_TEACHER = REPO / "model_zoo" / "edm-shapes-16x16.pt"
ZOO_STUDENT = REPO / "model_zoo" / "pid-shapes-16x16.pt"
ZOO_CARD = REPO / "model_zoo" / "README.md"
# The card's PSNR is printed to two decimals; float and uint8 measurements of the same images agree to 0.01 dB.
ZOO_PSNR_TOLERANCE_DB = 0.02


def zoo_card_psnr() -> float:
    """The PSNR to the teacher that model_zoo/README.md states for the zoo student."""
    found = re.search(r"PSNR to the teacher's Heun output: \*\*([0-9.]+) dB\*\*", ZOO_CARD.read_text())
    assert found, f"{ZOO_CARD} states no 'PSNR to the teacher's Heun output: **<x> dB**'"
    return float(found.group(1))


@pytest.mark.slow  # two pid-sample commands
def test_the_zoo_student_agrees_with_the_teacher_as_its_card_says(tmp_path, monkeypatch):
    """A regression test of model_zoo/pid-shapes-16x16.pt through pid-sample: its one-step images against the
    teacher's Heun images from the same seeds (the demo's held-out latents), as the card measures them."""
    assert ZOO_STUDENT.is_file(), f"the zoo student {ZOO_STUDENT} is missing from the checkout"
    options = DemoOptions()
    seeds = f"{options.eval_seed}-{options.eval_seed + options.eval_images - 1}"
    sample_cli.main(["--checkpoint", str(ZOO_STUDENT), "--seeds", seeds, "--npz", str(tmp_path / "student.npz")])
    sample_cli.main(["--teacher", str(BUNDLED_TEACHER), "--sampler", "heun", "--steps", "18", "--seeds", seeds,
                     "--npz", str(tmp_path / "teacher.npz")])
    student, teacher = (np.load(tmp_path / f"{name}.npz")["images"].astype(np.float64) / 255
                        for name in ("student", "teacher"))
    psnr = -20 * math.log10(math.sqrt(np.mean((student - teacher) ** 2)))
    assert psnr == pytest.approx(zoo_card_psnr(), abs=ZOO_PSNR_TOLERANCE_DB)


def test_agreement_of_a_constant_offset():
    reference = torch.zeros(2, 3, 4, 4)
    rmse, psnr = agreement(reference + 0.2, reference)   # 0.2 in [−1, 1] is 0.1 on the [0, 1] scale
    assert rmse == pytest.approx(0.1) and psnr == pytest.approx(20.0)
    assert agreement(reference, reference) == (0.0, math.inf)


@pytest.mark.slow  # the user's main job, a distillation included
def test_demo_distils_the_bundled_teacher(tmp_path, capsys):
    # The project ships the teacher (model_zoo/): a missing file is a failure, not a skip.
    assert BUNDLED_TEACHER.is_file(), f"the bundled teacher {BUNDLED_TEACHER} is missing from the checkout"
    # The demo's own command at reduced size: fewer steps and images, the default preset otherwise.
    run_dir = tmp_path / "demo"
    demo_cli.main([f"--run.dir={run_dir}", f"--teacher.path={BUNDLED_TEACHER}", "--train.steps=40",
                   "--train.batch=16", "--eval-images=16", "--grid-columns=8", "--run.image_every=0"])

    results = json.loads((run_dir / "demo-results.json").read_text())
    teacher, before, after, zoo = results["rows"]  # The model_zoo student's row: its file is of this teacher.
    # On these 16 latents (the card measures 64: test_the_zoo_student_agrees_...) the zoo student, distilled
    # for 1500 steps of 32, must agree with the teacher far better than this 40-step run.
    assert zoo["network_calls"] == 1 and zoo["psnr"] > after["psnr"] + 3
    assert teacher["network_calls"] == 35 and before["network_calls"] == after["network_calls"] == 1
    # Distillation must bring the one-step output much closer to the teacher's Heun output.
    assert after["rmse"] < 0.75 * before["rmse"]
    assert after["psnr"] == pytest.approx(-20 * math.log10(after["rmse"]))
    assert PIL.Image.open(run_dir / "demo.png").size == (2 + 8 * (64 + 2), 3 * (20 + 64 + 2) + 2)
    printed = capsys.readouterr().out
    assert "student distilled" in printed and "FID" in printed
    assert "disk: 1 snapshot(s)" in printed  # pid-distill's launch check, printed by the run as by pid-distill


def test_demo_dry_run_gives_pid_distills_launch_check_and_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "demo"
    demo_cli.main([f"--run.dir={run_dir}", "--train.steps=40", "--run.snapshot_every=10", "--dry-run"])
    report = capsys.readouterr().err
    assert report.startswith("launch check:") and f"run folder {run_dir}: would start at step 0" in report
    assert f"teacher {BUNDLED_TEACHER.relative_to(REPO)}: found" in report
    assert "disk: 4 snapshot(s)" in report and "free" in report
    assert not run_dir.exists()
