"""Bad input, swept: every console command, given a mistake (a missing, empty, truncated, wrong-format or
wrong-architecture file; a run folder of the other task; a reference without `mu`; bad seeds; options that do
not apply or are out of range; an unknown preset), prints one line `<command>: error: <problem and fix>`, exits
with status 2, prints no traceback, and changes no file of the run folders it was pointed at.

Most cases call the command's `main(argv)` in this process (the console script calls exactly that); a few run
the console command in a subprocess and under `mpirun -np 2`, where the line is printed once.
"""

from __future__ import annotations

import hashlib
import importlib
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from pid_diffusion.cli import errors
from pid_diffusion.encoders import STANDARD_RGB

from edm2_helpers import write_teacher
from launch import JOB_TIMEOUT_S, REPO, mpirun_command, mpirun_env, needs_mpirun, subprocess_env
from factories import SMALL_FEATURE_DIM, small_detector

TEACHER = str(REPO / "model_zoo" / "edm-shapes-16x16.pt")
EDM2_PIXELS = dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                   attn_resolutions=[8], channels_per_head=16, use_fp16=False)
MODULES = {"pid-convert-edm": "convert_edm", "pid-distill": "distill", "pid-demo": "demo",
           "pid-train-teacher": "train_teacher", "pid-sample": "sample", "pid-fid": "fid", "pid-fid-ref": "fid_ref",
           "pid-fit-dode": "fit_dode", "pid-plot": "plot", "pid-fetch-weights": "fetch_weights", "pid-phema": "phema"}


@dataclass(frozen=True)
class Case:
    command: str
    input: str  # what is wrong, for the table
    argv: tuple[str, ...]  # `{name}` fields are the files of `Files`
    words: tuple[str, ...]  # the message names the problem and the fix with these

    @property
    def id(self) -> str:
        return f"{self.command}: {self.input}"


