"""Cluster life: preemption signals, srun, damaged checkpoints, failed writes, per-rank batch drawing."""

import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from pid_diffusion import checkpoint, dist, fileio, preemption
from pid_diffusion.config import ConfigError, RunConfig
from pid_diffusion.train import NOISE_CHUNK, _rank_share

from test_dist_mpi import JOB_TIMEOUT_S, assert_close_weights, latest, mpirun, needs_mpirun
from test_train import REPO, SCRIPT, assert_same_training_state, subprocess_env, train_toy

# An 8-step toy run with dropout (the global RNG must resume too) and checkpoints every 3 steps, so that a
# preemption's checkpoint is not one the run writes anyway.
COMMON = ["--train.steps=8", "--run.checkpoint_every=3", "--toy.dropout=0.5"]
POLL_S = 0.02
# Mid-step signals at three random steps, one per signal the loop catches by default.
CASES = list(zip(random.Random(12).sample(range(7), 3), ("SIGTERM", "SIGINT", "SIGUSR1")))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    return train_toy(tmp_path_factory.mktemp("straight"), *COMMON)


def steps_in(folder) -> list[int]:
    return [step for step, _ in checkpoint.find_checkpoints(str(folder))]


def logged_steps(folder) -> list[int]:
    """Steps of metrics.jsonl (the toy logs every step)."""
    path = folder / "metrics.jsonl"
    return [json.loads(line)["step"] for line in fileio.read_bytes(path).decode().splitlines()] if path.exists() else [0]


# ----------------------------------------------------------------------------------------------------------
# Preemption.


@pytest.mark.parametrize("signal_step, name", CASES)
def test_preempted_run_requeued_ends_bit_identical(tmp_path, straight, signal_step, name, capsys):
    # Every run of the same command sends itself the signal in its own step `signal_step`, as a job that is
    # preempted again after each requeue; rerunning until it completes is what a requeue script does.
    command = [*COMMON, f"--toy.signal_step={signal_step}", f"--toy.signal={name}"]
    stops = []
    for _ in range(8):  # Each run trains at least one step: 8 runs at most.
        try:
            state = train_toy(tmp_path, *command)
            break
        except preemption.Preempted as exit:
            assert exit.code == preemption.PREEMPTED_EXIT_CODE == 75
            stops.append(steps_in(tmp_path)[-1])
    else:
        pytest.fail("the run never completed")
    # Each preemption wrote the checkpoint of the step in flight.
    assert stops == list(range(signal_step + 1, 8, signal_step + 1))
    assert f"Preempted ({name}) after step {stops[0]}" in capsys.readouterr().out
    assert state["step"] == 8
    assert_same_training_state(straight, state)


def wait_for(condition, job: subprocess.Popen, what: str, timeout_s: float = JOB_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert job.poll() is None, f"the job ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(POLL_S)


def test_sigterm_from_outside_checkpoints_and_exits_75_then_resumes(tmp_path, straight):
    # The same command both times; the delay keeps the run going long enough for the signal to land mid-run.
    command = [sys.executable, SCRIPT, f"--run.dir={tmp_path}", *COMMON, "--toy.step_delay_s=0.3"]
    job = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    wait_for(lambda: steps_in(tmp_path) == [3], job, "the first checkpoint")
    sent = time.monotonic()
    job.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=JOB_TIMEOUT_S)
    seconds = time.monotonic() - sent
    assert job.returncode == preemption.PREEMPTED_EXIT_CODE, err[-3000:]
    stopped = steps_in(tmp_path)[-1]
    assert 3 < stopped < 8 and "Preempted (SIGTERM)" in out
    print(f"SIGTERM to exit: {seconds:.2f} s (one 0.3 s step in flight and a checkpoint)")

    subprocess.run(command, cwd=REPO, env=subprocess_env(), check=True, capture_output=True, timeout=JOB_TIMEOUT_S)
    assert_same_training_state(straight, latest(tmp_path))


def test_second_signal_exits_at_once_and_leaves_checkpoints_intact(tmp_path):
    command = [sys.executable, SCRIPT, f"--run.dir={tmp_path}", *COMMON, "--toy.step_delay_s=2"]
    job = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
    # Wait until the loop has installed its handlers: the first step (2 s) is then in flight.
    wait_for(lambda: fileio.exists(tmp_path / "config.json"), job, "the run start")
    time.sleep(0.5)
    job.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=JOB_TIMEOUT_S)
    assert job.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "second signal (SIGTERM): exiting now" in err
    assert steps_in(tmp_path) == [] and not [n for n in fileio.listdir(tmp_path) if fileio.is_temporary(n)]


def test_preempt_signals_are_validated():
    assert RunConfig(preempt_signals=()).preempt_signals == ()
    with pytest.raises(ConfigError, match="run.preempt_signals: SIGKILL cannot be caught"):
        RunConfig(preempt_signals=("SIGKILL",))
    with pytest.raises(ConfigError, match="SIGNOPE"):
        RunConfig(preempt_signals=("SIGTERM", "SIGNOPE"))


@needs_mpirun
def test_preemption_under_mpirun_resumes_bit_identical(tmp_path):
    common = [*COMMON, "--train.batch=8", "--toy.step_delay_s=0.2"]
    job = mpirun(2, SCRIPT, f"--run.dir={tmp_path / 'straight'}", *common)
    assert job.returncode == 0, job.stderr[-3000:]
    straight = latest(tmp_path / "straight")

    # A signal on rank 1 alone, in a random step of every run of the same command, requeued until done.
    folder, signal_step = tmp_path / "rank1", random.Random(12).randrange(3, 7)
    command = [SCRIPT, f"--run.dir={folder}", *common, f"--toy.signal_step={signal_step}", "--toy.signal_rank=1"]
    job = mpirun(2, *command)
    assert job.returncode == preemption.PREEMPTED_EXIT_CODE, job.stderr[-3000:]
    assert steps_in(folder)[-1] == signal_step + 1 and "Preempted (a signal on another rank)" in job.stdout
    job = mpirun(2, *command)
    assert job.returncode == 0, job.stderr[-3000:]
    assert_same_training_state(straight, latest(folder))

    # SIGUSR1 to mpirun, which forwards it to every rank (SIGTERM to Open MPI's mpirun kills the ranks).
    folder = tmp_path / "launcher"
    env = {**subprocess_env(), "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    command = ["mpirun", "-np", "2", "--oversubscribe", sys.executable, SCRIPT, f"--run.dir={folder}", *common]
    launcher = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: logged_steps(folder)[-1] >= 1, launcher, "the first step")
    launcher.send_signal(signal.SIGUSR1)
    out, err = launcher.communicate(timeout=JOB_TIMEOUT_S)
    assert launcher.returncode == preemption.PREEMPTED_EXIT_CODE, err[-3000:]
    assert "Preempted (SIGUSR1)" in out and 1 <= steps_in(folder)[-1] < 8
    job = mpirun(2, SCRIPT, f"--run.dir={folder}", *common)
    assert job.returncode == 0, job.stderr[-3000:]
    assert_same_training_state(straight, latest(folder))
