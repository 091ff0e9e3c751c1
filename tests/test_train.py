"""The training loop in one process: batch splitting, precision, EMA, checkpoints, exact resume, guards."""

import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from pid_diffusion import checkpoint, fileio
from pid_diffusion.config import ConfigError, TrainConfig
from pid_diffusion.train import NonFiniteLossError, _batch_plan, training_loop

import toy_training
from toy_training import TOY_PRESETS, ToyNet, ToyObjective

SCRIPT = os.path.join(os.path.dirname(__file__), "toy_training.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env() -> dict[str, str]:
    """This environment with this process's thread count: kernels sum in another order with other counts."""
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}


def train_toy(folder, *overrides: str) -> dict:
    """Run the toy task in this process; returns the newest checkpoint."""
    toy_training.main([f"--run.dir={folder}", *overrides])
    return fileio.torch_load(checkpoint.latest_checkpoint(str(folder))[1])


def assert_same_training_state(a: dict, b: dict) -> None:
    """Bitwise equality of weights, EMAs and optimizer moments."""
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for rate in a["ema"]:
        for key in a["ema"][rate]:
            assert torch.equal(a["ema"][rate][key], b["ema"][rate][key]), (rate, key)
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][index][key])), key


def test_micro_batches_train_like_the_whole_batch(tmp_path):
    whole = train_toy(tmp_path / "whole", "--train.steps=3")
    micro = train_toy(tmp_path / "micro", "--train.steps=3", "--train.micro_batch=2")
    for key in whole["model"]:
        torch.testing.assert_close(micro["model"][key], whole["model"][key], rtol=1e-5, atol=1e-6)
    assert not torch.equal(whole["model"]["net.0.weight"], ToyNet().state_dict()["net.0.weight"])


def test_batch_that_does_not_split_is_an_error():
    with pytest.raises(ConfigError, match="does not split over 3 ranks"):
        _batch_plan(TrainConfig(batch=8), world_size=3)
    with pytest.raises(ConfigError, match="micro_batch=3 does not divide the per-rank batch 4"):
        _batch_plan(TrainConfig(batch=8, micro_batch=3), world_size=2)
    assert _batch_plan(TrainConfig(batch=8, micro_batch=2), world_size=2) == (4, 2)


def test_first_step_matches_closed_form(tmp_path):
    # RAdam's first step is plain momentum SGD: θ1 = θ0 − lr · g, with g clipped to norm c, so ‖θ1 − θ0‖ = lr · c.
    # The EMAs after one step are rate · θ0 + (1 − rate) · θ1; buffers are copied.
    lr, clip = 1e-2, 0.1  # The gradient norm is about 0.6, so clipping acts.
    state = train_toy(tmp_path, "--train.steps=1", f"--train.lr={lr}", f"--train.grad_clip={clip}")
    torch.manual_seed(0)
    theta0 = ToyNet().state_dict()
    delta = torch.cat([(state["model"][k] - theta0[k]).flatten() for k in theta0 if k != "gain"])
    assert delta.norm().item() == pytest.approx(lr * clip, rel=1e-3)  # float32 rounding of θ1 − θ0
    for rate in (0.9, 0.99):
        for key in theta0:
            expected = theta0[key] if key == "gain" else rate * theta0[key] + (1 - rate) * state["model"][key]
            torch.testing.assert_close(state["ema"][str(rate)][key], expected)


