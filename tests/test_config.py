"""Configuration: presets hold the paper's numbers, overrides are typed and validated, unknown keys fail;
preset files hold only what differs from the defaults and are found by an installed package."""

import dataclasses
import inspect
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pid_diffusion import config as cfg
from pid_diffusion import config_files, distill, teacher_training
from pid_diffusion.cli import distill as distill_cli
from pid_diffusion.cli import errors
from pid_diffusion.cli import train_teacher as train_teacher_cli
from pid_diffusion.config import (
    ConfigError, OptimizerKind, Precision, apply_overrides, diff, from_dict, parse_overrides, to_dict, to_json,
)
from pid_diffusion.distill import DistillConfig, resolve
from pid_diffusion.loss import Derivative, ResidualForm, StudentPrecision
from pid_diffusion.distances import Metric
from pid_diffusion.student import StudentInit

PAPER_EMA = (0.999, 0.9999, 0.99995)


def test_cifar10_preset_is_the_paper_run():
    c = resolve("cifar10")
    assert (c.train.batch, c.train.micro_batch, c.train.steps) == (512, None, 800_000)
    assert (c.train.lr, c.train.eps) == (2e-4, 1e-8)
    assert (c.train.optimizer, c.train.precision, c.train.ema_rates) == (OptimizerKind.RADAM, Precision.FP32, PAPER_EMA)
    assert (c.train.weight_decay, c.train.warmup_steps, c.train.grad_clip) == (0.0, 0, None)
    assert (c.pid.num_points, c.pid.rho, c.pid.sigma_min, c.pid.sigma_max) == (250, 7.0, 0.002, 80.0)
    assert (c.pid.metric, c.pid.derivative, c.pid.form) == (Metric.LPIPS_PIQ, Derivative.FORWARD, ResidualForm.DENOISER)
    assert (c.student.init, c.student.dropout, c.run.checkpoint_every) == (StudentInit.TEACHER, 0.0, 10_000)
    assert "cifar10" in c.teacher.path


def test_imagenet64_preset_is_the_paper_run():
    c = resolve("imagenet64")
    assert (c.train.batch, c.train.micro_batch, c.train.steps, c.train.lr) == (2048, 32, 400_000, 1e-4)
    assert (c.train.precision, c.train.ema_rates, c.pid.metric) == (Precision.FP16, PAPER_EMA, Metric.LPIPS_PIQ)
    assert "imagenet-64x64-cond" in c.teacher.path


@pytest.mark.parametrize("name", ["cifar10", "imagenet64"])
def test_central_presets_differ_only_in_the_scheme(name):
    plain, central = resolve(name), resolve(f"{name}-central")
    assert diff(plain, central) == ["pid.derivative", "run.dir"]
    assert central.pid.derivative is Derivative.CENTRAL


def test_default_preset_runs_on_the_cpu_without_pretrained_weights():
    c = resolve("default")
    assert c.pid.metric is Metric.L2 and c.train.precision is Precision.FP32
    assert c.teacher.path.startswith("model_zoo/")


@pytest.mark.parametrize("name", config_files.preset_names("distill"))
def test_every_preset_survives_the_json_round_trip(name):
    c = resolve(name)
    assert from_dict(DistillConfig, json.loads(to_json(c))) == c


def test_overrides_are_parsed_by_field_type():
    c = resolve("default", parse_overrides([
        "--train.lr=1e-3", "--batch=64", "--train.micro_batch=16", "--precision=bf16", "--train.ema_rates=0.9,0.99",
        "--train.grad_clip=1.5", "--stop_neighbour_grad=true", "--pid.metric=pseudo_huber", "--pseudo_huber_c=0.03",
        "--teacher.preset=edm-cifar10-32x32-uncond-vp", "--student.init=random", "--run.dir=gs://bucket/run",
        "--activation_checkpointing=true", "--channels_last=yes", "--train.compile=on", "--student_precision=fp32",
    ]))
    assert (c.train.lr, c.train.batch, c.train.micro_batch, c.train.precision) == (1e-3, 64, 16, Precision.BF16)
    assert (c.train.activation_checkpointing, c.train.channels_last, c.train.compile) == (True, True, True)
    assert (c.train.ema_rates, c.train.grad_clip, c.pid.stop_neighbour_grad) == ((0.9, 0.99), 1.5, True)
    assert (c.pid.metric, c.pid.pseudo_huber_c, c.student.init) == (Metric.PSEUDO_HUBER, 0.03, StudentInit.RANDOM)
    assert (c.teacher.preset, c.run.dir) == ("edm-cifar10-32x32-uncond-vp", "gs://bucket/run")
    assert c.pid.student_precision is StudentPrecision.FP32
    assert resolve("cifar10", {"train.micro_batch": "none"}).train.micro_batch is None
    assert resolve("imagenet64", {"micro_batch": "null"}).train.micro_batch is None


