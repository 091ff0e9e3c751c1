"""Precision recipes (docs/precision.md): the check refuses a 16-bit finite difference unless it is named, each
recipe reaches the student's passes, the safe ones train through pid-distill, and the benchmark runs at its
smallest size without touching docs/."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pid_diffusion import precision
from pid_diffusion.config import ConfigError, Precision
from pid_diffusion.distill import build, resolve
from pid_diffusion.grid import KarrasGrid
from pid_diffusion.loss import Derivative, StudentPrecision, trajectory_and_derivative
from pid_diffusion.student import PIDStudent
from pid_diffusion.teacher import load_teacher

from launch import JOB_TIMEOUT_S, subprocess_env

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "model_zoo" / "edm-shapes-16x16.pt"
TINY = ["--preset=default", "--train.steps=2", "--train.batch=2", "--pid.num_points=10", "--run.image_every=0",
        "--run.snapshot_every=0", "--run.log_every=1"]
SAFE_WORDS = ("pid.student_precision=fp32", "pid.derivative=jvp", "train.precision=fp32",
              "pid.student_precision=train_rounded_difference")


@pytest.mark.parametrize("precision_, derivative, student", list(itertools.product(Precision, Derivative,
                                                                                     StudentPrecision)))
def test_only_an_unnamed_16_bit_difference_is_refused(precision_, derivative, student):
    unsafe = (precision_ is not Precision.FP32 and derivative is not Derivative.JVP
              and student is StudentPrecision.TRAIN)
    overrides = {"train.precision": precision_.value, "pid.derivative": derivative.value,
                 "pid.student_precision": student.value}
    if unsafe:
        with pytest.raises(ConfigError, match="pid.student_precision: .*differences two") as error:
            resolve("default", overrides)
        assert all(word in str(error.value) for word in SAFE_WORDS)
    else:
        assert resolve("default", overrides).pid.student_precision is student


@pytest.fixture(scope="module")
def networks():
    teacher = load_teacher(str(TEACHER))
    return teacher, PIDStudent.from_teacher(teacher, 0.002, 80.0).eval()


def _student_side(student, recipe: precision.Recipe) -> torch.Tensor:
    grid = KarrasGrid(40, 7.0, 0.002, 80.0)
    z = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 80
    with torch.no_grad(), recipe.autocast("cpu"):
        return trajectory_and_derivative(student, z, torch.tensor([30, 38]), grid=grid, derivative=recipe.derivative,
                                         student_precision=recipe.student_precision)[1]


def test_student_precision_fp32_leaves_the_autocast_and_train_stays_in_it(networks):
    _, student = networks
    fp32 = _student_side(student, precision.Recipe(Precision.FP32, Derivative.FORWARD))
    mixed = _student_side(student, precision.Recipe(Precision.BF16, Derivative.FORWARD, StudentPrecision.FP32))
    rounded = _student_side(student, precision.Recipe(Precision.BF16, Derivative.FORWARD,
                                                      StudentPrecision.TRAIN_ROUNDED_DIFFERENCE))
    assert torch.equal(mixed, fp32)
    assert (rounded - fp32).norm() > 1e-3 * fp32.norm()  # measured 0.5 of it near ε at N = 40


def test_build_passes_the_recipe_to_the_objective_and_the_student_has_no_fp16_path():
    config = resolve("default", {"train.precision": "bf16", "pid.student_precision": "fp32"})
    objective, student = build(config, torch.device("cpu"))
    assert objective.student_precision is StudentPrecision.FP32 and not student.use_fp16


def test_errors_measure_rounding_against_float64(networks):
    teacher, student = networks
    grid = KarrasGrid(40, 7.0, 0.002, 80.0)
    z = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 80
    ref = precision.reference(student, teacher, z, grid.num_points - 2, grid)
    fp32 = precision.errors(student, teacher, z, grid.num_points - 2, grid,
                            precision.Recipe(Precision.FP32, Derivative.FORWARD), ref)
    bf16 = precision.errors(student, teacher, z, grid.num_points - 2, grid,
                            precision.Recipe(Precision.BF16, Derivative.FORWARD,
                                             StudentPrecision.TRAIN_ROUNDED_DIFFERENCE), ref)
    jvp = precision.errors(student, teacher, z, grid.num_points - 2, grid,
                           precision.Recipe(Precision.BF16, Derivative.JVP), ref)
    assert fp32.derivative < 1e-3 and fp32.truncation > 10 * fp32.term  # float32: truncation dominates
    assert bf16.derivative > 100 * fp32.derivative and bf16.term > bf16.truncation  # bf16: rounding dominates
    assert jvp.truncation == 0 and jvp.derivative < bf16.derivative / 5


def _distill(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pid_diffusion.cli.distill", *TINY, f"--run.dir={tmp_path}",
                           *overrides], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=JOB_TIMEOUT_S)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [
    ["--train.precision=bf16", "--pid.student_precision=fp32"],
    ["--train.precision=fp16", "--pid.student_precision=fp32", "--pid.derivative=central"],
    ["--train.precision=bf16", "--pid.derivative=jvp"],
    ["--train.precision=bf16", "--pid.student_precision=train_rounded_difference"],
], ids=["bf16-student-fp32", "fp16-central-student-fp32", "bf16-jvp", "bf16-named-rounded"])
def test_recipes_train_through_pid_distill(tmp_path, recipe):
    result = _distill(tmp_path, *recipe)
    assert result.returncode == 0, result.stderr[-2000:]
    stored = json.loads((tmp_path / "config.json").read_text())
    for option in recipe:
        section, key = option[2:].split("=")[0].split(".")
        assert stored[section][key] == option.split("=")[1]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["loss"] > 0 for r in records)


@pytest.mark.slow
def test_pid_distill_refuses_a_16_bit_difference_with_one_line(tmp_path):
    result = _distill(tmp_path, "--train.precision=bf16")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert line.startswith("pid-distill: error: pid.student_precision: train.precision=bf16 with pid.derivative=forward")
    assert all(word in line for word in SAFE_WORDS) and not (tmp_path / "config.json").exists()


@pytest.mark.slow
def test_benchmark_smallest_size_writes_out_not_docs(tmp_path):
    docs = {path: path.read_bytes() for path in (REPO / "docs").rglob("*") if path.is_file()}
    out = tmp_path / "out"
    subprocess.run([sys.executable, "benchmarks/precision.py", "--models", "bundled", "--num-points", "10",
                    "--times", "0.01", "--latents", "1", "--train-steps", "1", "--train-batch", "2",
                    "--eval-images", "2", "--out", str(out)], cwd=REPO, env=subprocess_env(), check=True,
                   capture_output=True, timeout=JOB_TIMEOUT_S)
    assert {path: path.read_bytes() for path in (REPO / "docs").rglob("*") if path.is_file()} == docs
    results = json.loads((out / "precision.json").read_text())
    names = [row["recipe"] for row in results["derivatives"]]  # one t_i: every precision × scheme, 4 mixed
    assert len(names) == len(set(names)) == 13 and "fp16 central, student fp32" in names
    assert [r["recipe"] for r in results["training"]] == ["fp32 forward", "bf16 forward, rounded", "bf16 jvp",
                                                          "bf16 forward, student fp32"]
    page = (out / "precision.md").read_text()
    assert "| bf16 forward, rounded |" in page and "accepted by name only" in page and "refused" not in page
    for figure in ("bundled-n10.png", "training.png"):
        assert (out / "precision" / figure).read_bytes().startswith(b"\x89PNG")
