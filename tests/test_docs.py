"""README.md and docs/*.md are tests: every shell command they show is run.

Commands that need only the repository (model_zoo/, --dry-run, --help) run as written; the others run in a
fresh folder holding stand-ins where the command expects its files (a 16×16 teacher at teachers/<name>.pt
and as an EDM .pkl, a student checkpoint in runs/, reference statistics in fid-refs/, data sets, a
stand-in Inception detector and LPIPS weights in TORCH_HOME), at the reduced sizes of docs_commands.py.
`mpirun` and `torchrun` commands run as one process (test_dist_mpi.py and test_release_commands.py run
the launchers). A command that no rule below knows fails the test: a new document's command gets a rule.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import pickle
import runpy
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from pid_diffusion.training import checkpoint, posthoc_ema
from pid_diffusion.utils import hub
from pid_diffusion.config import to_json
from pid_diffusion.dode import Solver, fit_dode
from pid_diffusion.fid import save_reference
from pid_diffusion.inception import DETECTOR_FILENAME, FEATURE_DIM
from pid_diffusion.reference_stats import ReferenceStats, save_stats
from pid_diffusion.networks import edm
from pid_diffusion.teacher import load_teacher

import docs_commands
from docs_commands import MODULES, REPO, SCRIPTS, documented_commands, reduced, without_mpirun
from edm2_helpers import install_tiny_vae, sd_vae_description, write_teacher
from factories import (SMALL_FEATURE_DIM, edm_release, small_detector, write_detector, write_edm_pickle,
                       write_lpips_standins, tiny_dinov2_reference, write_tiny_dinov2_weights)

pytestmark = pytest.mark.slow  # every documented command, as a user runs it (some start processes)

BUNDLED_TEACHER = REPO / "model_zoo" / "edm-shapes-16x16.pt"
# EDM2 (README, "Teachers: EDM2 checkpoints"): tiny latent nets at the release names, 8×8 latents decoded ×2 by
# the tiny VAE to the 16×16 images of the stand-in detector.
EDM2_TEACHER, EDM2_GUIDE = "edm2-img512-s-2147483-0.070", "edm2-img512-xs-0134217-0.125"
EDM2_TINY = dict(img_resolution=8, img_channels=4, label_dim=10, model_channels=16, channel_mult=[1, 2],
                 num_blocks=1, attn_resolutions=[4], channels_per_head=16, use_fp16=False)
EDM2_SNAPSHOT = REPO / "tests" / "fixtures" / "edm2" / "edm2_tiny_snapshot.pkl"  # written by EDM2's own code
EDM2_STUDENT = "runs/pid-edm2-img512-s/checkpoint-00400000.pt"
EDM2_URL_PREFIX = "https://nvlabs-fi-cdn.nvidia.com/edm2/"
TEACHER_NAMES = ["edm-cifar10-32x32-uncond-vp", "edm-imagenet-64x64-cond-adm"]
STUDENT_CHECKPOINTS = ["runs/pid-cifar10/checkpoint-00800000.pt", "runs/pid-imagenet64/checkpoint-00400000.pt"]
STUDENT_SNAPSHOTS = ["runs/pid-cifar10/snapshot-00800000.pt", "runs/pid-default/snapshot-00001000.pt"]
REFERENCES = ["fid-refs/cifar10-32x32.npz", "fid-refs/imagenet-64x64.npz", "samples-stats.npz",
              "fid-refs/shapes-16x16.npz"]
EDM2_REFERENCES = ["fid-refs/cifar10-32x32.pkl"]  # FID's and FD_DINOv2's statistics (the tiny DINOv2's 64-d)
EDM_FID_REFS_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/"  # wget of a reference: the stand-in's copy
# The official PID code's files (docs/evaluation.md): a released student and a run folder, holding the bundled
# teacher's network as a student; the release preset their commands name stands for its architecture.
OFFICIAL_RELEASE = "model_zoo/pid_cifar/pid_cifar.pt"
OFFICIAL_RUN = "experiment/pid_cifar"
NUM_DATA_IMAGES = 10
TRAINING_COMMANDS = ("pid-distill", "pid-train-teacher", "pid-demo")
NOT_RUN = {  # Commands whose effect the suite itself is: they run in CI before and around these tests.
    ("pip", "install"): "installation (.ci/run installs the checkout before the tests)",
    ("python", "-m", "pytest"): "the test suite itself (.ci/run)",
}


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> Path:
    """One copy of every stand-in file, linked into each command's folder."""
    root = tmp_path_factory.mktemp("standins")
    torch_home = root / "torch_home" / "hub" / "checkpoints"
    torch_home.mkdir(parents=True)
    write_lpips_standins(torch_home)
    small_detector(torch_home / DETECTOR_FILENAME)  # 16-d features of 16×16 images
    write_tiny_dinov2_weights(root / "torch_home")  # DINOv2's file: the fixture's tiny network (64-d features)
    # pid-fid-ref writes statistics of the real detector's size (FEATURE_DIM): a stand-in of that width.
    full_width = root / "torch_home_full_width" / "hub" / "checkpoints"
    full_width.mkdir(parents=True)
    generator = torch.Generator().manual_seed(2)
    write_detector(full_width / DETECTOR_FILENAME, torch.randn(3 * 4 * 4, FEATURE_DIM, generator=generator) * 0.1,
                   torch.randn(FEATURE_DIM, generator=generator))
    write_tiny_dinov2_weights(root / "torch_home_full_width")

    files = root / "files"
    for name in TEACHER_NAMES:  # the bundled 16×16 teacher stands for the releases
        (files / "teachers").mkdir(parents=True, exist_ok=True)
        shutil.copy(BUNDLED_TEACHER, files / "teachers" / f"{name}.pt")
    # Documented commands read preset files by their path in the checkout (pid-distill --config=...).
    shutil.copytree(REPO / "configs", files / "configs")
    teacher = load_teacher(BUNDLED_TEACHER)
    write_edm_pickle(files / "release.pkl", edm_release(teacher, teacher.init_kwargs))
    for name in TEACHER_NAMES:
        shutil.copy(files / "release.pkl", files / "teachers" / f"{name}.pkl")
        shutil.copy(files / "release.pkl", files / f"{name}.pkl")

    run_dir = root / "student-run"
    importlib.import_module("pid_diffusion.cli.distill").main(
        [f"--run.dir={run_dir}", "--train.steps=1", "--train.batch=2", "--run.image_every=0",
         "--train.ema_rates=0.999,0.9999,0.99995", "--train.phema_stds=0.05,0.1"])
    for path in STUDENT_CHECKPOINTS:
        (files / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(checkpoint.latest_training_state(str(run_dir))[1], files / path)
    for path in STUDENT_SNAPSHOTS:  # The step inside as the name says: post-hoc EMA reads both.
        (files / path).parent.mkdir(parents=True, exist_ok=True)
        snapshot = torch.load(checkpoint.find_snapshots(str(run_dir))[-1][1], weights_only=True)
        torch.save({**snapshot, "step": checkpoint.step_of(path)}, files / path)
    # A reconstruction (pid-phema's output) to sample from.
    posthoc_ema.reconstruct_run(str(files / "runs" / "pid-cifar10"), [0.08], log=lambda line: None)

    (files / "fid-refs").mkdir()
    for path in REFERENCES:
        save_reference(str(files / path), np.zeros(SMALL_FEATURE_DIM), np.eye(SMALL_FEATURE_DIM))
    dinov2_dim = tiny_dinov2_reference()["model_kwargs"]["embed_dim"]
    for path in EDM2_REFERENCES:
        save_stats(str(files / path), ReferenceStats(fid=(np.zeros(SMALL_FEATURE_DIM), np.eye(SMALL_FEATURE_DIM)),
                                                     fd_dinov2=(np.zeros(dinov2_dim), np.eye(dinov2_dim))))
    images = np.random.default_rng(0).integers(0, 256, (NUM_DATA_IMAGES, 16, 16, 3), dtype=np.uint8)
    np.savez(files / "samples.npz", images=images)
    for folder in ("datasets/my-images", "image_folder"):
        (files / folder).mkdir(parents=True)
        for index, image in enumerate(images):
            PIL.Image.fromarray(image).save(files / folder / f"{index:06d}.png")
    with zipfile.ZipFile(files / "datasets" / "cifar10-32x32.zip", "w") as archive:
        for index, image in enumerate(images):
            buffer = io.BytesIO()
            PIL.Image.fromarray(image).save(buffer, format="PNG")
            archive.writestr(f"{index:05d}.png", buffer.getvalue())

    edm2_standins(root, files)

    weights = teacher.model.state_dict()
    (files / OFFICIAL_RELEASE).parent.mkdir(parents=True)
    torch.save(weights, files / OFFICIAL_RELEASE)
    (files / OFFICIAL_RUN).mkdir(parents=True)
    torch.save({f"model.{key}": value for key, value in weights.items()}, files / OFFICIAL_RUN / "model010000.pt")
    torch.save(weights, files / OFFICIAL_RUN / "ema_0.9999_010000.pt")
    torch.save({"state": {}, "param_groups": []}, files / OFFICIAL_RUN / "opt010000.pt")

    dode = fit_dode(teacher, Solver.HEUN, 4, multiplier=2, num_samples=2, seed=0)
    (files / "runs" / "dode").mkdir(parents=True)
    dode.save(files / "runs" / "dode" / "edm-shapes-16x16.dode-heun-4.pt")

    stub = root / "bin" / "mpirun"
    stub.parent.mkdir()
    stub.write_text(f"#!/bin/sh\nexec {sys.executable} {docs_commands.__file__} \"$@\"\n")
    stub.chmod(0o755)
    return root


def edm2_standins(root: Path, files: Path) -> None:
    """EDM2's files where the README expects them: tiny latent teachers at the preset's release names, EDM2's own
    snapshot pickle as the downloaded release, the tiny VAE in a Hugging Face cache (HF_HUB_CACHE), a student run,
    and reference statistics in EDM2's pickle format."""
    install_tiny_vae(root / "hf_hub")
    for name, seed in ((EDM2_TEACHER, 0), (EDM2_GUIDE, 1)):
        write_teacher(files / "teachers" / f"{name}.pt", EDM2_TINY, sd_vae_description(), seed=seed)
    shutil.copy(EDM2_SNAPSHOT, files / "edm2-release.pkl")
    shutil.copy(EDM2_SNAPSHOT, files / "teachers" / f"{EDM2_TEACHER}.pkl")
    with open(files / "fid-refs" / "img512.pkl", "wb") as file:
        pickle.dump(dict(num_images=NUM_DATA_IMAGES, fid=dict(mu=np.zeros(SMALL_FEATURE_DIM),
                                                            sigma=np.eye(SMALL_FEATURE_DIM))), file)
    run_dir = root / "edm2-student-run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_CACHE", str(root / "hf_hub"))
        importlib.import_module("pid_diffusion.cli.distill").main(
            [f"--run.dir={run_dir}", f"--teacher.path={files / 'teachers' / (EDM2_TEACHER + '.pt')}",
             "--train.steps=1", "--train.batch=2", "--run.image_every=0", "--train.ema_rates=0.9999"])
    (files / EDM2_STUDENT).parent.mkdir(parents=True)
    shutil.copy(checkpoint.latest_training_state(str(run_dir))[1], files / EDM2_STUDENT)


