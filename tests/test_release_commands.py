"""The user's whole path on the EDM release architectures at full size, through the commands users type.

EDM-layout pickle (written here, random weights) → pid-convert-edm → pid-distill (CIFAR-10 DDPM++ under
`mpirun -np 2`, killed with SIGKILL in step 2 and resumed by the same command) → pid-sample (grid and npz)
→ pid-fid over the run folder (a stand-in detector) → pid-fit-dode on the teacher and pid-sample with the
fitted solver. CIFAR-10 DDPM++ (the paper's first run) runs all of it; ImageNet ADM (its second run, one
process: 296 M parameters) runs its EDM .pkl through one distillation step → sample; every other code path
(NCSN++ at 32×32, DDPM++ and NCSN++ at 64×64) runs convert → one distillation step → sample of the student.
Which parameters get gradients is checked for each architecture by test_release_gradients.py.
"""

import csv
import io
import shutil
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from pid_diffusion.training import checkpoint
from pid_diffusion.utils import fileio
from pid_diffusion.fid import save_reference
from pid_diffusion.networks.edm import EDM_PRESETS

from factories import (DETECTOR_POOL, SMALL_FEATURE_DIM, edm_release, release_network, torch_home_with_lpips,
                       write_detector, write_edm_pickle)
from launch import distill_killed_and_resumed, environment, run

pytestmark = pytest.mark.release

REPO = Path(__file__).resolve().parents[1]
EMA = "0.999"  # One EMA rate: each one is another copy of the network in every checkpoint.



