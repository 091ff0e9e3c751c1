"""The training loop in one process: batch splitting, precision, EMA, checkpoints, exact resume, guards."""

import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

from pid_diffusion.images import PREVIEW_MIN_PIXELS

from pid_diffusion.training import checkpoint
from pid_diffusion.utils import fileio
from pid_diffusion.training import train as train_module
from pid_diffusion.config import ConfigError, LRDecay, RunConfig, TrainConfig
from pid_diffusion.distill import DistillConfig
from pid_diffusion.grid import KarrasGrid
from pid_diffusion.loss import PIDObjective
from pid_diffusion.distances import L2
from pid_diffusion.networks.edm import EDMPrecond
from pid_diffusion.utils.perf import RecomputedUNetBlock
from pid_diffusion.student import PIDStudent, StudentInit
from pid_diffusion.training.train import NonFiniteLossError, batch_plan, lr_at, training_loop

import toy_training
from equality import assert_mutants_fail, assert_same_training_state, assert_same_update
from factories import TINY_SONG_UNET, TOY_SCRIPT, initial_toy_state, perturbed, train_toy
from launch import JOB_TIMEOUT_S, REPO, subprocess_env, wait_for
from toy_training import ToyNet, ToyObjective

def test_micro_batches_train_like_the_whole_batch(tmp_path):
    whole = train_toy(tmp_path / "whole", "--train.steps=3")
    micro = train_toy(tmp_path / "micro", "--train.steps=3", "--train.micro_batch=2")
    # Summation order only: each tensor's update agrees to 1e-4 of its size, and is ≥ 100× that tolerance.
    initial = initial_toy_state()
    assert_same_update(micro["model"], whole["model"], initial, rel=1e-4)
    # Mutants: no update, the wrong sign, micro-batch gradients summed instead of averaged (doubled), halved.
    assert_mutants_fail(micro["model"], whole["model"], initial, rel=1e-4)


def test_batch_that_does_not_split_is_an_error():
    with pytest.raises(ConfigError, match="does not split over 3 ranks"):
        batch_plan(TrainConfig(batch=8), world_size=3)
    with pytest.raises(ConfigError, match="micro_batch=3 does not divide the per-rank batch 4"):
        batch_plan(TrainConfig(batch=8, micro_batch=3), world_size=2)
    assert batch_plan(TrainConfig(batch=8, micro_batch=2), world_size=2) == (4, 2)


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
    assert [lr_at(train, s) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_lr_decay_reaches_zero_after_the_last_step():
    # 2 warm-up steps, then 4 decayed ones: progress 0, ¼, ½, ¾ of the way to lr 0 (the step after the last).
    cosine = TrainConfig(lr=1e-3, steps=6, warmup_steps=2, lr_decay=LRDecay.COSINE)
    half_cos = [0.5 * (1 + math.cos(math.pi * p)) for p in (0, 0.25, 0.5, 0.75)]
    assert [lr_at(cosine, s) for s in range(6)] == pytest.approx([5e-4, 1e-3] + [1e-3 * f for f in half_cos])
    linear = dataclasses.replace(cosine, lr_decay=LRDecay.LINEAR)
    assert [lr_at(linear, s) for s in range(2, 6)] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])


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


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_gives_identical_weights(tmp_path):
    straight = train_toy(tmp_path / "straight", "--train.steps=8", "--run.checkpoint_every=3", "--toy.dropout=0.5")
    folder = tmp_path / "killed"
    # The same command both times; the delay only widens the window in which the kill lands mid-step.
    command = [sys.executable, TOY_SCRIPT, f"--run.dir={folder}", "--train.steps=8", "--run.checkpoint_every=3",
               "--toy.dropout=0.5", "--toy.step_delay_s=0.3"]
    job = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = checkpoint.training_state_path(str(folder), 3)
    try:
        wait_for(lambda: fileio.exists(first), job, "the first checkpoint was written")
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=JOB_TIMEOUT_S)
    assert [step for step, _ in checkpoint.find_training_states(str(folder))] == [3]

    subprocess.run(command, cwd=REPO, env=subprocess_env(), check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=JOB_TIMEOUT_S)
    resumed = fileio.torch_load(checkpoint.latest_training_state(str(folder))[1])
    assert resumed["step"] == 8
    assert_same_training_state(straight, resumed)


def test_non_finite_loss_stops_and_writes_nothing(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"at step 3 .*checkpoint-00000002\.pt"):
        train_toy(tmp_path, "--train.steps=6", "--run.checkpoint_every=2", "--toy.nan_step=3")
    assert [step for step, _ in checkpoint.find_training_states(str(tmp_path))] == [2]


