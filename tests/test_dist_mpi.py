"""Several processes on the CPU (gloo): mpirun and torchrun give the weights of one process, and a rank that
fails ends the whole job."""

import os
import subprocess
import sys

import pytest
import torch

from pid_diffusion import checkpoint, dist, fileio
from pid_diffusion.cli import distill
from pid_diffusion.networks import EDMPrecond
from pid_diffusion.student import PIDStudent

import toy_training
from launch import JOB_TIMEOUT_S, REPO, mpirun, needs_mpirun, subprocess_env

SCRIPT = os.path.join(os.path.dirname(__file__), "toy_training.py")


def latest(folder) -> dict:
    return fileio.torch_load(checkpoint.latest_checkpoint(str(folder))[1])


def assert_close_weights(a: dict, b: dict) -> None:
    """Equal up to the order of floating-point sums (gradients reduced over ranks)."""
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6)


def test_launcher_is_read_from_the_environment(monkeypatch):
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert dist.launcher() is dist.Launcher.SINGLE
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert dist.launcher() is dist.Launcher.TORCHRUN
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert dist.launcher() is dist.Launcher.MPI


# Rank r holds 3 − r rows in the first gather and 1 − r in the second (rank 1: none), and counts beyond
# float64's exact integers: sums must be exact, and gathers must cut each rank's padding off again.
COLLECTIVES = """
import torch
from pid_diffusion import dist

dist.init()
r = dist.rank()
count = dist.all_reduce_sum(torch.tensor(2**53 + r, dtype=torch.int64))
assert count.dtype == torch.int64 and count.item() == 2**54 + 1, count
total = dist.all_reduce_sum(torch.tensor([0.1, 0.2], dtype=torch.float64)[r:r + 1])
assert total.dtype == torch.float64 and total.item() == 0.1 + 0.2, total
for lengths in ((3, 2), (1, 0)):
    local = torch.arange(2 * lengths[r]).reshape(-1, 2) + 100 * r
    shards = dist.all_gather_tensors(local)
    expected = [torch.arange(2 * n).reshape(-1, 2) + 100 * k for k, n in enumerate(lengths)]
    assert all(torch.equal(a, b) for a, b in zip(shards, expected, strict=True)), shards
dist.shutdown()
print("collectives ok")
"""


def test_collectives_in_one_process_return_copies():
    local = torch.arange(6.0).reshape(3, 2)
    (gathered,) = dist.all_gather_tensors(local)
    total = dist.all_reduce_sum(local)
    assert torch.equal(gathered, local) and torch.equal(total, local)
    assert gathered.data_ptr() != local.data_ptr() and total.data_ptr() != local.data_ptr()
    with pytest.raises(ValueError, match="reshape a scalar"):
        dist.all_gather_tensors(torch.tensor(1.0))


@needs_mpirun
def test_collectives_on_two_ranks_are_exact():
    job = mpirun(2, "-c", COLLECTIVES)
    assert job.returncode == 0, job.stderr[-3000:]
    assert job.stdout.count("collectives ok") == 2


@needs_mpirun
def test_pid_student_on_two_ranks_matches_one_rank(tmp_path):
    # The real distillation task: PIDStudent wrapped in DDP, the residual's concatenated forward, micro-batches.
    torch.manual_seed(0)
    teacher = EDMPrecond(img_resolution=8, img_channels=3, label_dim=2, model_type="SongUNet", model_channels=8,
                         channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0.0)
    teacher_path = str(tmp_path / "teacher.pt")
    torch.save({"network_kwargs": teacher.init_kwargs, "state_dict": teacher.state_dict()}, teacher_path)
    options = [f"--teacher.path={teacher_path}", "--train.steps=2", "--train.batch=8", "--pid.num_points=10",
               "--run.image_every=2", "--run.image_count=4", "--train.lr=1e-3", "--train.ema_rates=0.999",
               "--pid.metric=l2"]  # Pinned here: the default preset's numbers are tuned elsewhere.

    distill.main([f"--run.dir={tmp_path / 'one'}", *options])
    job = mpirun(2, "-m", "pid_diffusion.cli.distill", f"--run.dir={tmp_path / 'two'}", *options,
                 "--train.micro_batch=2")
    assert job.returncode == 0, job.stderr[-3000:]

    one, two = latest(tmp_path / "one"), latest(tmp_path / "two")
    assert_close_weights(one, two)
    assert not torch.equal(one["model"]["model.enc.8x8_conv.weight"], teacher.model.state_dict()["enc.8x8_conv.weight"])
    assert len(two["rng"]) == 2 and not torch.equal(two["rng"][0]["torch"], two["rng"][1]["torch"])
    assert fileio.exists(tmp_path / "two" / "samples-00000002.png")

    # The checkpoint alone rebuilds the student for sampling.
    student = checkpoint.load_generator(checkpoint.latest_checkpoint(str(tmp_path / "two"))[1], ema_rate=0.999)
    assert isinstance(student, PIDStudent) and student.label_dim == 2
    for key, value in student.state_dict().items():
        assert torch.equal(value, two["ema"]["0.999"][key]), key


@needs_mpirun
def test_failing_rank_ends_the_mpi_job(tmp_path):
    # Rank 1 raises in step 1 while rank 0 waits for it in the loss all-reduce: the job must end, non-zero.
    job = mpirun(2, SCRIPT, f"--run.dir={tmp_path}", "--train.steps=4", "--toy.fail_step=1", "--toy.fail_rank=1")
    assert job.returncode != 0
    assert "injected failure on rank 1 at step 1" in job.stderr
    assert [step for step, _ in checkpoint.find_checkpoints(str(tmp_path))] == []


def test_torchrun_two_ranks_match_one_rank(tmp_path):
    toy_training.main([f"--run.dir={tmp_path / 'one'}", "--train.steps=3"])
    job = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          SCRIPT, f"--run.dir={tmp_path / 'two'}", "--train.steps=3"],
                         cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert job.returncode == 0, job.stderr[-3000:]
    assert_close_weights(latest(tmp_path / "one"), latest(tmp_path / "two"))
