"""Stopping a job through its launcher script saves it: Ctrl-C in a terminal (SIGINT to the script's process
group), SIGTERM to the script, and a second Ctrl-C, through scripts/*.sh under mpirun with two processes."""

import importlib
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from pid_diffusion.training import checkpoint
from pid_diffusion.utils import fileio, preemption

from equality import assert_same_training_state
from factories import SMALL_FEATURE_DIM, latest, logged_steps, small_detector, steps_in
from launch import JOB_TIMEOUT_S, REPO, mpirun_env, processes_mentioning, wait_for

# mpirun jobs never run beside each other (their ranks would share the machine's two cores): conftest.py puts
# every mpirun test in one pytest-xdist group.
pytestmark = pytest.mark.mpirun

# The bundled default on two processes: one log line per step, no images, no snapshots and no periodic training
# state, so the one a stop writes is the only one before the end. A stop is sent once a step is logged (the
# ranks' handlers are installed before the first step) and lands within a step or two; the run is long enough
# that it cannot end first on any machine, since a step and a signal's way from the script to the ranks scale
# together.
STEPS = 40
RUN = [f"--train.steps={STEPS}", "--run.log_every=1", "--run.image_every=0", "--run.snapshot_every=0",
       "--run.checkpoint_every=1000"]
# A step long enough that a second Ctrl-C sent after both ranks announced the first lands inside it: the global
# batch of 64 takes some seconds a step on a CPU, against the ~0.1 s of the default's 8.
LONG_STEP = ["--train.batch=64"]
SECOND_SIGNAL_LIMIT_S = 10.0  # "At once": the ranks end within mpirun's kill, far below a step and a write.


def launcher_env(**extra: str) -> dict[str, str]:
    # Two processes on a machine with fewer cores: Open MPI 5's (PRRTE's) way to allow oversubscription.
    return {**mpirun_env(), "NUM_PROCESSES": "2", "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe", **extra}


