"""benchmarks/gpu_check.py, the prepared GPU check: its options parse, and without a GPU it says so."""

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402

BUNDLED_TEACHER = Path(__file__).resolve().parents[1] / "model_zoo" / "edm-shapes-16x16.pt"


def test_options_parse():
    args = gpu_check.parse_args(["--architectures", "cifar10", "--variants", "fp32", "bf16", "--skip-tests"])
    assert args.architectures == ["cifar10"] and args.variants == ["fp32", "bf16"] and args.budget_minutes == 8
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--variants", "fp8"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: run the check itself")
def test_without_a_gpu_it_says_so(capsys):
    assert gpu_check.main(["--skip-tests"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_recipe_rows_run_on_a_small_network_on_the_cpu():
    """The recipes' rows (step, derivative error) without the GPU: the bundled teacher stands in for a release."""
    from pid_diffusion.student import PIDStudent
    from pid_diffusion.teacher import load_teacher
    args = gpu_check.parse_args(["--recipes", "bf16-forward-student-fp32", "bf16-forward-rounded"])
    assert args.recipes == ["bf16-forward-student-fp32", "bf16-forward-rounded"]
    assert len(gpu_check.parse_args([]).recipes) == len(gpu_check.RECIPES)
    teacher = load_teacher(str(Path(__file__).resolve().parents[1] / "model_zoo" / "edm-shapes-16x16.pt"))
    cpu = torch.device("cpu")
    errors = {}
    for name in args.recipes:
        student = PIDStudent.from_teacher(teacher, 0.002, 80.0)
        before = [p.detach().clone() for p in student.parameters()]
        gpu_check.recipe_step(teacher, student, gpu_check.RECIPES[name], 2, cpu)()
        assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))  # the step updated
        errors[name] = gpu_check.derivative_error(teacher, student, gpu_check.RECIPES[name], cpu)
    near_eps = {name: float(text.split(" at ")[0]) for name, text in errors.items()}
    assert near_eps["bf16-forward-student-fp32"] == 0  # the student pass is the fp32 pass
    assert near_eps["bf16-forward-rounded"] > 0.1  # a bf16 difference near ε: measured ~1 (docs/precision.md)


# The parts of the new rows that run without a GPU: the sync counter and its verdict, the random-weight
# teacher, and the command rows themselves on the CPU with the bundled default's architecture.


def test_sync_count_counts_torchs_sync_warnings_and_fails_above_one():
    modes = []

    def run():
        for _ in range(3):
            warnings.warn(f"{gpu_check.SYNC_WARNING} (simulated)", UserWarning)
        warnings.warn("another warning", UserWarning)

    assert gpu_check.count_syncs(run, set_mode=modes.append) == 3 and modes == ["warn", "default"]
    short, long = 10, 10 + (gpu_check.SYNC_STEPS[1] - gpu_check.SYNC_STEPS[0])
    assert gpu_check.syncs_per_step(short, long) == 1
    assert gpu_check.sync_status(1).startswith("ok")
    assert gpu_check.sync_status(gpu_check.syncs_per_step(short, long + 1)).startswith("FAIL")


@pytest.mark.slow
def test_the_command_rows_run_the_users_commands(tmp_path):
    """The rows' code path on the CPU: the bundled default's architecture with random weights instead of the
    cifar10 preset's, the same kill, resume, pid-sample, pid-fid and pid-demo, at sizes a CPU takes in seconds
    (pid-fid of 20 images; the demo without FID: three 2048-d square roots cost a CPU minutes)."""
    from pid_diffusion.teacher import load_teacher

    kwargs = load_teacher(BUNDLED_TEACHER).init_kwargs
    with gpu_check.command_files(tmp_path, kwargs) as files:
        assert load_teacher(files["teacher"]).init_kwargs == kwargs
        rows = gpu_check.command_rows(files, "default", batch=2, steps=2, demo_steps=1, fid_images=20,
                                      demo_fid_images=None)
    assert [status.split(":")[0] for _, status, _ in rows] == ["ok"] * 4, rows
    assert "resumed, step 2 written" in rows[0][1]
    assert (tmp_path / "run" / "grid.png").is_file() and (tmp_path / "run" / "fid.csv").is_file()
    assert (tmp_path / "demo" / "demo.png").is_file()
