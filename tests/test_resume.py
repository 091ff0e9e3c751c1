"""Snapshots beside training states, and what a resumed run may change: the resume class each field of the
schema declares (`config.OnResume`), the run folder's history, the teacher compared by the hash of its weights."""

import json
import re
import shutil

import pytest
import torch

from pid_diffusion.training import checkpoint
from pid_diffusion.utils import fileio
from pid_diffusion.cli import distill as distill_cli
from pid_diffusion.config import ConfigError, OnResume, flatten, leaf_fields, on_resume
from pid_diffusion.training.run_log import HISTORY_FILE

import toy_training
from equality import assert_same_training_state
from factories import fixture_teacher, train_toy, write_teacher_file

# Micro-batches and speed options sum in another order: the weights after the resumed steps agree to this.
NUMERICS_RTOL, NUMERICS_ATOL = 1e-5, 1e-6
COMMON = ["--toy.dropout=0.5", "--run.checkpoint_every=2"]  # Dropout: the resumed run needs the restored RNG.


def history(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / HISTORY_FILE).read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------------
# Snapshots and training states.

def test_snapshots_are_all_kept_and_training_states_pruned(tmp_path):
    state = train_toy(tmp_path, "--train.steps=5", "--run.snapshot_every=1", "--run.checkpoint_every=2",
                      "--run.keep_checkpoints=1")
    assert [step for step, _ in checkpoint.find_snapshots(str(tmp_path))] == [1, 2, 3, 4, 5]
    assert [step for step, _ in checkpoint.find_training_states(str(tmp_path))] == [5]  # The last step always writes one.
    snapshot = fileio.torch_load(checkpoint.snapshot_path(str(tmp_path), 5))
    assert set(snapshot) == {"step", "config", "model_spec", "model", "ema"}  # No optimizer, no RNG states.
    for rate in ("0.9", "0.99"):  # pid-sample and pid-fid read either kind.
        from_snapshot = checkpoint.load_network(checkpoint.snapshot_path(str(tmp_path), 5), ema_rate=float(rate))
        for key, value in from_snapshot.state_dict().items():
            assert torch.equal(value, state["ema"][rate][key])
    assert [step for step, _ in checkpoint.find_weights(str(tmp_path))] == [1, 2, 3, 4, 5]

    # keep_snapshots prunes like keep_checkpoints; a step with only a training state still counts for FID.
    pruned = tmp_path / "pruned"
    train_toy(pruned, "--train.steps=6", "--run.snapshot_every=4", "--run.keep_snapshots=1", "--run.keep_checkpoints=0")
    assert [step for step, _ in checkpoint.find_snapshots(str(pruned))] == [6]
    assert [step for step, _ in checkpoint.find_weights(str(pruned))] == [2, 4, 6]


# ----------------------------------------------------------------------------------------------------------
# Resume.

def changed_value(key: str, value) -> str:
    """Another valid command-line value of a field, derived from its type."""
    if isinstance(value, bool):
        return str(not value).lower()
    if key == "train.micro_batch":
        return "2"
    if isinstance(value, (int, float)):
        return str(value * 2 if value else 1)
    if key == "run.preempt_signals":
        return ",".join(value[:-1])  # One signal fewer.
    raise AssertionError(f"no changed value for {key}={value!r}: extend changed_value")


def resumable_fields(kind: OnResume) -> list[str]:
    return [key for key, _, field in leaf_fields(toy_training.ToyConfig)
            if on_resume(field) is kind and key != "train.steps" and key != "run.tensorboard"]


def halfway_run(root, common: list[str]) -> tuple:
    """A run trained straight to 6 steps, and the same run stopped at 4."""
    straight = train_toy(root / "straight", "--train.steps=6", *common)
    train_toy(root / "first", "--train.steps=4", *common)
    return straight, root / "first", common


@pytest.fixture(scope="module")
def halfway(tmp_path_factory) -> tuple:
    return halfway_run(tmp_path_factory.mktemp("halfway"), COMMON)


@pytest.fixture(scope="module")
def halfway_without_dropout(tmp_path_factory) -> tuple:
    # Channels-last also reorders where dropout's random numbers land: another random draw, not rounding.
    return halfway_run(tmp_path_factory.mktemp("halfway_plain"), ["--run.checkpoint_every=2"])