@pytest.mark.parametrize("overrides, message", [
    ({"train.lr": "fast"}, "train.lr: expected float, got 'fast'"),
    ({"train.batch": "1.5"}, "train.batch: expected int"),
    ({"train.precision": "fp8"}, "fp8' is not one of fp32, fp16, bf16"),
    ({"pid.metric": "lpips"}, "is not one of lpips_piq, lpips_vgg, l2, l1, pseudo_huber"),
    ({"pid.stop_neighbour_grad": "maybe"}, "expected true or false"),
    ({"train.betas": "0.9"}, "train.betas: expected 2 values"),
    ({"train.batch": "none"}, "train.batch: expected int, got 'none'"),
    ({"train.batch": "0"}, "train.batch: must be ≥ 1"),
    ({"train.batch": "32", "train.micro_batch": "64"},
     "train.micro_batch: must be None or between 1 and train.batch = 32"),
    ({"train.ema_rates": "0.9,1.0"}, "train.ema_rates: need 0 < rate < 1"),
    ({"train.ema_rates": "0.9,0.9"}, "rates must be distinct"),
    ({"train.seed": "-1"}, "train.seed: must be in"),
    ({"train.grad_clip": "0"}, "train.grad_clip: must be > 0"),
    ({"pid.sigma_min": "90"}, "need 0 < sigma_min < sigma_max"),
    ({"pid.num_points": "2", "pid.derivative": "central"}, "the central scheme needs ≥ 3 grid points"),
    ({"pid.pseudo_huber_c": "0.1"}, "applies to metric=pseudo_huber only (metric is l2)"),
    ({"pid.derivative": "jvp", "pid.stop_neighbour_grad": "true"}, "applies to finite differences only"),
    ({"student.dropout": "1"}, "need 0 ≤ dropout < 1"),
    ({"train.activation_checkpointing": "true", "pid.derivative": "jvp"},
     "train.activation_checkpointing: cannot combine with pid.derivative=jvp"),
    ({"run.checkpoint_every": "0"}, "run.checkpoint_every: must be ≥ 1"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve("default", overrides)


def test_unknown_keys_are_errors():
    with pytest.raises(ConfigError, match=re.escape("unknown option --train.lrate; did you mean --train.lr")):
        resolve("default", {"train.lrate": "1"})
    with pytest.raises(ConfigError, match="unknown option --nonsense"):
        resolve("default", {"nonsense": "1"})
    with pytest.raises(ConfigError, match="unknown key train.momentum"):
        from_dict(DistillConfig, {"train": {"momentum": 0.9}})
    with pytest.raises(ConfigError, match="unknown preset 'cifar100'"):
        resolve("cifar100")


def test_command_line_syntax():
    assert parse_overrides(["--a.b=1", "--c=x=y"]) == {"a.b": "1", "c": "x=y"}
    with pytest.raises(ConfigError, match="write overrides as --key=value"):
        parse_overrides(["--train.lr", "1e-4"])
    with pytest.raises(ConfigError, match="given twice"):
        parse_overrides(["--lr=1", "--lr=2"])


def test_a_bare_key_must_name_one_field():
    @dataclasses.dataclass(frozen=True)
    class Section:
        x: int = 0

    @dataclasses.dataclass(frozen=True)
    class Twin:
        a: Section = dataclasses.field(default_factory=Section)
        b: Section = dataclasses.field(default_factory=Section)

    assert apply_overrides(Twin, {}, {"b.x": "3"}) == Twin(b=Section(3))
    with pytest.raises(ConfigError, match="--x is ambiguous: write one of --a.x, --b.x"):
        apply_overrides(Twin, {}, {"x": "3"})


def test_every_option_is_read_by_the_code_that_runs():
    # An option parsed and never read is a silent no-op: each field must be read by the loop (or its run log),
    # the assembly of the task (distill.build, with the metric options it hands on), the checkpoints the loop
    # writes, or the task's CLI. The training loop builds the optimizer; schedule.py gives it the learning rate.
    package = Path(cfg.__file__).parent / "training"
    modules = ("train.py", "schedule.py", "run_log.py", "checkpoint.py")
    readers = "\n".join([*((package / name).read_text() for name in modules),
                         inspect.getsource(distill.build), inspect.getsource(distill.PIDConfig.metric_options),
                         inspect.getsource(distill_cli)])
    unread = [key for key in cfg.leaf_keys(DistillConfig) if not re.search(rf"\.{key.split('.')[-1]}\b", readers)]
    assert unread == []


def dry_run(capsys, *argv: str) -> str:
    """What `pid-distill ... --dry-run` prints on stdout: the resolved configuration. The launch check after it
    fails here for the paper presets (no teacher file, no LPIPS weights) with status 2, a user's mistake."""
    try:
        distill_cli.main([*argv, "--dry-run"])
    except SystemExit as exit_info:
        assert exit_info.code == errors.USAGE_STATUS
    return capsys.readouterr().out


def test_dry_run_prints_the_resolved_configuration(capsys):
    printed = json.loads(dry_run(capsys, "--preset=cifar10", "--train.lr=1e-4"))
    assert printed == to_dict(resolve("cifar10", {"train.lr": "1e-4"}))


def test_command_line_errors_exit_with_a_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        distill_cli.main(["--train.batchsize=3"])
    assert exit_info.value.code == 2
    assert "unknown option --train.batchsize; did you mean --train.batch" in capsys.readouterr().err


def test_check_raises_a_config_error_naming_the_key():
    cfg.check(True, "train.lr", "unused")
    with pytest.raises(ConfigError, match=r"^train.lr: must be > 0, got -1$"):
        cfg.check(False, "train.lr", "must be > 0, got -1")


# ----------------------------------------------------------------------------------------------------------
# Preset files.

PRESET_FOLDER = Path(config_files.PRESETS_DIR)
TASKS = {"distill": DistillConfig, "teacher": teacher_training.TeacherTrainingConfig}


def test_every_preset_of_both_tasks_is_a_file():
    assert config_files.preset_names("distill") == ["cifar10", "cifar10-central", "default", "edm2-img512-s",
                                               "edm2-img512-xs", "edm2-img64-s", "imagenet64", "imagenet64-central",
                                               "shapes-zoo"]
    assert config_files.preset_names("teacher") == ["default"]


def _flat_file(path: Path) -> dict:
    """The dotted keys a file sets itself (not its _base), without its _doc notes."""
    data = json.loads(path.read_text())
    data.pop("_base", None)
    return cfg.flatten(config_files._without_docs(data))


@pytest.mark.parametrize("task, name", [(task, name) for task in TASKS for name in config_files.preset_names(task)])
def test_a_preset_file_holds_only_what_differs(task, name):
    path = PRESET_FOLDER / task / f"{name}.json"
    base = json.loads(path.read_text()).get("_base")
    start = config_files.read_config_file(str(PRESET_FOLDER / task / base)) if base else {}
    below = cfg.flatten(to_dict(apply_overrides(TASKS[task], start, {})))
    restated = [key for key, value in _flat_file(path).items() if below[key] == value]
    assert restated == []


def test_the_defaults_are_the_papers_cifar10_run():
    assert diff(DistillConfig(), resolve("cifar10")) == ["run.dir"]


def test_config_file_and_preset_print_the_same_dry_run(capsys):
    by_name = dry_run(capsys, "--preset=cifar10")
    assert dry_run(capsys, f"--config={PRESET_FOLDER / 'distill' / 'cifar10.json'}") == by_name
    train_teacher_cli.main(["--dry-run"])
    by_default = capsys.readouterr().out
    train_teacher_cli.main([f"--config={PRESET_FOLDER / 'teacher' / 'default.json'}", "--dry-run"])
    assert capsys.readouterr().out == by_default


def test_a_run_folders_config_json_replays_the_run(tmp_path, capsys):
    stored = dry_run(capsys, "--preset=imagenet64-central", "--train.lr=3e-5")
    (tmp_path / "config.json").write_text(stored)
    assert dry_run(capsys, f"--config={tmp_path / 'config.json'}") == stored
    # Overrides apply on top of a file.
    assert json.loads(dry_run(capsys, f"--config={tmp_path / 'config.json'}", "--train.steps=7"))["train"]["steps"] == 7


def test_own_files_with_docs_and_a_base(tmp_path):
    (tmp_path / "base.json").write_text(json.dumps({"_doc": "why", "train": {"batch": 64, "_doc": "why"}}))
    (tmp_path / "mine.json").write_text(json.dumps({"_base": "base.json", "train": {"lr": 1e-3}}))
    config = config_files.load(DistillConfig, str(tmp_path / "mine.json"), {"micro_batch": "16"})
    assert (config.train.batch, config.train.lr, config.train.micro_batch) == (64, 1e-3, 16)
    (tmp_path / "bad.json").write_text(json.dumps({"train": {"batchsize": 64}}))
    with pytest.raises(ConfigError, match="unknown key train.batchsize"):
        config_files.load(DistillConfig, str(tmp_path / "bad.json"))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="cannot read the configuration file"):
        config_files.load(DistillConfig, str(tmp_path / "broken.json"))


def test_preset_and_config_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        distill_cli.main(["--preset=cifar10", "--config=x.json", "--dry-run"])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.slow
def test_the_preset_files_are_installed_as_package_data(tmp_path):
    # A non-editable install copies what setuptools' build step collects: run it on a copy of the sources (it
    # writes beside them) and look for every preset file among the installed package's files.
    repo, source = Path(cfg.__file__).parents[1], tmp_path / "source"
    source.mkdir()
    for name in ("setup.py", "README.md", "pid_diffusion", "configs"):
        (shutil.copytree if (repo / name).is_dir() else shutil.copy)(repo / name, source / name)
    subprocess.run([sys.executable, "setup.py", "-q", "build", f"--build-base={tmp_path / 'build'}"], cwd=source,
                   check=True, capture_output=True)
    installed = tmp_path / "build" / "lib" / "pid_diffusion" / "configs"
    for task in TASKS:
        for name in config_files.preset_names(task):
            assert json.loads((installed / task / f"{name}.json").read_text()) == \
                json.loads((PRESET_FOLDER / task / f"{name}.json").read_text())
