"""A user's mistake on any command line: one line `<command>: error: <problem and fix>`, status 2, no
traceback; once per job under mpirun; tracebacks on request (PID_DEBUG=1) and for bugs."""

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pid_diffusion.cli import errors

from launch import MPIRUN

REPO = Path(__file__).resolve().parents[1]
TEACHER = str(REPO / "model_zoo" / "edm-shapes-16x16.pt")


def console_script(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else shutil.which(name)


def mistakes(tmp_path: Path) -> dict[str, tuple[str, list[str], str]]:
    """command: (module, arguments with one mistake, words the message must contain)."""
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint\n")
    empty_run = tmp_path / "run"
    empty_run.mkdir()
    (empty_run / "checkpoint-00000001.pt").write_bytes(b"")
    return {
        "pid-convert-edm": ("convert_edm", [str(garbage), str(tmp_path / "out.pt")], "not a readable EDM pickle"),
        "pid-distill": ("distill", [f"--run.dir={tmp_path / 'r'}", f"--teacher.path={tmp_path / 'missing.pt'}"],
                        "pid-convert-edm"),
        "pid-demo": ("demo", ["--preset=cifar10"], "pid-convert-edm"),  # the preset's teacher is missing
        "pid-train-teacher": ("train_teacher", ["--train.lr=-1", "--dry-run"], "train.lr"),
        "pid-sample": ("sample", ["--checkpoint", TEACHER, "--grid", str(tmp_path / "g.png")], "--teacher"),
        "pid-fid": ("fid", ["--run", str(empty_run), "--ref", str(tmp_path / "missing-ref.npz")], "missing-ref.npz"),
        "pid-fid-ref": ("fid_ref", ["--data", str(tmp_path / "no-data"), "--dest", str(tmp_path / "ref.npz"),
                                    "--detector", str(tmp_path / "missing-detector.pt")], "no-data"),
        "pid-fit-dode": ("fit_dode", ["--teacher", str(tmp_path / "missing.pt"), "--solver=heun", "--steps=3"],
                         "missing.pt"),
        "pid-plot": ("plot", [str(tmp_path / "no-run")], "nothing to plot"),
        "pid-fetch-weights": ("fetch_weights", ["--train.lr=-1"], "train.lr"),
        "pid-phema": ("phema", [str(empty_run), "--std", "0.05"], "cannot be read"),
    }


COMMANDS = ["pid-convert-edm", "pid-distill", "pid-demo", "pid-train-teacher", "pid-sample", "pid-fid",
            "pid-fid-ref", "pid-fit-dode", "pid-plot", "pid-fetch-weights", "pid-phema"]


def test_every_command_line_is_covered():
    scripts = [line.split("=")[0].strip().strip('"') for line in (REPO / "setup.py").read_text().splitlines()
               if "pid_diffusion.cli." in line and "=" in line]
    assert sorted(scripts) == sorted(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_mistake_is_one_line_with_status_2(command, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(errors.DEBUG_VARIABLE, raising=False)
    monkeypatch.chdir(tmp_path)
    module, arguments, expected = mistakes(tmp_path)[command]
    main = importlib.import_module(f"pid_diffusion.cli.{module}").main
    with pytest.raises(SystemExit) as raised:
        main(arguments)
    assert raised.value.code == errors.USAGE_STATUS
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith(f"{command}: error: "), stderr
    assert expected in lines[0] and "Traceback" not in stderr


@pytest.mark.slow
def test_debug_variable_shows_the_traceback(tmp_path):
    env = {**os.environ, errors.DEBUG_VARIABLE: "1"}
    result = subprocess.run([console_script("pid-fit-dode"), "--teacher", str(tmp_path / "missing.pt"),
                             "--solver=heun", "--steps=3"], env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" in result.stderr and "FileNotFoundError" in result.stderr


def test_a_bug_keeps_its_traceback(capsys):
    with pytest.raises(KeyError):
        with errors.reported("pid-test"):
            raise KeyError("a bug")


@pytest.mark.mpirun
def test_under_mpirun_the_message_is_printed_once(tmp_path):
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMP_NUM_THREADS": "1"}
    env.pop(errors.DEBUG_VARIABLE, None)
    result = subprocess.run([MPIRUN or "mpirun", "-np", "2", "--oversubscribe", console_script("pid-sample"),
                             "--checkpoint", TEACHER, "--grid", str(tmp_path / "g.png")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == errors.USAGE_STATUS
    output = result.stdout + result.stderr
    assert output.count("pid-sample: error: ") == 1, output
    assert "Traceback" not in output and "[rank" not in output and "MPI_ABORT" not in output, output