# Reduced precision changes a step's arithmetic, not what it computes: the updates of two toy steps agree with
# fp32's to a fraction of their size that each format's precision allows (measured: fp16 6e-4, bf16 5e-3 of
# the largest update per tensor, each update about 1e-3), and each update is `margin` tolerances large.
PRECISION_TOLERANCE = {"fp16": dict(rel=5e-3, min_margin=100), "bf16": dict(rel=2e-2, min_margin=40)}


@pytest.fixture(scope="module")
def fp32_toy(tmp_path_factory) -> dict:
    return train_toy(tmp_path_factory.mktemp("fp32"), "--train.steps=2")


def check_reduced_precision(reduced: dict, reference: dict, precision: str) -> None:
    weight = "net.0.weight"
    assert not torch.equal(reduced["model"][weight], reference["model"][weight]), "autocast was off"
    assert_same_update(reduced["model"], reference["model"], initial_toy_state(), **PRECISION_TOLERANCE[precision])


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_trains_close_to_fp32(tmp_path, fp32_toy, precision):
    reduced = train_toy(tmp_path / precision, "--train.steps=2", f"--train.precision={precision}")
    check_reduced_precision(reduced, fp32_toy, precision)
    # Mutants of the reduced-precision run: no update, the wrong sign, doubled, halved.
    assert_mutants_fail(reduced["model"], fp32_toy["model"], initial_toy_state(), **PRECISION_TOLERANCE[precision])


def test_reduced_precision_check_fails_when_the_precision_option_is_ignored(tmp_path, fp32_toy, monkeypatch):
    # Mutant: a loop that never enters autocast trains in fp32, bit for bit.
    monkeypatch.setattr(train_module, "_autocast", lambda config, device: contextlib.nullcontext())
    ignored = train_toy(tmp_path / "ignored", "--train.steps=2", "--train.precision=bf16")
    with pytest.raises(AssertionError, match="autocast was off"):
        check_reduced_precision(ignored, fp32_toy, "bf16")


def test_fp16_overflow_skips_the_step_and_halves_the_scale(tmp_path):
    state = train_toy(tmp_path, "--train.steps=1", "--train.precision=fp16", "--toy.overflow_step=0")
    torch.manual_seed(0)
    for key, value in ToyNet().state_dict().items():
        assert torch.equal(state["model"][key], value), key  # weights untouched
        assert torch.equal(state["ema"]["0.9"][key], value), key
    assert state["scaler"]["scale"] == 2.0**15  # GradScaler's initial 2^16, backed off once
    log = fileio.read_bytes(tmp_path / "metrics.jsonl").decode().splitlines()
    assert '"skipped_steps": 1' in log[-1] and '"loss_scale": 32768.0' in log[-1]


def test_fp16_reads_the_loss_scale_only_at_the_log_record(tmp_path, monkeypatch):
    # GradScaler.get_scale copies the scale to the host (a sync on CUDA): the skip decision rides the step's one
    # all-reduce instead, and the scale is read for the log records and the training state (its state_dict) alone.
    # An overflow step is still skipped.
    reads = []
    get_scale = torch.amp.GradScaler.get_scale
    monkeypatch.setattr(torch.amp.GradScaler, "get_scale", lambda self: reads.append(1) or get_scale(self))
    state = train_toy(tmp_path, "--train.steps=6", "--run.log_every=3", "--run.checkpoint_every=6",
                      "--train.precision=fp16", "--toy.overflow_step=1")
    assert len(reads) == 3  # the log records of steps 3 and 6, the training state of step 6
    assert state["scaler"]["scale"] == 2.0**15
    log = [json.loads(line) for line in fileio.read_bytes(tmp_path / "metrics.jsonl").decode().splitlines()]
    assert [(record["skipped_steps"], record["loss_scale"]) for record in log] == [(1, 2.0**15), (0, 2.0**15)]