def workspace(standins: Path, folder: Path) -> Path:
    """A fresh folder with every stand-in where the documents expect it (links: nothing is copied)."""
    files = standins / "files"
    for source in files.rglob("*"):
        if source.is_file() and source.name not in ("release.pkl", "edm2-release.pkl"):
            target = folder / source.relative_to(files)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(source, target)
    (folder / "model_zoo").mkdir(exist_ok=True)  # the official release's stand-in is in model_zoo/pid_cifar
    for source in (REPO / "model_zoo").iterdir():
        os.link(source, folder / "model_zoo" / source.name)
    (folder / "scripts").symlink_to(REPO / "scripts")
    (folder / "benchmarks").symlink_to(REPO / "benchmarks")
    return folder


def run_console_script(command: str, arguments: list[str]) -> None:
    main = importlib.import_module(f"pid_diffusion.cli.{MODULES[command]}").main
    try:
        status = main(arguments)
    except SystemExit as exit:  # --help exits 0
        status = exit.code
    assert status in (None, 0), f"{command} {arguments}: status {status}"


def check_benchmark_options(words: list[str]) -> None:
    """A benchmark takes minutes: its documented options are checked against its --help."""
    output = io.StringIO()
    sys.path.insert(0, str(REPO / "benchmarks"))  # as `python benchmarks/x.py` puts it first
    try:
        with contextlib.redirect_stdout(output), pytest.raises(SystemExit):
            sys.argv = [words[1], "--help"]
            runpy.run_path(str(REPO / words[1]), run_name="__main__")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    for word in words[2:]:
        if word.startswith("--"):
            assert word.split("=")[0] in output.getvalue(), f"{words[1]} has no option {word}"


