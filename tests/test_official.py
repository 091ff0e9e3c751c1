"""The official PID code's files through pid-sample, pid-fid and pid-distill (pid_diffusion/official.py).

An official run folder (`model%06d.pt` with the `model.` prefix, `ema_<rate>_%06d.pt` without it, `opt%06d.pt`,
the logs) written here holds a full-size CIFAR-10 DDPM++ student with random weights; its samples and scores
must equal those of the same weights saved as this project's snapshot. The smaller tests register a 16×16
preset (in-process commands) for the errors, a single file's row, and `student.init=file`.
"""

import csv
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pid_diffusion.training import checkpoint
from pid_diffusion.cli import distill as distill_cli
from pid_diffusion.cli import fid as fid_cli
from pid_diffusion.cli import sample as sample_cli
from pid_diffusion.fid import save_reference
from pid_diffusion.grid import SIGMA_MAX, SIGMA_MIN
from pid_diffusion.networks import edm
from pid_diffusion.student import PIDStudent
from pid_diffusion.teacher import load_teacher
from pid_diffusion.utils import fileio

from factories import DETECTOR_POOL, SMALL_FEATURE_DIM, small_detector, write_detector
from launch import subprocess_env

REPO = Path(__file__).resolve().parents[1]
RELEASE_PRESET = "edm-cifar10-32x32-uncond-vp"  # The paper's CIFAR-10 student (pid_cifar.pt).
SMALL_PRESET = "test-official-16x16"  # The bundled teacher's architecture, registered by the small tests.
BUNDLED_TEACHER = REPO / "model_zoo" / "edm-shapes-16x16.pt"
EMA = "0.9999"
STEP = 10
WEIGHT_NOISE = 0.05  # Moves every weight (EDM zero-initialises the output layers) so the images vary.
JOB_TIMEOUT_S = 900  # A guard against a hung job, far above its normal duration.


def random_weights(student: PIDStudent, seed: int) -> dict[str, torch.Tensor]:
    """The raw network's state dict (EDM names), every tensor moved by seeded noise."""
    generator = torch.Generator().manual_seed(seed)
    return {key: value + WEIGHT_NOISE * torch.randn(value.shape, generator=generator)
            for key, value in student.model.state_dict().items()}


def write_official_run(folder: Path, trained: dict, averaged: dict) -> None:
    """The official trainer's files of one step: both key spellings, an optimizer state, the logs."""
    folder.mkdir(parents=True)
    torch.save({f"model.{key}": value for key, value in trained.items()}, folder / f"model{STEP:06d}.pt")
    torch.save(averaged, folder / f"ema_{EMA}_{STEP:06d}.pt")
    torch.save({"state": {}, "param_groups": [{"lr": 2e-4, "params": [0]}]}, folder / f"opt{STEP:06d}.pt")
    (folder / "progress.csv").write_text("step,loss\n10,0.5\n")
    (folder / "log.txt").write_text("official log\n")


def write_snapshot(folder: Path, student: PIDStudent, trained: dict, averaged: dict) -> None:
    """The same weights as this project's snapshot (ARCHITECTURE.md's layout)."""
    folder.mkdir(parents=True)
    prefixed = lambda weights: {f"model.{key}": value for key, value in weights.items()}  # noqa: E731
    fileio.atomic_torch_save(dict(step=STEP, config=None, model_spec=checkpoint.model_spec(student),
                                  model=prefixed(trained), ema={EMA: prefixed(averaged)}),
                             str(checkpoint.snapshot_path(str(folder), STEP)))


