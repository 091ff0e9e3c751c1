"""The one-command demo at reduced size on the bundled teacher, and its measuring and drawing pieces."""

import json
import math
from pathlib import Path

import PIL.Image
import pytest
import torch

from pid_diffusion.cli import demo as demo_cli
from pid_diffusion.demo import agreement

BUNDLED_TEACHER = Path(__file__).resolve().parents[1] / "model_zoo" / "edm-shapes-16x16.pt"


def test_agreement_of_a_constant_offset():
    reference = torch.zeros(2, 3, 4, 4)
    rmse, psnr = agreement(reference + 0.2, reference)   # 0.2 in [−1, 1] is 0.1 on the [0, 1] scale
    assert rmse == pytest.approx(0.1) and psnr == pytest.approx(20.0)
    assert agreement(reference, reference) == (0.0, math.inf)


def test_demo_distils_the_bundled_teacher(tmp_path, capsys):
    # The project ships the teacher (model_zoo/): a missing file is a failure, not a skip.
    assert BUNDLED_TEACHER.is_file(), f"the bundled teacher {BUNDLED_TEACHER} is missing from the checkout"
    # The demo's own command at reduced size: fewer steps and images, the default preset otherwise.
    run_dir = tmp_path / "demo"
    demo_cli.main([f"--run.dir={run_dir}", f"--teacher.path={BUNDLED_TEACHER}", "--train.steps=40",
                   "--train.batch=16", "--eval-images=16", "--grid-columns=8", "--run.image_every=0"])

    results = json.loads((run_dir / "demo-results.json").read_text())
    teacher, before, after = results["rows"]
    assert teacher["network_calls"] == 35 and before["network_calls"] == after["network_calls"] == 1
    # Distillation must bring the one-step output much closer to the teacher's Heun output.
    assert after["rmse"] < 0.75 * before["rmse"]
    assert after["psnr"] == pytest.approx(-20 * math.log10(after["rmse"]))
    assert PIL.Image.open(run_dir / "demo.png").size == (2 + 8 * (64 + 2), 3 * (20 + 64 + 2) + 2)
    printed = capsys.readouterr().out
    assert "student distilled" in printed and "FID" in printed
