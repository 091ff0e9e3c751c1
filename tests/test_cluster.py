"""Cluster life: preemption signals, srun, damaged checkpoints, failed writes, per-rank batch drawing."""

import errno
import io
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from pid_diffusion.training import checkpoint
from pid_diffusion.utils import dist, fileio, preemption
from pid_diffusion.config import ConfigError, RunConfig
from pid_diffusion.training.train import NOISE_CHUNK, _rank_share

from equality import REL_TWO_RANKS, assert_same_training_state, assert_same_update
from factories import TOY_SCRIPT, initial_toy_state, latest, logged_steps, steps_in, train_toy
from launch import (JOB_TIMEOUT_S, REPO, mpirun, mpirun_command, mpirun_env, needs_mpirun, processes_mentioning,
                    subprocess_env, wait_for, wait_for_line)

# An 8-step toy run with dropout (the global RNG must resume too) and checkpoints every 3 steps, so that a
# preemption's checkpoint is not one the run writes anyway.
COMMON = ["--train.steps=8", "--run.checkpoint_every=3", "--toy.dropout=0.5"]
# Mid-step signals at three random steps, one per signal the loop catches by default.
CASES = list(zip(random.Random(12).sample(range(7), 3), ("SIGTERM", "SIGINT", "SIGUSR1")))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    return train_toy(tmp_path_factory.mktemp("straight"), *COMMON)


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


@pytest.mark.slow
def test_sigterm_from_outside_checkpoints_and_exits_75_then_resumes(tmp_path, straight):
    # The same command both times; the delay keeps the run going long enough for the signal to land mid-run.
    command = [sys.executable, TOY_SCRIPT, f"--run.dir={tmp_path}", *COMMON, "--toy.step_delay_s=0.3"]
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


@pytest.mark.slow
def test_second_signal_exits_at_once_and_leaves_checkpoints_intact(tmp_path):
    command = [sys.executable, TOY_SCRIPT, f"--run.dir={tmp_path}", *COMMON, "--toy.step_delay_s=30"]
    job = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
    # The first step in flight, so the loop's handlers are installed. The step outlasts every wait below (a second
    # signal ends the job at once, so its length costs nothing).
    err = wait_for_line(job.stderr, "toy: step 0 in flight")
    job.send_signal(signal.SIGTERM)
    job.send_signal(signal.SIGTERM)  # a copy of the same request (another route delivers it): no effect
    err += wait_for_line(job.stderr, "SIGTERM: finishing the step in flight")
    time.sleep(preemption.SAME_REQUEST_S)  # the rule is time: a signal this long after the first is a second
    job.send_signal(signal.SIGTERM)
    err += job.communicate(timeout=JOB_TIMEOUT_S)[1]
    assert job.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "second signal (SIGTERM): exiting now" in err
    assert steps_in(tmp_path) == [] and not [n for n in fileio.listdir(tmp_path) if n.endswith(fileio.TEMP_SUFFIX)]


def test_preempt_signals_are_validated():
    assert RunConfig(preempt_signals=()).preempt_signals == ()
    with pytest.raises(ConfigError, match="run.preempt_signals: SIGKILL cannot be caught"):
        RunConfig(preempt_signals=("SIGKILL",))
    with pytest.raises(ConfigError, match="SIGNOPE"):
        RunConfig(preempt_signals=("SIGTERM", "SIGNOPE"))


@needs_mpirun
def test_preemption_under_mpirun_resumes_bit_identical(tmp_path):
    common = [*COMMON, "--train.batch=8", "--toy.step_delay_s=0.2"]
    job = mpirun(2, TOY_SCRIPT, f"--run.dir={tmp_path / 'straight'}", *common)
    assert job.returncode == 0, job.stderr[-3000:]
    straight = latest(tmp_path / "straight")

    # A signal on rank 1 alone, in a random step of every run of the same command, requeued until done.
    folder, signal_step = tmp_path / "rank1", random.Random(12).randrange(3, 7)
    command = [TOY_SCRIPT, f"--run.dir={folder}", *common, f"--toy.signal_step={signal_step}", "--toy.signal_rank=1"]
    job = mpirun(2, *command)
    assert job.returncode == preemption.PREEMPTED_EXIT_CODE, job.stderr[-3000:]
    assert steps_in(folder)[-1] == signal_step + 1 and "Preempted (a signal on another rank)" in job.stdout
    job = mpirun(2, *command)
    assert job.returncode == 0, job.stderr[-3000:]
    assert_same_training_state(straight, latest(folder))

    # SIGUSR1 to mpirun, which forwards it to every rank (SIGTERM to Open MPI's mpirun kills the ranks).
    folder = tmp_path / "launcher"
    launcher = subprocess.Popen(mpirun_command(2, TOY_SCRIPT, f"--run.dir={folder}", *common), cwd=REPO,
                                env=mpirun_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: logged_steps(folder)[-1] >= 1, launcher, "the first step")
    launcher.send_signal(signal.SIGUSR1)
    out, err = launcher.communicate(timeout=JOB_TIMEOUT_S)
    assert launcher.returncode == preemption.PREEMPTED_EXIT_CODE, err[-3000:]
    assert "Preempted (SIGUSR1)" in out and 1 <= steps_in(folder)[-1] < 8
    job = mpirun(2, TOY_SCRIPT, f"--run.dir={folder}", *common)
    assert job.returncode == 0, job.stderr[-3000:]
    assert_same_training_state(straight, latest(folder))