def as_a_terminal_starts_a_job() -> None:
    """A terminal's shell starts a foreground job with SIGINT and SIGQUIT at their defaults. The test process may
    have inherited them ignored (a background job of a non-interactive shell, as some CI runners start the suite),
    and a non-interactive bash cannot trap a signal it was started ignoring."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def as_a_background_job_starts() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)


class Launch:
    """A launcher script started as a terminal starts a foreground job (or, with `background=True`, as a script
    starts a background job): a process group of its own, its output in a file (read while it runs)."""

    def __init__(self, log: Path, *command: str, background: bool = False, **env: str):
        self.log = log
        with open(log, "w") as output:
            self.job = subprocess.Popen(
                ["bash", *command], cwd=REPO, env=launcher_env(**env), stdout=output, stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=as_a_background_job_starts if background else as_a_terminal_starts_a_job)

    def output(self) -> str:
        return self.log.read_text()

    def ctrl_c(self) -> None:
        os.killpg(self.job.pid, signal.SIGINT)

    def wait(self) -> int:
        return self.job.wait(timeout=JOB_TIMEOUT_S)


def distill(folder: Path, log: Path, *options: str, background: bool = False) -> Launch:
    return Launch(log, "scripts/distill_pid_diffusion.sh", "default", f"--run.dir={folder}", *RUN, *options,
                  background=background)


def assert_no_process_left(text: str) -> None:
    deadline = time.monotonic() + 30  # mpirun's daemons end a moment after the script returns
    while processes_mentioning(text) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not processes_mentioning(text), f"processes of the job outlived the launcher: {processes_mentioning(text)}"


def assert_stopped_and_saved(launch: Launch, folder: Path, after: int) -> int:
    """The launcher exited 75, both ranks got the stop, the training state of the last logged step was
    written and the log says so; returns that step."""
    assert launch.wait() == preemption.PREEMPTED_EXIT_CODE, launch.output()[-3000:]
    output = launch.output()
    stopped = steps_in(folder)[-1]
    assert after < stopped < STEPS and logged_steps(folder)[-1] == stopped, output[-3000:]
    assert f"Preempted (SIGUSR1) after step {stopped}: {checkpoint.training_state_path(str(folder), stopped)}" in output
    assert "[rank 0] SIGUSR1" in output and "[rank 1] SIGUSR1" in output
    assert not [name for name in fileio.listdir(folder) if name.endswith(fileio.TEMP_SUFFIX)]
    assert_no_process_left(str(folder))
    return stopped


def test_distill_launcher_stops_on_ctrl_c_and_sigterm_and_resumes_bit_identical(tmp_path):
    straight = distill(tmp_path / "straight", tmp_path / "straight.log")
    assert straight.wait() == 0, straight.output()[-3000:]

    folder = tmp_path / "stopped"
    # Ctrl-C in a terminal: SIGINT to the script's process group, after the first step.
    launch = distill(folder, tmp_path / "ctrl-c.log")
    wait_for(lambda: logged_steps(folder)[-1] >= 1, launch.job, "the first step")
    launch.ctrl_c()
    first = assert_stopped_and_saved(launch, folder, after=0)
    # The same command resumes; SIGTERM to the script alone (a batch system's stop) after a resumed step.
    # Started as a script's background job, SIGINT ignored: the script says Ctrl-C cannot reach it, and SIGTERM does.
    launch = distill(folder, tmp_path / "sigterm.log", background=True)
    wait_for(lambda: logged_steps(folder)[-1] > first, launch.job, "a resumed step")
    launch.job.send_signal(signal.SIGTERM)
    assert_stopped_and_saved(launch, folder, after=first)
    assert f"SIGINT is ignored in this shell (started as a background job): Ctrl-C cannot stop the job; stop it " \
           f"with `kill {launch.job.pid}` (SIGTERM)" in launch.output()
    # And runs to the end, where it equals the run that was never stopped.
    launch = distill(folder, tmp_path / "end.log")
    assert launch.wait() == 0, launch.output()[-3000:]
    assert_same_training_state(latest(tmp_path / "straight"), latest(folder))


def test_a_second_ctrl_c_ends_the_job_at_once(tmp_path):
    folder = tmp_path / "run"
    launch = distill(folder, tmp_path / "run.log", *LONG_STEP)
    wait_for(lambda: logged_steps(folder)[-1] >= 1, launch.job, "the first step")
    launch.ctrl_c()
    wait_for(lambda: "[rank 1] SIGUSR1" in launch.output() and "[rank 0] SIGUSR1" in launch.output(), launch.job,
             "the ranks to get the stop")
    sent = time.monotonic()
    launch.ctrl_c()
    assert launch.wait() == 128 + signal.SIGINT, launch.output()[-3000:]
    assert time.monotonic() - sent < SECOND_SIGNAL_LIMIT_S
    assert "second signal (SIGINT): ending the job now" in launch.output()
    assert steps_in(folder) == [], "the job wrote the training state of the step in flight: it did not end at once"
    assert not [name for name in fileio.listdir(folder) if name.endswith(fileio.TEMP_SUFFIX)]
    assert_no_process_left(str(folder))


def test_sampling_launcher_stops_on_ctrl_c_writing_nothing_partial(tmp_path):
    # Heun on the bundled teacher for many seeds: long enough to be stopped in the middle.
    grid = tmp_path / "out" / "grid.png"
    launch = Launch(tmp_path / "run.log", "scripts/image_sampling.sh", "--teacher", "model_zoo/edm-shapes-16x16.pt",
                    "--sampler", "heun", "--npz", str(tmp_path / "out" / "samples.npz"), SEEDS="0-99999", BATCH="8",
                    OUT=str(tmp_path / "out"))
    wait_for(lambda: "100000 images" in launch.output(), launch.job, "the sampling to start")
    launch.ctrl_c()
    assert launch.wait() == preemption.PREEMPTED_EXIT_CODE, launch.output()[-3000:]
    output = launch.output()
    assert output.count("pid-sample: stopped by SIGUSR1") == 1 and "Traceback" not in output, output[-3000:]
    assert not grid.exists() and not (tmp_path / "out" / "samples.npz").exists()
    assert not (tmp_path / "out").exists() or not [n for n in os.listdir(tmp_path / "out") if n.endswith(fileio.TEMP_SUFFIX)]
    assert_no_process_left(str(tmp_path))


def test_fid_launcher_stops_on_ctrl_c_keeping_finished_rows_and_resumes(tmp_path):
    # A run folder with two snapshots (three weights each), a stand-in detector and reference statistics.
    run = tmp_path / "run"
    importlib.import_module("pid_diffusion.cli.distill").main(
        [f"--run.dir={run}", "--train.steps=2", "--run.snapshot_every=1", "--run.image_every=0"])
    detector = small_detector(tmp_path / "detector.pt")
    np.savez(tmp_path / "ref.npz", mu=np.zeros(SMALL_FEATURE_DIM), sigma=np.eye(SMALL_FEATURE_DIM))
    command = ["scripts/fid_eval.sh", str(run), "cifar10", "--detector", detector]
    env = dict(REF=str(tmp_path / "ref.npz"), SEED_RANGES="0-499", BATCH="50")

    launch = Launch(tmp_path / "stopped.log", *command, **env)
    wait_for(lambda: ": FID " in launch.output(), launch.job, "the first row")  # not the detector warning's "FIDs"
    launch.ctrl_c()
    assert launch.wait() == preemption.PREEMPTED_EXIT_CODE, launch.output()[-3000:]
    output = launch.output()
    assert output.count("pid-fid: stopped by SIGUSR1") == 1 and "Traceback" not in output, output[-3000:]
    finished = output.count(": FID ")
    rows = (run / "fid.csv").read_text().splitlines()[1:]
    assert 1 <= finished == len(rows) < 6, output[-3000:]  # the rows printed before the stop, each complete
    assert_no_process_left(str(run))

    launch = Launch(tmp_path / "resumed.log", *command, **env)  # the same command evaluates the rest
    assert launch.wait() == 0, launch.output()[-3000:]
    table = (run / "fid.csv").read_text().splitlines()[1:]
    assert set(rows) <= set(table) and len(table) == 6