class Files(dict):
    """The files and folders the cases point at, by name (see `files`)."""


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Files:
    root = tmp_path_factory.mktemp("bad-input")
    f = Files(root=str(root), missing=str(root / "missing.pt"), teacher=TEACHER)
    (root / "empty.pt").write_bytes(b"")
    f["empty"] = str(root / "empty.pt")
    whole = Path(TEACHER).read_bytes()
    (root / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    f["truncated"] = str(root / "truncated.pt")
    (root / "text.pt").write_text("not a checkpoint\n")
    f["text"] = str(root / "text.pt")
    # A plain state dict of the bundled teacher: the wrong architecture for any EDM preset.
    teacher = torch.load(TEACHER, weights_only=True)
    torch.save(teacher["state_dict"], root / "state_dict.pt")
    f["state_dict"] = str(root / "state_dict.pt")
    np.savez(root / "no_mu.npz", sigma=np.eye(SMALL_FEATURE_DIM))
    np.savez(root / "ref.npz", mu=np.zeros(SMALL_FEATURE_DIM), sigma=np.eye(SMALL_FEATURE_DIM))
    f["ref"] = str(root / "ref.npz")
    (root / "damaged-run").mkdir()
    (root / "damaged-run" / "snapshot-00000001.pt").write_bytes(b"")
    f["damaged_run"] = str(root / "damaged-run")
    (root / "empty-folder").mkdir()
    f["empty_folder"] = str(root / "empty-folder")
    f["ref_no_mu"] = str(root / "no_mu.npz")
    f["detector"] = small_detector(root / "detector.pt")
    # Tiny EDM2 pixel nets, as guides that do not fit: another family than the bundled EDM teacher, and beside a
    # conditional EDM2 teacher another resolution or label dimension.
    for name, changes in (("edm2_main", {}), ("edm2_8px", {"img_resolution": 8}), ("edm2_5labels", {"label_dim": 5})):
        f[name] = str(write_teacher(root / f"{name}.pt", {**EDM2_PIXELS, **changes}, {"class_name": STANDARD_RGB}))
    # A distillation run and a teacher-training run, one step each, with a snapshot and a training state.
    importlib.import_module("pid_diffusion.cli.distill").main(
        [f"--run.dir={root / 'distill-run'}", "--train.steps=1", "--run.image_every=0", "--run.log_every=1"])
    f["distill_run"] = str(root / "distill-run")
    importlib.import_module("pid_diffusion.cli.train_teacher").main(
        [f"--run.dir={root / 'teacher-run'}", "--train.steps=1", "--train.batch=2", "--data.num_images=8",
         "--run.image_every=0", "--run.log_every=1"])
    f["teacher_run"] = str(root / "teacher-run")
    f["distill_state"] = str(next((root / "distill-run").glob("checkpoint-*.pt")))
    f["teacher_state"] = str(next((root / "teacher-run").glob("checkpoint-*.pt")))
    return f


FID_OF_TEACHER = ("--ref", "{ref}", "--detector", "{detector}", "--csv", "{root}/fid.csv")
CASES = [
    # pid-convert-edm
    Case("pid-convert-edm", "missing source", ("{missing}", "{root}/out.pt"), ("missing.pt", "not found")),
    Case("pid-convert-edm", "empty source", ("{empty}", "{root}/out.pt"), ("empty.pt",)),
    Case("pid-convert-edm", "text source", ("{text}", "{root}/out.pt"), ("text.pt",)),
    Case("pid-convert-edm", "truncated source", ("{truncated}", "{root}/out.pt"), ("truncated.pt",)),
    Case("pid-convert-edm", "state dict, wrong architecture", ("{state_dict}", "{root}/out.pt", "--preset",
                                                               "edm-cifar10-32x32-uncond-vp"), ("state_dict.pt",)),
    # pid-distill
    Case("pid-distill", "missing teacher", ("--run.dir={root}/d1", "--teacher.path={missing}"), ("missing.pt",)),
    Case("pid-distill", "empty teacher", ("--run.dir={root}/d2", "--teacher.path={empty}"), ("empty.pt",)),
    Case("pid-distill", "truncated teacher", ("--run.dir={root}/d3", "--teacher.path={truncated}"),
         ("truncated.pt",)),
    Case("pid-distill", "text teacher", ("--run.dir={root}/d4", "--teacher.path={text}"), ("text.pt",)),
    Case("pid-distill", "state dict, wrong architecture", ("--run.dir={root}/d5", "--teacher.path={state_dict}",
                                                           "--teacher.preset=edm-cifar10-32x32-uncond-vp"),
         ("state_dict.pt",)),
    Case("pid-distill", "run folder of teacher training", ("--run.dir={teacher_run}",), ("teacher-run",)),
    Case("pid-distill", "--train.batch=0", ("--run.dir={distill_run}", "--train.batch=0"), ("train.batch",)),
    Case("pid-distill", "--pid.num_points=1", ("--run.dir={distill_run}", "--pid.num_points=1"), ("num_points",)),
    Case("pid-distill", "--student.dropout=1", ("--run.dir={distill_run}", "--student.dropout=1"),
         ("student", "dropout=1.0", "0 ≤ dropout < 1")),
    Case("pid-distill", "unknown preset", ("--preset=nope",), ("nope", "default")),
    Case("pid-distill", "unknown option", ("--run.dir={distill_run}", "--train.lrr=1"), ("train.lrr", "train.lr")),
    # pid-demo
    Case("pid-demo", "missing teacher", ("--run.dir={root}/m1", "--teacher.path={missing}"), ("missing.pt",)),
    Case("pid-demo", "--train.batch=0", ("--run.dir={distill_run}", "--train.batch=0"), ("train.batch",)),
    Case("pid-demo", "unknown preset", ("--preset=nope",), ("nope",)),
    Case("pid-demo", "--eval-images 0", ("--eval-images", "0"), ("eval_images",)),
    # pid-train-teacher
    Case("pid-train-teacher", "run folder of distillation", ("--run.dir={distill_run}",), ("distill-run",)),
    Case("pid-train-teacher", "--train.batch=0", ("--run.dir={teacher_run}", "--train.batch=0"), ("train.batch",)),
    Case("pid-train-teacher", "--network.dropout=-0.1", ("--run.dir={teacher_run}", "--network.dropout=-0.1"),
         ("network", "dropout=-0.1", "0 ≤ dropout < 1")),
    Case("pid-train-teacher", "unknown preset", ("--preset=nope",), ("nope",)),
    # pid-sample
    Case("pid-sample", "missing checkpoint", ("--checkpoint", "{missing}", "--grid", "{root}/g.png"), ("missing.pt",)),
    Case("pid-sample", "empty checkpoint", ("--checkpoint", "{empty}", "--grid", "{root}/g.png"), ("empty.pt",)),
    Case("pid-sample", "truncated checkpoint", ("--checkpoint", "{truncated}", "--grid", "{root}/g.png"),
         ("truncated.pt",)),
    Case("pid-sample", "teacher as checkpoint", ("--checkpoint", "{teacher}", "--grid", "{root}/g.png"),
         ("--teacher",)),
    Case("pid-sample", "text teacher", ("--teacher", "{text}", "--grid", "{root}/g.png"), ("text.pt",)),
    Case("pid-sample", "state dict, wrong architecture", ("--teacher", "{state_dict}", "--preset",
                                                          "edm-cifar10-32x32-uncond-vp", "--grid", "{root}/g.png"),
         ("state_dict.pt",)),
    Case("pid-sample", "unknown preset", ("--teacher", "{state_dict}", "--preset", "nope", "--grid", "{root}/g.png"),
         ("nope",)),
    Case("pid-sample", "seeds 5-1", ("--checkpoint", "{distill_state}", "--seeds", "5-1", "--grid", "{root}/g.png"),
         ("5-1", "0-63")),
    Case("pid-sample", "seeds a-b", ("--checkpoint", "{distill_state}", "--seeds", "a-b", "--grid", "{root}/g.png"),
         ("a-b", "0-63")),
    Case("pid-sample", "--classes, unconditional", ("--checkpoint", "{distill_state}", "--classes", "0-3",
                                                   "--grid", "{root}/g.png"), ("--classes",)),
    Case("pid-sample", "guide of another family", ("--teacher", "{teacher}", "--guide", "{edm2_main}", "--guidance",
                                                   "2", "--grid", "{root}/g.png"), ("Precond", "family")),
    Case("pid-sample", "heun --steps 1", ("--teacher", "{teacher}", "--sampler", "heun", "--steps", "1", "--grid",
                                          "{root}/g.png"), ("num_steps=1", "N ≥ 2")),
    Case("pid-sample", "EMA rate the checkpoint lacks", ("--checkpoint", "{distill_state}", "--ema", "0.5", "--grid",
                                                         "{root}/g.png"), ("0.5",)),
    Case("pid-sample", "heun on a one-step student", ("--checkpoint", "{distill_state}", "--sampler", "heun",
                                                      "--grid", "{root}/g.png"), ("heun",)),
    Case("pid-sample", "missing sampler file", ("--teacher", "{teacher}", "--sampler-file", "{missing}", "--grid",
                                                "{root}/g.png"), ("missing.pt",)),
    Case("pid-sample", "text sampler file", ("--teacher", "{teacher}", "--sampler-file", "{text}", "--grid",
                                             "{root}/g.png"), ("text.pt",)),
    # pid-fid
    Case("pid-fid", "missing run folder", ("--run", "{root}/no-run", "--ref", "{ref_no_mu}", "--detector",
                                           "{detector}", "--csv", "{root}/fid.csv"), ("no-run",)),
    Case("pid-fid", "reference without mu", ("--run", "{distill_run}", "--ref", "{ref_no_mu}", "--detector",
                                             "{detector}", "--csv", "{root}/fid.csv"), ("no_mu.npz", "mu")),
    Case("pid-fid", "missing reference", ("--run", "{distill_run}", "--ref", "{missing}", "--detector", "{detector}",
                                          "--csv", "{root}/fid.csv"), ("missing.pt",)),
    Case("pid-fid", "seeds 5-1", ("--run", "{distill_run}", "--ref", "{ref_no_mu}", "--seeds", "5-1"), ("5-1",)),
    Case("pid-fid", "seeds a-b", ("--run", "{distill_run}", "--ref", "{ref_no_mu}", "--seeds", "a-b"), ("a-b",)),
    Case("pid-fid", "text detector", ("--run", "{distill_run}", "--ref", "{ref}", "--detector", "{text}",
                                      "--csv", "{root}/fid.csv"), ("text.pt",)),
    Case("pid-fid", "unknown preset", ("--teacher", "{state_dict}", "--preset", "nope", "--ref", "{ref}",
                                       "--detector", "{detector}", "--csv", "{root}/fid.csv"), ("nope",)),
    Case("pid-fid", "guide of another family", ("--teacher", "{teacher}", "--guide", "{edm2_main}", "--guidance", "2",
                                                *FID_OF_TEACHER), ("Precond", "EDMPrecond", "family")),
    Case("pid-fid", "guide of another resolution", ("--teacher", "{edm2_main}", "--guide", "{edm2_8px}",
                                                    "--guidance", "2", *FID_OF_TEACHER), ("img_resolution", "8", "16")),
    Case("pid-fid", "guide of another label dimension", ("--teacher", "{edm2_main}", "--guide", "{edm2_5labels}",
                                                         "--guidance", "2", *FID_OF_TEACHER), ("label_dim", "5", "10")),
    Case("pid-fid", "--guidance 0", ("--teacher", "{teacher}", "--guide", "{teacher}", "--guidance", "0",
                                     *FID_OF_TEACHER), ("guidance=0.0", "positive")),
    Case("pid-fid", "--guide without --guidance", ("--teacher", "{teacher}", "--guide", "{teacher}", *FID_OF_TEACHER),
         ("--guide", "--guidance")),
    Case("pid-fid", "--guide of a run", ("--run", "{distill_run}", "--guide", "{teacher}", "--guidance", "2",
                                         *FID_OF_TEACHER), ("--teacher",)),
    Case("pid-fid", "missing guide", ("--teacher", "{teacher}", "--guide", "{missing}", "--guidance", "2",
                                      *FID_OF_TEACHER), ("missing.pt",)),
    # pid-fid-ref
    Case("pid-fid-ref", "missing data", ("--data", "{root}/no-data", "--dest", "{root}/ref.npz", "--detector",
                                         "{detector}"), ("no-data",)),
    Case("pid-fid-ref", "reference without mu", ("--compare", "{ref_no_mu}", "{ref_no_mu}"), ("no_mu.npz", "mu")),
    Case("pid-fid-ref", "text data", ("--data", "{text}", "--dest", "{root}/ref.npz", "--detector", "{detector}"),
         ("text.pt",)),
    # pid-fit-dode
    Case("pid-fit-dode", "missing teacher", ("--teacher", "{missing}", "--solver=heun", "--steps=3",
                                             "--out", "{root}/s.pt"), ("missing.pt",)),
    Case("pid-fit-dode", "truncated teacher", ("--teacher", "{truncated}", "--solver=heun", "--steps=3",
                                               "--out", "{root}/s.pt"), ("truncated.pt",)),
    Case("pid-fit-dode", "student checkpoint as teacher", ("--teacher", "{distill_state}", "--solver=heun",
                                                           "--steps=3", "--out", "{root}/s.pt"), ("checkpoint",)),
    Case("pid-fit-dode", "unknown preset", ("--teacher", "{state_dict}", "--preset", "nope", "--solver=heun",
                                            "--steps=3", "--out", "{root}/s.pt"), ("nope",)),
    # pid-plot
    Case("pid-plot", "missing run folder", ("{root}/no-run",), ("no-run",)),
    Case("pid-plot", "folder without metrics", ("{empty_folder}",), ("nothing to plot",)),
    # pid-phema
    Case("pid-phema", "damaged snapshot", ("{damaged_run}", "--std", "0.05"), ("cannot be read",)),
    Case("pid-phema", "run without power-function EMAs", ("{distill_run}", "--std", "0.05", "--out",
                                                          "{root}/phema.pt"), ("power-function",)),
    Case("pid-phema", "missing run folder", ("{root}/no-run", "--std", "0.05"), ("no-run",)),
    # pid-fetch-weights
    Case("pid-fetch-weights", "unknown preset", ("--preset=nope",), ("nope",)),
    Case("pid-fetch-weights", "--pid.num_points=1", ("--pid.num_points=1",), ("num_points",)),
]


def test_every_command_is_swept():
    assert {case.command for case in CASES} == set(MODULES)
    scripts = [line.split("=")[0].strip().strip('"') for line in (REPO / "setup.py").read_text().splitlines()
               if "pid_diffusion.cli." in line and "=" in line]
    assert sorted(scripts) == sorted(MODULES)


def arguments(case: Case, files: Files) -> list[str]:
    return [word.format(**files) for word in case.argv]


def assert_one_error_line(command: str, stderr: str, words: tuple[str, ...]) -> str:
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith(f"{command}: error: "), stderr
    assert "Traceback" not in stderr, stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_a_mistake_is_one_line_with_status_2_and_changes_nothing(case, files, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv(errors.DEBUG_VARIABLE, raising=False)
    monkeypatch.chdir(tmp_path)
    runs = {name: folder_digest(Path(files[name])) for name in ("distill_run", "teacher_run")}
    capsys.readouterr()
    main = importlib.import_module(f"pid_diffusion.cli.{MODULES[case.command]}").main
    with pytest.raises(SystemExit) as raised:
        main(arguments(case, files))
    stderr = capsys.readouterr().err
    assert raised.value.code == errors.USAGE_STATUS, stderr
    print(assert_one_error_line(case.command, stderr, case.words))  # the table of the sweep (pytest -s)
    for name, digest in runs.items():
        assert folder_digest(Path(files[name])) == digest, f"{case.id} changed {files[name]}"


# A few cases as a user runs them: the console command in its own process, and under mpirun.
SUBPROCESS_CASES = ["pid-distill: --pid.num_points=1", "pid-sample: seeds a-b", "pid-sample: teacher as checkpoint",
                    "pid-fid: reference without mu", "pid-fid: guide of another label dimension"]
MPIRUN_CASES = ["pid-distill: --train.batch=0", "pid-sample: seeds 5-1", "pid-sample: teacher as checkpoint"]
CASE_BY_ID = {case.id: case for case in CASES}


def run_case(case: Case, files: Files, cwd: Path, processes: int = 1) -> subprocess.CompletedProcess:
    command = ["-m", f"pid_diffusion.cli.{MODULES[case.command]}", *arguments(case, files)]
    if processes == 1:
        command, env = [sys.executable, *command], subprocess_env()
    else:
        command, env = mpirun_command(processes, *command), mpirun_env()
    env.pop(errors.DEBUG_VARIABLE, None)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)


@pytest.mark.slow
@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_the_console_command_gives_the_same_line(name, files, tmp_path):
    result = run_case(CASE_BY_ID[name], files, tmp_path)
    assert result.returncode == errors.USAGE_STATUS, result.stderr
    assert_one_error_line(CASE_BY_ID[name].command, result.stderr, CASE_BY_ID[name].words)


@needs_mpirun
@pytest.mark.parametrize("name", MPIRUN_CASES)
def test_under_mpirun_the_line_is_printed_once(name, files, tmp_path):
    result = run_case(CASE_BY_ID[name], files, tmp_path, processes=2)
    output = result.stdout + result.stderr
    assert result.returncode == errors.USAGE_STATUS, output
    assert_one_error_line(CASE_BY_ID[name].command, output, CASE_BY_ID[name].words)
    assert "[rank" not in output and "MPI_ABORT" not in output, output


@pytest.mark.slow
def test_debug_variable_shows_the_traceback(files, tmp_path):
    case = CASE_BY_ID["pid-fit-dode: missing teacher"]
    env = {**subprocess_env(), errors.DEBUG_VARIABLE: "1"}
    result = subprocess.run([sys.executable, "-m", "pid_diffusion.cli.fit_dode", *arguments(case, files)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert result.returncode != 0 and "Traceback" in result.stderr and "MissingFileError" in result.stderr


@pytest.mark.parametrize("bug", [KeyError("a bug"), ValueError("a bug"), FileNotFoundError("a bug")])
def test_a_bug_keeps_its_traceback(bug):
    # Only UserError is a user's mistake: a ValueError or OSError from a bug is not turned into one line.
    with pytest.raises(type(bug)):
        with errors.reported("pid-test"):
            raise bug