# ----------------------------------------------------------------------------------------------------------
# Damaged checkpoints and failed writes.


def test_resume_skips_damaged_checkpoints_moves_them_aside_and_ends_bit_identical(tmp_path, straight, capsys):
    train_toy(tmp_path, *COMMON[1:], "--train.steps=6")  # checkpoints 3 and 6
    newest = checkpoint.training_state_path(str(tmp_path), 6)
    whole = fileio.read_bytes(newest)
    fileio.atomic_write_bytes(whole[: len(whole) // 2], newest)  # truncated by a disk error or an interrupted copy
    torch.save({"weights": torch.zeros(2)}, checkpoint.training_state_path(str(tmp_path), 7))  # not a training checkpoint
    capsys.readouterr()

    state = train_toy(tmp_path, *COMMON)
    out = capsys.readouterr().out
    assert f"Skipping damaged checkpoint {checkpoint.training_state_path(str(tmp_path), 7)} (FileFormatError: not a " \
           f"training checkpoint (no step, config" in out
    assert f"Skipping damaged checkpoint {newest} (FileFormatError: {newest}: truncated, or not a zip-format " \
           f"torch.save file: no zip end record in its {len(whole) // 2} bytes); moved to {newest}.damaged" in out
    assert f"Resuming from {checkpoint.training_state_path(str(tmp_path), 3)} at step 3" in out
    assert fileio.read_bytes(newest + ".damaged") == whole[: len(whole) // 2]  # moved aside, never deleted
    assert fileio.exists(checkpoint.training_state_path(str(tmp_path), 7) + ".damaged")
    assert_same_training_state(straight, state)


def test_no_loadable_checkpoint_is_one_error_naming_the_files(tmp_path):
    for step in (2, 4):
        fileio.atomic_write_bytes(b"garbage", checkpoint.training_state_path(str(tmp_path), step))
    with pytest.raises(checkpoint.NoLoadableTrainingStateError) as error:
        train_toy(tmp_path, *COMMON)
    message = str(error.value)
    assert "no checkpoint in" in message and "\n" not in message
    for step in (2, 4):
        assert checkpoint.training_state_path(str(tmp_path), step) + ".damaged" in message
    assert steps_in(tmp_path) == []


def test_failed_checkpoint_write_keeps_earlier_checkpoints_and_says_so(tmp_path, monkeypatch):
    train_toy(tmp_path, *COMMON[1:], "--train.steps=3")
    first = fileio.read_bytes(checkpoint.training_state_path(str(tmp_path), 3))
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):  # A full disk after part of the file was written.
        if isinstance(f, io.BytesIO):  # torch.distributed pickles the RNG states it gathers this way.
            return real_save(obj, f, *args, **kwargs)
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(checkpoint.TrainingStateWriteError) as error:
        train_toy(tmp_path, *COMMON)
    monkeypatch.setattr(torch, "save", real_save)
    message = str(error.value)
    assert message.startswith(f"could not write checkpoint {checkpoint.training_state_path(str(tmp_path), 6)} "
                              f"(OSError: [Errno 28] No space left on device)")
    assert f"the newest complete training state, {checkpoint.training_state_path(str(tmp_path), 3)}, is intact" in message
    assert fileio.read_bytes(checkpoint.training_state_path(str(tmp_path), 3)) == first
    assert steps_in(tmp_path) == [3] and not [n for n in fileio.listdir(tmp_path) if n.endswith(fileio.TEMP_SUFFIX)]


def test_checkpoints_stream_through_the_file(tmp_path, monkeypatch):
    # No copy of the whole file in memory: torch.save writes into the destination's temporary file.
    written = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: (written.append(type(f)), real_save(obj, f, *a, **k))[1])
    fileio.atomic_torch_save({"w": torch.arange(3.0)}, tmp_path / "a.pt")
    assert written and all(t.__name__ != "BytesIO" for t in written)
    assert torch.equal(fileio.torch_load(tmp_path / "a.pt")["w"], torch.arange(3.0))


# ----------------------------------------------------------------------------------------------------------
# srun.


@pytest.mark.parametrize("nodelist, host", [
    ("node[01-04,07]", "node01"), ("gpu7", "gpu7"), ("a1,b2", "a1"), ("node[3,5-6],login1", "node3"),
    ("rack[1-2]-n[03-04]", "rack1-n03"), ("127.0.0.[1-4]", "127.0.0.1")])
def test_first_host_of_a_slurm_nodelist(nodelist, host):
    assert dist.first_host(nodelist) == host


def test_bad_nodelist_is_an_error():
    with pytest.raises(ValueError, match="unclosed"):
        dist.first_host("node[01-04")


def slurm_env(rank: int, port: int) -> dict[str, str]:
    env = {key: value for key, value in subprocess_env().items()
           if not key.startswith(("OMPI_", "PMI_", "PMIX_")) and key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
            "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "127.0.0.[1-4]",
            "MASTER_PORT": str(port)}


def test_launcher_reads_a_slurm_step(monkeypatch):
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert dist.launcher() is dist.Launcher.SINGLE  # the batch script itself: no step
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert dist.launcher() is dist.Launcher.SLURM
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[12-15]")
    assert dist._slurm_rendezvous() == "tcp://gpu12:15456"  # 12000 + 123456 mod 20000
    monkeypatch.setenv("MASTER_ADDR", "head")
    monkeypatch.setenv("MASTER_PORT", "2999")
    assert dist._slurm_rendezvous() == "tcp://head:2999"


@pytest.mark.two_cores
def test_two_srun_tasks_set_by_hand_train_like_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, TOY_SCRIPT, f"--run.dir={tmp_path / 'two'}", "--train.steps=3"]
    tasks = [subprocess.Popen(command, cwd=REPO, env=slurm_env(rank, port), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for task in tasks:
        out, err = task.communicate(timeout=JOB_TIMEOUT_S)
        assert task.returncode == 0, err[-3000:]
        assert "on 2 rank(s)" in out or task is tasks[1]
    train_toy(tmp_path / "one", "--train.steps=3")
    assert len(latest(tmp_path / "two")["rng"]) == 2
    assert_same_update(latest(tmp_path / "two")["model"], latest(tmp_path / "one")["model"], initial_toy_state(),
                       rel=REL_TWO_RANKS)


# ----------------------------------------------------------------------------------------------------------
# Batch drawing.


class CountingObjective:
    """Draws one normal per sample and counts the samples drawn."""

    def __init__(self):
        self.drawn = 0

    def sample_batch(self, generator, batch_size):
        self.drawn += batch_size
        return {"x": torch.randn(batch_size, 3, generator=generator, device=generator.device)}


@pytest.mark.parametrize("batch", [48, 36])  # whole chunks per rank, and shares that cut chunks
def test_each_rank_draws_its_own_share_and_samples_do_not_depend_on_the_rank_count(batch):
    device = torch.device("cpu")
    reference = _rank_share(CountingObjective(), 7, 5, batch, 0, device)["x"]
    for world in (2, 3, 4, 6):
        per_rank = batch // world
        shares = []
        for rank in range(world):
            objective = CountingObjective()
            shares.append(_rank_share(objective, 7, 5, per_rank, rank, device)["x"])
            assert objective.drawn <= per_rank + 2 * NOISE_CHUNK
        assert torch.equal(torch.cat(shares), reference), world
    assert not torch.equal(_rank_share(CountingObjective(), 7, 6, batch, 0, device)["x"], reference)  # another step
    assert not torch.equal(_rank_share(CountingObjective(), 8, 5, batch, 0, device)["x"], reference)  # another seed


def test_sample_batch_must_honour_size_and_device():
    class Wrong:
        def sample_batch(self, generator, batch_size):
            return {"x": torch.zeros(batch_size + 1)}

    with pytest.raises(ValueError, match="'x' of shape \\(17,\\).*requested batch size 16"):
        _rank_share(Wrong(), 0, 0, 4, 0, torch.device("cpu"))


# ----------------------------------------------------------------------------------------------------------
# The SLURM batch script, with stand-ins for srun and scontrol.

SBATCH = os.path.join(REPO, "scripts", "slurm_distill.sbatch")
FAKE_SLURM = REPO / "tests" / "fixtures" / "slurm"  # srun (two local tasks) and scontrol stand-ins: README.md there


@pytest.mark.slow
@pytest.mark.parametrize("status, requeued", [(preemption.PREEMPTED_EXIT_CODE, True), (1, False)])
def test_sbatch_script_requeues_a_preempted_job_only(tmp_path, status, requeued):
    log, tools = tmp_path / "calls.log", tmp_path / "bin"
    tools.mkdir()
    # The stand-in srun runs for a moment, during which the batch shell itself gets SIGTERM (a preemption),
    # which it passes on to srun as SIGUSR1 (what srun and mpirun forward to every rank as "stop after the step").
    for name, body in (("srun", f'trap \'echo "srun got USR1" >> {log}\' USR1; echo "srun $*" >> {log}; sleep 1; '
                                f'exit {status}'),
                       ("scontrol", f'echo "scontrol $*" >> {log}')):
        (tools / name).write_text(f"#!/bin/sh\n{body}\n")
        (tools / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "77",
           "SLURM_SUBMIT_DIR": str(REPO)}
    job = subprocess.Popen(["bash", SBATCH, "imagenet64", "--train.steps=5"], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(log.exists, job, "srun to start")
    job.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=JOB_TIMEOUT_S)
    assert job.returncode == status, err
    calls = log.read_text().splitlines()
    # The preset names the run folder and the teacher (teachers/<name>.pt); the script adds nothing to override.
    assert calls[0] == "srun --mpi=none --kill-on-bad-exit=1 pid-distill --preset=imagenet64 --train.steps=5"
    assert calls[1:] == ["srun got USR1", *(["scontrol requeue 77"] if requeued else [])]


@pytest.mark.slow
def test_sbatch_overrides_replace_the_presets_values(tmp_path):
    # RUN_DIR and TEACHER are overrides too; an argument naming the same key is the user's mistake, said once.
    log, tools = tmp_path / "calls.log", tmp_path / "bin"
    tools.mkdir()
    (tools / "srun").write_text(f'#!/bin/sh\necho "srun $*" >> {log}\n')
    (tools / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(REPO),
           "RUN_DIR": "runs/mine", "TEACHER": "/data/t.pkl"}
    subprocess.run(["bash", SBATCH, "cifar10", "--train.lr=1e-4"], cwd=tmp_path, env=env, check=True,
                   timeout=JOB_TIMEOUT_S)
    assert log.read_text().splitlines() == ["srun --mpi=none --kill-on-bad-exit=1 pid-distill --preset=cifar10 "
                                            "--run.dir=runs/mine --teacher.path=/data/t.pkl --train.lr=1e-4"]


def sbatch_job(folder, log, *overrides: str) -> subprocess.Popen:
    """The batch script of job 4242, as SLURM starts it (in the submit folder), on two stand-in srun tasks."""
    env = {**subprocess_env(), "PATH": os.pathsep.join([str(FAKE_SLURM), os.path.dirname(sys.executable),
                                                        os.environ["PATH"]]),
           "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(REPO), "FAKE_SLURM_LOG": str(log)}
    return subprocess.Popen(["bash", SBATCH, "default", f"--run.dir={folder}", *LAUNCHED_RUN, *overrides], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# The bundled default for some steps: one log line per step, no images, snapshots or periodic training states. The
# cancellation is sent once a step is logged and lands within a step or two; 20 steps leave a margin that scales
# with the machine (a fast machine runs the steps and delivers the signals faster alike).
LAUNCHED_STEPS = 20
LAUNCHED_RUN = [f"--train.steps={LAUNCHED_STEPS}", "--run.log_every=1", "--run.image_every=0",
                "--run.snapshot_every=0", "--run.checkpoint_every=1000"]


@pytest.mark.two_cores  # two stand-in srun tasks
def test_sbatch_script_trains_and_a_cancelled_job_requeues_and_resumes_bit_identical(tmp_path):
    log = tmp_path / "slurm.log"
    job = sbatch_job(tmp_path / "straight", log)
    out, _ = job.communicate(timeout=JOB_TIMEOUT_S)
    assert job.returncode == 0, out[-3000:]
    assert "on 2 rank(s)" in out and not log.exists()

    # scancel (or a preemption): SIGTERM to every process of the job, the batch shell, srun and each task,
    # after the first step; each task also gets srun's forwarded copies, which count as the same request.
    folder = tmp_path / "cancelled"
    job = sbatch_job(folder, log)
    wait_for(lambda: logged_steps(folder)[-1] >= 1, job, "the first step")
    for pid in processes_mentioning(str(folder)):
        os.kill(pid, signal.SIGTERM)
    out, _ = job.communicate(timeout=JOB_TIMEOUT_S)
    assert job.returncode == preemption.PREEMPTED_EXIT_CODE, out[-3000:]
    stopped = steps_in(folder)[-1]
    assert 1 <= stopped < LAUNCHED_STEPS and re.search(rf"Preempted \(SIG(TERM|USR1)\) after step {stopped}:", out), out[-3000:]
    assert "second signal (" not in out and log.read_text() == "scontrol requeue 4242\n"
    assert not processes_mentioning(str(folder))

    # The requeued job runs the same script again: it resumes and ends as the job never stopped.
    job = sbatch_job(folder, log)
    out, _ = job.communicate(timeout=JOB_TIMEOUT_S)
    assert job.returncode == 0 and f"Resuming from {checkpoint.training_state_path(str(folder), stopped)}" in out, out
    assert_same_training_state(latest(tmp_path / "straight"), latest(folder))
