"""FID without network on the bundled data: `pid-fid-ref --data shapes`, the warning for a detector that is not
EDM's, and "best" printed only where several seed ranges were scored."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from pid_diffusion.cli import fid as fid_cli
from pid_diffusion.cli import fid_ref
from pid_diffusion.fid import load_reference
from pid_diffusion.inception import FEATURE_DIM

from factories import NUM_SEEDS, fid_args, write_detector
from launch import REPO, subprocess_env

NOT_COMPARABLE = "not comparable with published ones"


@pytest.mark.slow  # toydata's command writes the data set as a file
def test_reference_of_the_bundled_data_is_that_of_its_images(tmp_path, capsys):
    # pid-fid-ref writes statistics of the real detector's width: a stand-in of that width, under another name.
    generator = torch.Generator().manual_seed(2)
    detector = write_detector(tmp_path / "detector.pt", torch.randn(3 * 4 * 4, FEATURE_DIM, generator=generator) * 0.1,
                              torch.randn(FEATURE_DIM, generator=generator))
    images = tmp_path / "shapes.npz"  # The same data set written as a file by toydata's own command.
    subprocess.run([sys.executable, "-m", "pid_diffusion.toydata", "--out", str(images)], cwd=REPO,
                   env=subprocess_env(), check=True, capture_output=True)
    for data, dest in (("shapes", "drawn.npz"), (str(images), "from-file.npz")):
        fid_ref.main(["--data", data, "--num-images", "20", "--detector", detector, "--dest", str(tmp_path / dest)])
    drawn, from_file = load_reference(str(tmp_path / "drawn.npz")), load_reference(str(tmp_path / "from-file.npz"))
    assert np.array_equal(drawn[0], from_file[0]) and np.array_equal(drawn[1], from_file[1])
    assert capsys.readouterr().out.count(NOT_COMPARABLE) == 2  # The stand-in detector, once per command.


@pytest.mark.parametrize("run_folder", [(100,)], indirect=True)
def test_best_only_of_several_seed_ranges_and_the_detector_warning(run_folder, capsys):
    fid_cli.main(fid_args(run_folder, "--ema", "0.999"))
    out = capsys.readouterr().out
    assert "best:" not in out  # One seed range: nothing to choose from.
    warnings = [line for line in out.splitlines() if NOT_COMPARABLE in line]
    assert len(warnings) == 1 and "detector.pt" in warnings[0] and "16-d" in warnings[0]

    fid_cli.main([*fid_args(run_folder, "--ema", "0.999"), "--seeds", f"0-{NUM_SEEDS - 1}",
                  f"{NUM_SEEDS}-{2 * NUM_SEEDS - 1}"])
    best = [line for line in capsys.readouterr().out.splitlines() if line.startswith("best:")]
    assert len(best) == 1 and "of 2 ranges" in best[0]