def run_documented(words: list[str], folder: Path, standins: Path, monkeypatch) -> None:
    """Run one documented command (a shlex-split line) by the rule for its program; unknown ones fail."""
    while words and "=" in words[0] and not words[0].startswith("-"):  # VAR=value prefixes
        name, value = words.pop(0).split("=", 1)
        monkeypatch.setenv(name, value)
    program = words[0]
    if program == "mpirun":
        return run_documented(without_mpirun(words), folder, standins, monkeypatch)
    if program == "srun":  # documented srun options are all --key=value: the task it starts runs as one process
        start = next(i for i, word in enumerate(words) if i > 0 and not word.startswith("-"))
        return run_documented(words[start:], folder, standins, monkeypatch)
    if program == "sbatch":  # the script's one srun command (tests/test_cluster.py checks it) runs as pid-distill
        script = next(i for i, word in enumerate(words) if word.endswith(".sbatch"))
        preset, *rest = words[script + 1:] or ["cifar10"]
        return run_documented(["pid-distill", f"--preset={preset}", *rest], folder, standins, monkeypatch)
    if program == "torchrun" and "-m" in words:
        module = words[words.index("-m") + 1]
        command = next(name for name, value in MODULES.items() if f"pid_diffusion.cli.{value}" == module)
        return run_documented([command, *words[words.index("-m") + 2:]], folder, standins, monkeypatch)
    if program == "pid-demo":  # its FID needs the real (2048-d) detector: without one it reports none
        monkeypatch.setenv("TORCH_HOME", str(standins / "empty_torch_home"))
    if program == "pid-fid-ref":
        monkeypatch.setenv("TORCH_HOME", str(standins / "torch_home_full_width"))
    if program in ("pid-sample", "pid-fid") and any(word.startswith((OFFICIAL_RELEASE, OFFICIAL_RUN)) for word in words):
        student_kwargs = {**load_teacher(BUNDLED_TEACHER).init_kwargs, "augment_dim": 0}
        monkeypatch.setitem(edm.EDM_PRESETS, words[words.index("--preset") + 1], student_kwargs)
    if program in TRAINING_COMMANDS or words[:2] == ["bash", "scripts/distill_pid_diffusion.sh"]:
        shutil.rmtree(folder / "runs")  # a new run: the stand-in checkpoints are for sampling and FID
    for word in words[1:] if program == "pid-distill" else []:  # a replay: the run folder's config.json
        if word.startswith("--config=runs/"):
            write_run_config(folder, Path(word.split("=", 1)[1]))
    if program in MODULES:
        return run_console_script(program, reduced(program, words[1:]))
    if program == "python" and len(words) > 1 and words[1] in SCRIPTS:
        return run_documented([SCRIPTS[words[1]], *words[2:]], folder, standins, monkeypatch)
    if program == "python" and len(words) > 1 and words[1].startswith("benchmarks/"):
        return check_benchmark_options(words)
    if program == "bash" and words[1].startswith("scripts/") and words[1].endswith(".sh"):
        env = {**os.environ, "PATH": f"{standins / 'bin'}{os.pathsep}{os.environ['PATH']}"}
        result = subprocess.run(words, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        return None
    if program == "mkdir":
        subprocess.run(words, cwd=folder, check=True)
        return None
    if program == "wget" and words[-1].startswith(EDM2_URL_PREFIX):  # a release file, or reference statistics
        destination = folder / (words[words.index("-P") + 1] if "-P" in words else ".")
        destination.mkdir(parents=True, exist_ok=True)
        source = "edm2-release.pkl" if words[-1].endswith(f"{EDM2_TEACHER}.pkl") else "fid-refs/img512.pkl"
        target = destination / words[-1].rsplit("/", 1)[1]
        target.unlink(missing_ok=True)  # a stand-in linked there already: download over it
        shutil.copy(standins / "files" / source, target)
        return None
    if program == "wget" and words[1].startswith(EDM_FID_REFS_URL):
        target = folder / words[words.index("-P") + 1] / words[1].rsplit("/", 1)[1]
        target.unlink(missing_ok=True)  # the workspace links every stand-in: the download replaces it
        shutil.copy(standins / "files" / "fid-refs" / target.name, target)
        return None
    if program == "wget" and words[-1].startswith(hub_release_prefix()):
        destination = folder / (words[words.index("-P") + 1] if "-P" in words else ".")
        destination.mkdir(parents=True, exist_ok=True)
        shutil.copy(standins / "files" / "release.pkl", destination / words[-1].rsplit("/", 1)[1])
        return None
    raise AssertionError(f"no rule runs the documented command {' '.join(words)!r}: add one to tests/test_docs.py")


def write_run_config(folder: Path, path: Path) -> None:
    """The config.json a run folder holds, as its run wrote it: the resolved configuration of the documented
    pid-distill command (one process or under mpirun) that runs in that folder."""
    distill = importlib.import_module("pid_diffusion.cli.distill")
    for _, command in COMMANDS:
        words = shlex.split(command)
        words = without_mpirun(words) if words[0] == "mpirun" else words
        if words[0] != "pid-distill" or "--help" in words or any(w.startswith("--config=runs/") for w in words):
            continue
        config = distill.parse_args(words[1:])[1]
        if Path(config.run.dir) == path.parent:
            (folder / path.parent).mkdir(parents=True, exist_ok=True)
            (folder / path).write_text(to_json(config))
            return
    raise AssertionError(f"no documented pid-distill command runs in {path.parent}: the replay has no run to replay")


def hub_release_prefix() -> str:
    from pid_diffusion.teacher import EDM_RELEASE_URL
    return EDM_RELEASE_URL


COMMANDS = documented_commands()


def test_the_documents_show_commands():
    assert len(COMMANDS) > 20


@pytest.mark.parametrize("document, command", COMMANDS, ids=[command[:70] for _, command in COMMANDS])
def test_documented_command_runs(document, command, standins, tmp_path, monkeypatch):
    words = shlex.split(command)
    program = [word for word in words if "=" not in word or word.startswith("-")]  # without VAR=value
    for prefix in NOT_RUN:
        if tuple(program[:len(prefix)]) == prefix:
            return  # known, and run by CI itself (NOT_RUN gives the reason)
    folder = workspace(standins, tmp_path / "work")
    monkeypatch.chdir(folder)
    monkeypatch.setenv("TORCH_HOME", str(standins / "torch_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(standins / "hf_hub"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    run_documented(words, folder, standins, monkeypatch)


def test_the_folders_the_documented_commands_write_are_ignored_by_git():
    """`git status` stays clean after following the documents: runs, teachers and reference statistics."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["runs/pid-default/snapshot-00000100.pt", "runs/dode/edm-shapes-16x16.dode-heun-4.pt",
             "teachers/edm-cifar10-32x32-uncond-vp.pt", "fid-refs/cifar10-32x32.npz"]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=REPO, capture_output=True, text=True)
    assert ignored.stdout.split() == paths