def read_rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def command(module: str, *arguments: str) -> str:
    """`python -m pid_diffusion.cli.<module>`, as a user runs it; the output on success."""
    result = subprocess.run([sys.executable, "-m", f"pid_diffusion.cli.{module}", *map(str, arguments)], cwd=REPO,
                            env=subprocess_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


@pytest.mark.release
def test_official_run_folder_samples_and_scores_as_the_same_weights_in_a_snapshot(tmp_path):
    """Full-size CIFAR-10 DDPM++: pid-sample of each official file equals pid-sample of the snapshot's weights,
    and pid-fid --run over the official folder writes the rows (and plot) of the snapshot's run folder."""
    torch.manual_seed(0)
    student = PIDStudent({**edm.EDM_PRESETS[RELEASE_PRESET], "dropout": 0.0}, SIGMA_MIN, SIGMA_MAX, 0.5)
    trained, averaged = random_weights(student, 1), random_weights(student, 2)
    official, ours = tmp_path / "official", tmp_path / "ours"
    write_official_run(official, trained, averaged)
    write_snapshot(ours, student, trained, averaged)
    del student, trained, averaged
    snapshot = checkpoint.snapshot_path(str(ours), STEP)

    # Samples: the trained weights (prefixed keys) and the EMA (plain keys), each equal to the snapshot's.
    preset = ["--preset", RELEASE_PRESET]
    images = {}
    for tag, source in (("model", [official / f"model{STEP:06d}.pt", *preset]),
                        ("ema", [official / f"ema_{EMA}_{STEP:06d}.pt", *preset]),
                        ("snapshot-model", [snapshot]), ("snapshot-ema", [snapshot, "--ema", EMA])):
        npz = tmp_path / f"{tag}.npz"
        command("sample", "--checkpoint", *source, "--seeds", "0-3", "--batch", "4", "--npz", npz)
        images[tag] = np.load(npz)["images"]
    assert np.array_equal(images["model"], images["snapshot-model"])
    assert np.array_equal(images["ema"], images["snapshot-ema"])
    assert not np.array_equal(images["model"], images["ema"])
    assert images["model"].shape == (4, 32, 32, 3) and images["model"].std() > 10  # not a flat grey

    # Scores: every file of the official folder (opt*.pt and the logs ignored), as the snapshot's run.
    generator = torch.Generator().manual_seed(1)
    detector = write_detector(tmp_path / "detector.pt",
                              torch.randn(3 * (32 // DETECTOR_POOL) ** 2, SMALL_FEATURE_DIM, generator=generator) * 0.1,
                              torch.randn(SMALL_FEATURE_DIM, generator=generator))
    reference = tmp_path / "reference.npz"
    save_reference(str(reference), np.zeros(SMALL_FEATURE_DIM), np.eye(SMALL_FEATURE_DIM))
    score = ["--ref", reference, "--detector", detector, "--seeds", "0-9", "--batch", "5"]
    command("fid", "--run", official, *preset, *score)
    command("fid", "--run", ours, *score)
    rows = {row["ema"]: row for row in read_rows(official / "fid.csv")}
    expected = {row["ema"]: row for row in read_rows(ours / "fid.csv")}
    assert rows.keys() == expected.keys() == {"none", EMA}
    assert rows["none"]["checkpoint"] == f"model{STEP:06d}.pt"
    assert rows[EMA]["checkpoint"] == f"ema_{EMA}_{STEP:06d}.pt"
    for weights, row in rows.items():
        assert not row["error"] and row["step"] == str(STEP)
        for column in ("fid", "is_mean", "is_std", "sampler", "num_samples"):
            assert row[column] == expected[weights][column], (weights, column)
    assert (official / "fid.png").stat().st_size > 0


# ----------------------------------------------------------------------------------------------------------
# The small tests: a 16×16 preset registered in this process.


@pytest.fixture
def small_official(tmp_path, monkeypatch) -> dict:
    """The bundled teacher's network as an official student file of preset SMALL_PRESET, a reference and a
    stand-in detector."""
    teacher = load_teacher(BUNDLED_TEACHER)
    monkeypatch.setitem(edm.EDM_PRESETS, SMALL_PRESET, {**teacher.init_kwargs, "augment_dim": 0})
    student = PIDStudent.from_teacher(teacher, SIGMA_MIN, SIGMA_MAX)
    weights = random_weights(student, 3)
    run = tmp_path / "official"
    write_official_run(run, weights, random_weights(student, 4))
    save_reference(str(tmp_path / "ref.npz"), np.zeros(SMALL_FEATURE_DIM), np.eye(SMALL_FEATURE_DIM))
    return dict(run=run, weights=weights, teacher=teacher, ref=str(tmp_path / "ref.npz"),
                detector=small_detector(tmp_path / "detector.pt"))


def test_a_released_file_is_scored_as_its_run_folder_row(small_official, tmp_path):
    run, released = small_official["run"], tmp_path / "pid_cifar.pt"
    torch.save(small_official["weights"], released)  # A released file: no step or weights in its name.
    score = ["--preset", SMALL_PRESET, "--ref", small_official["ref"], "--detector", small_official["detector"],
             "--seeds", "0-9", "--batch", "10"]
    fid_cli.main(["--run", str(run), "--ema", "none", *score])
    fid_cli.main(["--checkpoint", str(released), "--csv", str(tmp_path / "released.csv"), *score])
    (row,) = read_rows(run / "fid.csv")
    (released_row,) = read_rows(tmp_path / "released.csv")
    assert (row["checkpoint"], row["ema"], row["step"]) == (f"model{STEP:06d}.pt", "none", str(STEP))
    assert (released_row["checkpoint"], released_row["ema"], released_row["step"]) == ("pid_cifar.pt", "", "")
    assert released_row["fid"] == row["fid"] and released_row["is_mean"] == row["is_mean"]


def test_official_files_refused_with_one_line_naming_the_problem(small_official, tmp_path, capsys):
    run = small_official["run"]
    model = str(run / f"model{STEP:06d}.pt")
    write_snapshot(tmp_path / "ours", PIDStudent.from_teacher(small_official["teacher"], SIGMA_MIN, SIGMA_MAX),
                   small_official["weights"], small_official["weights"])
    snapshot = checkpoint.snapshot_path(str(tmp_path / "ours"), STEP)
    grid = ["--grid", str(tmp_path / "grid.png")]
    cases = [
        (sample_cli, ["--checkpoint", model, *grid], "does not record its architecture: name it with --preset"),
        (sample_cli, ["--checkpoint", model, "--preset", RELEASE_PRESET, *grid],
         f"does not fit the student of preset {RELEASE_PRESET}: missing (324): enc.32x32_conv.weight"),
        (sample_cli, ["--checkpoint", model, "--preset", SMALL_PRESET, "--ema", EMA, *grid], "drop --ema"),
        (sample_cli, ["--checkpoint", str(run / f"opt{STEP:06d}.pt"), "--preset", SMALL_PRESET, *grid],
         "is an optimizer state"),
        (sample_cli, ["--checkpoint", snapshot, "--preset", SMALL_PRESET, *grid], "drop --preset"),
        (fid_cli, ["--run", str(run), "--ref", small_official["ref"]], "is an official PID run folder"),
        (fid_cli, ["--run", str(tmp_path / "ours"), "--preset", SMALL_PRESET, "--ref", small_official["ref"]],
         "drop --preset"),
    ]
    for cli, arguments, message in cases:
        with pytest.raises(SystemExit) as exit:
            cli.main(arguments)
        error = capsys.readouterr().err.strip().splitlines()
        assert exit.value.code == 2 and len(error) == 1 and message in error[0], (arguments, error)


def test_distillation_starts_from_an_official_student(small_official, tmp_path):
    """student.init=file: the student's first weights are the file's (one step at a vanishing lr moves them by
    far less than the noise that sets them apart from the teacher's)."""
    run_dir = tmp_path / "finetune"
    distill_cli.main([f"--teacher.path={BUNDLED_TEACHER}", "--student.init=file",
                      f"--student.path={small_official['run'] / f'ema_{EMA}_{STEP:06d}.pt'}", f"--run.dir={run_dir}",
                      "--train.steps=1", "--train.batch=2", "--train.lr=1e-12", "--run.image_every=0"])
    _, path = checkpoint.find_snapshots(str(run_dir))[-1]
    trained = fileio.torch_load(path)["model"]
    file_weights = torch.load(small_official["run"] / f"ema_{EMA}_{STEP:06d}.pt", weights_only=True)
    teacher = small_official["teacher"].model.state_dict()
    distance = max((trained[f"model.{key}"] - value).abs().max().item() for key, value in file_weights.items())
    from_teacher = max((teacher[key] - value).abs().max().item() for key, value in file_weights.items())
    assert distance < 1e-6 < WEIGHT_NOISE < from_teacher
