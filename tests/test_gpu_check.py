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