def test_checkpoints_pruned_and_generator_rebuilt(tmp_path):
    state = train_toy(tmp_path, "--train.steps=6", "--run.checkpoint_every=1", "--run.keep_checkpoints=2")
    fileio.atomic_write_bytes(b"", tmp_path / "checkpoint-00000099.pt.1234.tmp")  # an interrupted write
    assert [step for step, _ in checkpoint.find_training_states(str(tmp_path))] == [5, 6]
    assert state["model_spec"] == {"class": "ToyNet", "kwargs": {"width": 8, "dropout": 0.0}}
    assert len(state["rng"]) == 1 and state["config"]["train"]["steps"] == 6

    path = checkpoint.training_state_path(str(tmp_path), 6)
    ema = checkpoint.load_network(path, ema_rate=0.99)
    assert isinstance(ema, ToyNet) and not ema.training
    assert all(not p.requires_grad for p in ema.parameters())
    for key, value in ema.state_dict().items():
        assert torch.equal(value, state["ema"]["0.99"][key])
    raw = checkpoint.load_network(path)
    assert torch.equal(raw.net[0].weight, state["model"]["net.0.weight"])
    with pytest.raises(ValueError, match="no EMA at rate 0.5"):
        checkpoint.load_network(path, ema_rate=0.5)


def test_sample_grid_png(tmp_path):
    config = toy_training.resolve({"run.dir": str(tmp_path), "train.steps": "2", "run.image_every": "2"})
    torch.manual_seed(0)
    noise = torch.randn(6, toy_training.CHANNELS, toy_training.SIZE, toy_training.SIZE)
    seen = []

    def preview(model):
        seen.append(model.training)
        return model(noise)[:, :1].clamp(-1, 1)

    training_loop(config, ToyObjective(config.toy), ToyNet(), preview=preview)
    image = Image.open(tmp_path / "samples-00000002.png")
    # torchvision's grid: nrow = round(√6) = 2 images per row, so 3 rows; 2-pixel padding around each image,
    # each image magnified (nearest) to PREVIEW_MIN_PIXELS: the toy's 4×4 to 64×64.
    nrow = round(math.sqrt(6))
    rows = math.ceil(6 / nrow)
    size = PREVIEW_MIN_PIXELS
    assert size % toy_training.SIZE == 0 and image.size == (nrow * (size + 2) + 2, rows * (size + 2) + 2)
    assert seen == [False]


