"""benchmarks/gpu_check.py, the prepared GPU check: its options parse, and without a GPU it says so."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402


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