def console_script(name: str) -> str:
    """The installed command `name` (pip puts it beside this Python), as a user runs it."""
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"console script {name} is not installed: pip install -e ."
    return found


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A folder with a TORCH_HOME holding stand-in VGG16/LPIPS weights, as the distillation ranks find them."""
    root = tmp_path_factory.mktemp("release")
    torch_home_with_lpips(root / "torch_home")
    return root


def release_pickle(workspace: Path, name: str) -> tuple[Path, int]:
    """EDM's release file of `name` (its pickle layout, random weights, the release's dropout) and the number of
    tensors of its network."""
    network = release_network(name)
    kwargs = EDM_PRESETS[name]  # recorded as EDM does, with the release's dropout (load_teacher overrides it)
    return write_edm_pickle(workspace / f"{name}.pkl", edm_release(network, kwargs)), len(network.state_dict())


def release_teacher(workspace: Path, name: str) -> Path:
    """The release file of `name` converted by pid-convert-edm."""
    pkl, tensors = release_pickle(workspace, name)
    teacher = workspace / f"{name}.pt"
    output = run([console_script("pid-convert-edm"), str(pkl), str(teacher)], environment(workspace, 1))
    assert f"{tensors} tensors" in output
    pkl.unlink()
    return teacher


def distill_command(teacher: Path, name: str, run_dir: Path, steps: int, batch: int, metric: str) -> list[str]:
    preset = "imagenet64" if "imagenet" in name else "cifar10"
    return [console_script("pid-distill"), f"--preset={preset}", f"--teacher.path={teacher}",
            f"--run.dir={run_dir}", f"--train.steps={steps}", f"--train.batch={batch}", "--train.micro_batch=none",
            f"--pid.metric={metric}", f"--train.ema_rates={EMA}", "--run.checkpoint_every=1", "--run.log_every=1",
            "--run.image_every=0", "--run.sync_check_every=1", "--train.precision=fp32"]


def sample_and_check(teacher_or_checkpoint: list[str], name: str, workspace: Path, tag: str, seeds: int,
                     env: dict[str, str], extra: tuple[str, ...] = ()) -> None:
    """pid-sample a grid and an npz (with --classes for a conditional network) and check both."""
    kwargs = EDM_PRESETS[name]
    grid, npz = workspace / f"{tag}.png", workspace / f"{tag}.npz"
    classes = ("--classes", "1,7") if kwargs["label_dim"] else ()
    run([console_script("pid-sample"), *teacher_or_checkpoint, f"--seeds=0-{seeds - 1}", "--batch=2",
         f"--grid={grid}", f"--npz={npz}", *classes, *extra], env)
    resolution = kwargs["img_resolution"]
    with PIL.Image.open(grid) as image:
        assert image.size[0] % resolution == 0 and image.size[1] % resolution == 0
    data = np.load(npz)
    assert data["images"].shape == (seeds, resolution, resolution, 3) and data["images"].dtype == np.uint8
    if kwargs["label_dim"]:
        assert data["labels"].tolist() == [[1, 7][k % 2] for k in range(seeds)]


def full_path(workspace: Path, name: str, processes: int, batch: int, metric: str, steps: int = 2,
              fid_seeds: int = 10) -> None:
    """The whole path; `fid_seeds` ≥ 10, the Inception Score's number of splits."""
    teacher = release_teacher(workspace, name)
    env = environment(workspace, 1 if processes > 1 else 2)
    run_dir = workspace / f"run-{name}"

    # Distil `steps` steps, killed during step 2; the same command resumes and finishes.
    distill_killed_and_resumed(distill_command(teacher, name, run_dir, steps, batch, metric), processes, env,
                               run_dir)
    written = [step for step, _ in checkpoint.find_training_states(str(run_dir))]
    assert written == list(range(1, steps + 1))
    last = checkpoint.training_state_path(str(run_dir), steps)
    assert fileio.torch_load(last)["model_spec"]["kwargs"]["network_kwargs"]["augment_dim"] == 0

    # Samples of the student.
    sample_and_check(["--checkpoint", last, f"--ema={EMA}"], name, workspace, f"student-{name}", 4, env)

    # FID of every checkpoint of the run, against stand-in reference statistics, with a stand-in detector.
    resolution = EDM_PRESETS[name]["img_resolution"]
    generator = torch.Generator().manual_seed(1)
    features = 3 * (resolution // DETECTOR_POOL) ** 2
    detector = write_detector(workspace / f"detector-{resolution}.pt",
                              torch.randn(features, SMALL_FEATURE_DIM, generator=generator) * 0.1,
                              torch.randn(SMALL_FEATURE_DIM, generator=generator))
    reference = workspace / "reference.npz"
    save_reference(str(reference), np.zeros(SMALL_FEATURE_DIM), np.eye(SMALL_FEATURE_DIM))
    # One process: pid-fid on two ranks is test_fid.py's (each rank would load every 1.3 GB training state again).
    run([console_script("pid-fid"), f"--run={run_dir}", f"--ref={reference}", "--seeds", f"0-{fid_seeds - 1}",
         f"--ema={EMA}", "--batch=5", f"--detector={detector}"], environment(workspace, 2))
    rows = list(csv.DictReader(io.StringIO((run_dir / "fid.csv").read_text())))
    assert sorted(int(row["step"]) for row in rows) == written
    assert all(row["fid"] and not row["error"] for row in rows), rows
    assert (run_dir / "fid.png").stat().st_size > 0

    # A D-ODE solver fitted to the teacher, and samples with it.
    solver = workspace / f"{name}.dode-euler-2.pt"
    run([console_script("pid-fit-dode"), f"--teacher={teacher}", "--solver=euler", "--steps=2", "--multiplier=2",
         "--num-samples=2", f"--out={solver}"], env)
    sample_and_check(["--teacher", str(teacher), f"--sampler-file={solver}"], name, workspace,
                     f"dode-{name}", 2, env)
    shutil.rmtree(run_dir)  # Checkpoints of full-size networks are large; free the disk for the next test.


@pytest.mark.mpirun
def test_cifar10_ddpmpp_whole_path_under_mpirun(workspace):
    """The paper's CIFAR-10 run: two ranks of batch 2, LPIPS (piq)."""
    full_path(workspace, "edm-cifar10-32x32-uncond-vp", processes=2, batch=4, metric="lpips_piq")


# The commands after pid-distill (resume, sampling, FID, D-ODE) read a checkpoint and call the network: they do
# not depend on the architecture beyond what the CIFAR-10 path runs. Every other code path runs one step of
# pid-distill → pid-sample of the student at full size: ImageNet ADM (296 M parameters, one process, conditional;
# its whole path, with 4.7 GB checkpoints, costs CI over five minutes) from its EDM .pkl, NCSN++ at 32×32
# conditional, DDPM++ and NCSN++ at 64×64 from the teacher pid-convert-edm makes. The releases left out share a
# code path with one that runs (they differ in label_dim of a SongUNet whose conditional and unconditional forms
# both run here, or in dropout, which the student sets to 0).
PICKLE_RELEASES = ["edm-imagenet-64x64-cond-adm"]
CONVERTED_RELEASES = ["edm-cifar10-32x32-cond-ve", "edm-ffhq-64x64-uncond-vp", "edm-afhqv2-64x64-uncond-ve"]
FULL_PATH_RELEASES = ["edm-cifar10-32x32-uncond-vp"]


def code_path(name: str) -> tuple:
    """What decides which code runs: network family, its encoder and embedding, and the image size."""
    kwargs = EDM_PRESETS[name]
    return (kwargs["model_type"], kwargs.get("embedding_type"), kwargs.get("encoder_type"),
            kwargs["img_resolution"])


def test_other_releases_cover_every_code_path():
    # Every release test runs pid-distill, so every code path goes through it.
    tested = [*PICKLE_RELEASES, *CONVERTED_RELEASES, *FULL_PATH_RELEASES]
    assert {code_path(name) for name in EDM_PRESETS} == {code_path(name) for name in tested}
    songunets = [name for name in tested if EDM_PRESETS[name]["model_type"] == "SongUNet"]
    assert {EDM_PRESETS[name]["label_dim"] > 0 for name in songunets} == {False, True}


def distil_one_step_and_sample(workspace: Path, name: str, teacher: Path) -> None:
    env = environment(workspace, 2)
    run_dir = workspace / f"run-{name}"
    # No snapshot: the training state holds the same weights, and a 296 M-parameter snapshot costs CI seconds.
    output = run([*distill_command(teacher, name, run_dir, 1, 1, "l2"), "--run.snapshot_every=0"], env)
    assert "Training PIDStudent" in output
    sample_and_check(["--checkpoint", checkpoint.training_state_path(str(run_dir), 1)], name, workspace,
                     f"student-{name}", 2, env)
    shutil.rmtree(run_dir)
    teacher.unlink()


@pytest.mark.parametrize("name", PICKLE_RELEASES)
def test_release_distils_and_samples(workspace, name):
    # EDM's .pkl straight into pid-distill, as the docs allow.
    distil_one_step_and_sample(workspace, name, release_pickle(workspace, name)[0])


@pytest.mark.parametrize("name", CONVERTED_RELEASES)
def test_release_converts_distils_and_samples(workspace, name):
    distil_one_step_and_sample(workspace, name, release_teacher(workspace, name))