def test_metrics_are_plotted_and_written_as_tensorboard_events(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    train_toy(tmp_path, "--train.steps=4", "--run.tensorboard=true")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert Image.open(tmp_path / "training.png").size[0] > 0  # redrawn at each checkpoint
    (events,) = tmp_path.glob("events.out.tfevents.*")
    accumulator = event_accumulator.EventAccumulator(str(events))
    accumulator.Reload()
    losses = accumulator.Scalars("train/loss")
    assert [event.step for event in losses] == [1, 2, 3, 4]
    assert [event.value for event in losses] == pytest.approx([r["loss"] for r in records])
    assert {"train/lr", "train/grad_norm", "train/images_per_s"} <= set(accumulator.Tags()["scalars"])


def test_tensorboard_is_off_by_default(tmp_path):
    train_toy(tmp_path, "--train.steps=2")
    assert not list(tmp_path.glob("events.out.tfevents.*"))


# ----------------------------------------------------------------------------------------------------------
# Speed options: the same training on a tiny PID task (a SongUNet student with dropout and attention).

TINY_SONG = {**TINY_SONG_UNET, "model_channels": 16}
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


# From step 6 RAdam's update is adaptive (≈ lr / 40 per weight whatever the gradient's size): after 8 steps
# every tensor has moved ≥ 500 tolerances.
TINY_PID_STEPS = 8


def train_tiny_pid(folder, channels_last: bool = False, dropout: float = 0.1, **options
                   ) -> tuple[dict, PIDStudent, dict]:
    """PID steps on a tiny perturbed SongUNet teacher with `train` options: the checkpoint, the trained student
    and its initial state_dict."""
    torch.manual_seed(0)
    teacher = perturbed(EDMPrecond(**TINY_SONG)).eval().requires_grad_(False)
    if channels_last:  # what distill.build does with the teacher
        teacher.to(memory_format=torch.channels_last)
    grid = KarrasGrid(num_points=10, rho=7.0, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
    objective = PIDObjective(teacher, grid, L2())
    # A random student, perturbed like the teacher: EDM initialises output layers near zero, where the PID
    # gradients of a fresh network vanish (updates of 1e-16) and no tolerance could see a wrong one.
    student = perturbed(PIDStudent.from_teacher(teacher, SIGMA_MIN, SIGMA_MAX, init=StudentInit.RANDOM,
                                                network_overrides={"dropout": dropout}))
    config = DistillConfig(run=RunConfig(dir=str(folder), image_every=0, sync_check_every=0),
                           train=TrainConfig(steps=TINY_PID_STEPS, batch=4, lr=1e-2, ema_rates=(0.9,),
                                             channels_last=channels_last, **options))
    initial = copy.deepcopy(student.state_dict())
    student = training_loop(config, objective, student)
    return fileio.torch_load(checkpoint.training_state_path(str(folder), TINY_PID_STEPS)), student, initial


@pytest.fixture(scope="module")
def plain_tiny_pid(tmp_path_factory):
    return train_tiny_pid(tmp_path_factory.mktemp("plain"))


@pytest.fixture(scope="module")
def plain_tiny_pid_without_dropout(tmp_path_factory):
    return train_tiny_pid(tmp_path_factory.mktemp("plain_without_dropout"), dropout=0.0)


def test_activation_checkpointing_trains_like_the_plain_student(tmp_path, plain_tiny_pid):
    plain, _, initial = plain_tiny_pid
    state, student, _ = train_tiny_pid(tmp_path, activation_checkpointing=True)
    assert any(isinstance(module, RecomputedUNetBlock) for module in student.modules())
    # The recomputation replays the same kernels and, through the restored RNG, the same dropout masks
    # (measured: bitwise equal; every update ≥ 1000 tolerances of 1e-4 of its size).
    assert list(state["model"]) == list(plain["model"]) == list(initial)
    assert_same_update(state["model"], plain["model"], initial, rel=1e-4)
    assert_mutants_fail(state["model"], plain["model"], initial, rel=1e-4)


def test_channels_last_trains_like_the_plain_student(tmp_path, plain_tiny_pid_without_dropout):
    # Without dropout: dropout draws its mask in memory order, so a channels-last run drops other activations
    # than a contiguous one (a different, equally valid run, off by ~100 % of some updates).
    plain, _, initial = plain_tiny_pid_without_dropout
    state, student, _ = train_tiny_pid(tmp_path, channels_last=True, dropout=0.0)
    weight = student.model.enc["8x8_conv"].weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    # Other kernels, other summation orders (measured: 0.09 tolerances of 1e-3; margin ≈ 530).
    assert list(state["model"]) == list(plain["model"]) == list(initial)
    assert_same_update(state["model"], plain["model"], initial, rel=1e-3)
    assert_mutants_fail(state["model"], plain["model"], initial, rel=1e-3)


def test_compile_trains_for_real_in_place_and_keeps_the_keys(tmp_path, monkeypatch):
    # Compiling in place keeps the state_dict keys; the wrapper torch.compile returns would prefix them with
    # `_orig_mod.`.
    assert list(torch.compile(ToyNet()).state_dict())[0].startswith("_orig_mod.")
    # The loop's own Module.compile() call, really compiled: TorchDynamo captures the forward, AOTAutograd
    # builds the forward and backward graphs the steps then run. Only the code generator differs from the
    # default: "aot_eager" runs the captured graphs with eager kernels, since inductor's C++ compilation of
    # the kernels costs minutes on a cold cache on a 2-core CPU (measured: 175 s here under load; 18 s warm).
    compile_in_place = torch.nn.Module.compile
    compiled = []

    def compile_with_aot_eager(module, *args, **kwargs):
        compiled.append(module)
        return compile_in_place(module, *args, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", compile_with_aot_eager)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = toy_training.main([f"--run.dir={tmp_path / 'compiled'}", "--train.steps=2", "--train.compile=true"])
    assert compiled == [model] and isinstance(model, ToyNet) and model._compiled_call_impl is not None
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # a graph was captured and run
    state = fileio.torch_load(checkpoint.latest_training_state(str(tmp_path / "compiled"))[1])
    plain = train_toy(tmp_path / "plain", "--train.steps=2")
    assert list(state["model"]) == list(plain["model"]) == list(ToyNet().state_dict())
    # The compiled steps train as the eager ones (measured: bitwise; margin ≈ 4.6e3), and a compiled run that did
    # not update, or updated with the wrong sign or size, would fail this.
    assert_same_update(state["model"], plain["model"], initial_toy_state(), rel=1e-4)
    assert_mutants_fail(state["model"], plain["model"], initial_toy_state(), rel=1e-4)
    torch._dynamo.reset()


def test_the_run_seed_changes_the_batches():
    # mt19937 keeps 32 bits of its seed: seed · 2³² + step would give every run seed the same batches.
    from pid_diffusion.training.train import chunk_generator
    cpu = torch.device("cpu")
    draws = {(seed, step, chunk): torch.randn(4, generator=chunk_generator(seed, step, chunk, cpu))
             for seed in (0, 1) for step in (0, 1) for chunk in (0, 1)}
    assert len({tuple(draw.tolist()) for draw in draws.values()}) == len(draws)
    assert torch.equal(draws[1, 1, 1], torch.randn(4, generator=chunk_generator(1, 1, 1, cpu)))