def resume_with(halfway, tmp_path, key: str) -> tuple[dict, dict]:
    _, first, common = halfway
    folder = tmp_path / "resumed"
    shutil.copytree(first, folder)
    stored = fileio.torch_load(checkpoint.latest_training_state(str(first))[1])["config"]
    value = flatten(stored)[key]
    options = dict(option[2:].split("=", 1) for option in common)
    if key != "run.dir":  # The copy is the move.
        options[key] = changed_value(key, value)
    state = train_toy(folder, "--train.steps=6", *(f"--{k}={v}" for k, v in options.items()))
    return state, history(folder)[-1]


@pytest.mark.parametrize("key", resumable_fields(OnResume.FREE))
def test_options_that_do_not_define_the_maths_may_change_and_the_weights_stay_bit_identical(halfway, tmp_path, key):
    state, record = resume_with(halfway, tmp_path, key)
    assert_same_training_state(halfway[0], state)
    assert record["event"] == "resume" and record["step"] == 4
    assert key in record["changes"] and record["changes"][key]["on_resume"] == "FREE"


# Activation checkpointing needs an EDM U-Net, which the toy task has not (test_train compares it with the plain
# student on a PID task).
@pytest.mark.parametrize("key", [key for key in resumable_fields(OnResume.NUMERICS)
                                 if key != "train.activation_checkpointing"])
def test_micro_batch_and_speed_options_may_change_within_rounding(halfway_without_dropout, tmp_path, key, monkeypatch):
    # torch.compile takes minutes on this CPU: its call is skipped (test_train proves it reaches the model).
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module, *args, **kwargs: None)
    halfway = halfway_without_dropout
    state, record = resume_with(halfway, tmp_path, key)
    for name, value in halfway[0]["model"].items():
        torch.testing.assert_close(state["model"][name], value, rtol=NUMERICS_RTOL, atol=NUMERICS_ATOL)
    assert record["changes"][key]["on_resume"] == "NUMERICS"


def test_options_that_define_the_maths_are_named_with_both_values(tmp_path):
    train_toy(tmp_path, "--train.steps=2")
    with pytest.raises(ConfigError, match=r"train\.batch: 8 → 16; train\.lr: 0\.01 → 0\.5\. Resume with the stored"):
        train_toy(tmp_path, "--train.steps=4", "--train.lr=0.5", "--train.batch=16", "--run.log_every=2")
    assert [record["event"] for record in history(tmp_path)] == ["start"]


def test_every_field_declares_its_resume_class_in_the_schema():
    # The classification is field metadata, beside each declaration; a field without it must match.
    classes = {key: on_resume(field) for key, _, field in leaf_fields(toy_training.ToyConfig)}
    assert classes["train.lr"] is classes["train.seed"] is classes["toy.width"] is OnResume.MATCH
    assert classes["run.checkpoint_every"] is classes["train.steps"] is OnResume.FREE
    assert classes["train.micro_batch"] is classes["train.channels_last"] is OnResume.NUMERICS


def test_teacher_file_may_change_when_its_weights_are_equal(tmp_path, edm_fixtures_dir, capsys):
    teacher = fixture_teacher(edm_fixtures_dir, "ref_song_uncond.pt")
    write_teacher_file(str(tmp_path / "teacher.pt"), teacher)
    run = tmp_path / "run"
    # A constant lr: the run is extended step by step (under a decay that needs train.lr_decay_steps, test_schedule).
    options = [f"--run.dir={run}", "--train.batch=4", "--run.image_every=0", "--run.log_every=1",
               "--train.lr_decay=constant"]
    distill_cli.main([*options, f"--teacher.path={tmp_path / 'teacher.pt'}", "--train.steps=1"])

    # The same network in another file (as a .pkl and its converted .pt are): the run resumes.
    shutil.copy(tmp_path / "teacher.pt", tmp_path / "moved.pt")
    distill_cli.main([*options, f"--teacher.path={tmp_path / 'moved.pt'}", "--train.steps=2"])
    record = history(run)[-1]
    assert record["changes"]["teacher.path"]["now"] == str(tmp_path / "moved.pt")
    assert record["changes"]["teacher.path"]["on_resume"] == "CONTENT"

    # Other weights: refused, naming the field.
    with torch.no_grad():
        next(teacher.parameters()).add_(1e-3)
    write_teacher_file(str(tmp_path / "other.pt"), teacher)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # the command's one-line error (cli/errors.py)
        distill_cli.main([*options, f"--teacher.path={tmp_path / 'other.pt'}", "--train.steps=3"])
    assert exit_info.value.code == 2
    assert re.search(r"^pid-distill: error: .*teacher\.path: .*its network's weights differ", capsys.readouterr().err,
                     re.M)