def test_warmup_scales_the_learning_rate():
    train = TrainConfig(lr=1e-3, warmup_steps=4)
    assert [train.lr_at(s) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_resume_continues_exactly(tmp_path):
    # Dropout makes the run depend on the global RNG, which the checkpoint must restore. The run folder is
    # moved in between: a copied run resumes too.
    common = ["--toy.dropout=0.5", "--run.checkpoint_every=2"]
    straight = train_toy(tmp_path / "straight", "--train.steps=6", *common)
    train_toy(tmp_path / "first", "--train.steps=4", *common)
    shutil.copytree(tmp_path / "first", tmp_path / "resumed")
    resumed = train_toy(tmp_path / "resumed", "--train.steps=6", *common)
    assert resumed["step"] == straight["step"] == 6
    assert_same_training_state(straight, resumed)


def test_resume_with_another_configuration_is_an_error(tmp_path):
    train_toy(tmp_path, "--train.steps=2")
    with pytest.raises(ConfigError, match="train.lr"):
        train_toy(tmp_path, "--train.steps=4", "--train.lr=0.5")


def test_kill_9_mid_run_then_rerun_gives_identical_weights(tmp_path):
    straight = train_toy(tmp_path / "straight", "--train.steps=8", "--run.checkpoint_every=3", "--toy.dropout=0.5")
    folder = tmp_path / "killed"
    # The same command both times; the delay only widens the window in which the kill lands mid-step.
    command = [sys.executable, SCRIPT, f"--run.dir={folder}", "--train.steps=8", "--run.checkpoint_every=3",
               "--toy.dropout=0.5", "--toy.step_delay_s=0.3"]
    job = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = checkpoint.checkpoint_path(str(folder), 3)
    while not fileio.exists(first):
        assert job.poll() is None, "the training job ended before writing its first checkpoint"
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert [step for step, _ in checkpoint.find_checkpoints(str(folder))] == [3]

    subprocess.run(command, cwd=REPO, env=subprocess_env(), check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    resumed = fileio.torch_load(checkpoint.latest_checkpoint(str(folder))[1])
    assert resumed["step"] == 8
    assert_same_training_state(straight, resumed)


def test_non_finite_loss_stops_and_writes_nothing(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"at step 3 .*checkpoint-00000002\.pt"):
        train_toy(tmp_path, "--train.steps=6", "--run.checkpoint_every=2", "--toy.nan_step=3")
    assert [step for step, _ in checkpoint.find_checkpoints(str(tmp_path))] == [2]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_trains_close_to_fp32(tmp_path, precision):
    reference = train_toy(tmp_path / "fp32", "--train.steps=2")
    reduced = train_toy(tmp_path / precision, "--train.steps=2", f"--train.precision={precision}")
    weight = "net.0.weight"
    assert not torch.equal(reduced["model"][weight], reference["model"][weight])  # autocast was on
    torch.testing.assert_close(reduced["model"][weight], reference["model"][weight], rtol=0, atol=1e-2)


def test_fp16_overflow_skips_the_step_and_halves_the_scale(tmp_path):
    state = train_toy(tmp_path, "--train.steps=1", "--train.precision=fp16", "--toy.overflow_step=0")
    torch.manual_seed(0)
    for key, value in ToyNet().state_dict().items():
        assert torch.equal(state["model"][key], value), key  # weights untouched
        assert torch.equal(state["ema"]["0.9"][key], value), key
    assert state["scaler"]["scale"] == 2.0**15  # GradScaler's initial 2^16, backed off once
    log = fileio.read_bytes(tmp_path / "metrics.jsonl").decode().splitlines()
    assert '"skipped_steps": 1' in log[-1] and '"loss_scale": 32768.0' in log[-1]


def test_checkpoints_pruned_and_generator_rebuilt(tmp_path):
    state = train_toy(tmp_path, "--train.steps=6", "--run.checkpoint_every=1", "--run.keep_checkpoints=2")
    fileio.atomic_write_bytes(b"", tmp_path / "checkpoint-00000099.pt.1234.tmp")  # an interrupted write
    assert [step for step, _ in checkpoint.find_checkpoints(str(tmp_path))] == [5, 6]
    assert state["model_spec"] == {"class": "ToyNet", "kwargs": {"width": 8, "dropout": 0.0}}
    assert len(state["rng"]) == 1 and state["config"]["train"]["steps"] == 6

    path = checkpoint.checkpoint_path(str(tmp_path), 6)
    ema = checkpoint.load_generator(path, ema_rate=0.99)
    assert isinstance(ema, ToyNet) and not ema.training
    assert all(not p.requires_grad for p in ema.parameters())
    for key, value in ema.state_dict().items():
        assert torch.equal(value, state["ema"]["0.99"][key])
    raw = checkpoint.load_generator(path)
    assert torch.equal(raw.net[0].weight, state["model"]["net.0.weight"])
    with pytest.raises(ValueError, match="no EMA at rate 0.5"):
        checkpoint.load_generator(path, ema_rate=0.5)


def test_sample_grid_png(tmp_path):
    config = TOY_PRESETS.resolve("toy", {"run.dir": str(tmp_path), "train.steps": "2", "run.image_every": "2"})
    torch.manual_seed(0)
    noise = torch.randn(6, toy_training.CHANNELS, toy_training.SIZE, toy_training.SIZE)
    seen = []

    def preview(model):
        seen.append(model.training)
        return model(noise)[:, :1].clamp(-1, 1)

    training_loop(config, ToyObjective(config.toy), ToyNet(), preview=preview)
    image = Image.open(tmp_path / "samples-00000002.png")
    # torchvision's grid: nrow = round(√6) = 2 images per row, so 3 rows; 2-pixel padding around each image.
    nrow = round(math.sqrt(6))
    rows = math.ceil(6 / nrow)
    assert image.size == (nrow * (toy_training.SIZE + 2) + 2, rows * (toy_training.SIZE + 2) + 2)
    assert seen == [False]
