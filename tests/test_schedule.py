"""A resumed run and the lr schedule: `train.steps` changed under a decay is refused with the two choices, each
an explicit `train.lr_decay_steps`, and the dry-run shows the lr the resumed run will use."""

import dataclasses
import json
import shutil

import pytest

from pid_diffusion.cli import distill as distill_cli
from pid_diffusion.config import ConfigError, LRDecay, TrainConfig
from pid_diffusion.training.schedule import lr_at

from factories import train_toy

DECAY = ["--train.lr_decay=cosine", "--run.checkpoint_every=2", "--run.log_every=1"]


def logged_lrs(folder) -> dict[int, float]:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
    return {record["step"]: record["lr"] for record in records if "lr" in record}


def test_lr_past_the_horizon_keeps_the_final_value():
    train = TrainConfig(lr=1e-3, steps=8, lr_decay=LRDecay.LINEAR, lr_decay_steps=4)
    assert [lr_at(train, s) for s in range(8)] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4] + [2.5e-4] * 4)


def test_longer_run_under_a_decay_is_refused_then_either_choice_continues(tmp_path):
    train_toy(tmp_path / "first", "--train.steps=4", *DECAY)
    stored = TrainConfig(lr=0.01, steps=4, lr_decay=LRDecay.COSINE)
    assert logged_lrs(tmp_path / "first")[4] == pytest.approx(lr_at(stored, 3))  # The toy's lr is 0.01.

    refused = tmp_path / "refused"
    shutil.copytree(tmp_path / "first", refused)
    with pytest.raises(ConfigError, match=r"train\.steps 4 → 6 under the cosine lr decay.*"
                                          r"--train\.lr_decay_steps=4 keeps the stored horizon.*"
                                          r"--train\.lr_decay_steps=6 restarts the decay"):
        train_toy(refused, "--train.steps=6", *DECAY)

    # Keep the stored horizon: the two new steps run at its final lr.
    kept = tmp_path / "kept"
    shutil.copytree(tmp_path / "first", kept)
    train_toy(kept, "--train.steps=6", "--train.lr_decay_steps=4", *DECAY)
    lrs = logged_lrs(kept)
    assert lrs[5] == lrs[6] == pytest.approx(lr_at(stored, 3))

    # Restart the decay over the new horizon: the new schedule's lr from the resumed step on.
    restarted = tmp_path / "restarted"
    shutil.copytree(tmp_path / "first", restarted)
    train_toy(restarted, "--train.steps=6", "--train.lr_decay_steps=6", *DECAY)
    stretched = dataclasses.replace(stored, steps=6, lr_decay_steps=6)
    lrs = logged_lrs(restarted)
    assert [lrs[5], lrs[6]] == pytest.approx([lr_at(stretched, 4), lr_at(stretched, 5)])
    assert lrs[5] > 1.5 * lr_at(stored, 3)  # The jump back up the decay, chosen explicitly.


def test_dry_run_shows_the_lr_of_the_resumed_run(tmp_path, capsys):
    run = [f"--run.dir={tmp_path}", "--train.batch=2", "--run.image_every=0", "--pid.num_points=10"]
    distill_cli.main([*run, "--train.steps=2"])  # The default preset decays its lr by a cosine.
    capsys.readouterr()
    with pytest.raises(SystemExit):
        distill_cli.main([*run, "--train.steps=6", "--dry-run"])
    assert "--train.lr_decay_steps=2 keeps the stored horizon" in capsys.readouterr().err
    config = distill_cli.parse_args([*run, "--train.steps=6", "--train.lr_decay_steps=6"])[1].train
    stored = dataclasses.replace(config, steps=2, lr_decay_steps=None)
    distill_cli.main([*run, "--train.steps=6", "--train.lr_decay_steps=6", "--dry-run"])
    out = "".join(capsys.readouterr())
    assert f"would resume from {tmp_path}/checkpoint-00000002.pt at step 2; lr of step 3: {lr_at(config, 2):.4g} " \
           f"(the stored schedule's: {lr_at(stored, 2):.4g})" in out
