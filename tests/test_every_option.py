"""Every option `--help` lists, through the commands: `pid-distill` on the bundled teacher and `pid-train-teacher`
on a tiny network, two steps of one or two images each, once per value of every option that runs on a CPU, alone
and in the combinations the docs recommend, so that no documented option can ship broken again.

Each key of the configuration is either given values below or named in a `NOT_RUN` table with the reason; a key
added to the schema fails `test_every_key_is_covered` until it is given one. The runs share this process (the
commands' `main`), the LPIPS metrics read stand-in weights (test_metrics), and each run is checked to have
trained both steps with a finite loss and written its training state.
"""

import json
import math

import pytest
import torch

from pid_diffusion.training import checkpoint, plots
from pid_diffusion.cli import distill as distill_cli
from pid_diffusion.cli import train_teacher as teacher_cli
from pid_diffusion.config import leaf_fields
from pid_diffusion.distill import DistillConfig
from pid_diffusion.distances import Metric
from pid_diffusion.student import PIDStudent
from pid_diffusion.teacher import load_teacher
from pid_diffusion.teacher_training import TeacherTrainingConfig

from launch import REPO
from factories import edm_release, write_edm_pickle, write_lpips_standins

# In-process, but about a minute of CPU in all: the full suite's tier.
pytestmark = [pytest.mark.slow, pytest.mark.options_sweep]

BUNDLED_TEACHER = REPO / "model_zoo" / "edm-shapes-16x16.pt"
STEPS = 2
# What every run shares: two steps of one image, a log record per step, nothing periodic but the last training
# state (the values below switch the periodic files on).
COMMON = [f"--train.steps={STEPS}", "--run.log_every=1", "--run.image_every=0", "--run.snapshot_every=0",
          "--run.sync_check_every=0"]
# The student's differenced passes in fp32: the 16-bit cases below then run a safe recipe (docs/precision.md).
DISTILL = ["--preset=default", "--train.batch=1", "--pid.student_precision=fp32", *COMMON]
TEACHER = ["--train.batch=2", "--data.num_images=4", "--network.model_channels=8", "--network.channel_mult=1",
           *COMMON]

# Options of the shared trainer (run.*, train.*): (case name, overrides). Each runs under both commands.
TRAINER_CASES = [
    ("snapshots", ["--run.snapshot_every=1"]),
    ("snapshots kept", ["--run.snapshot_every=1", "--run.keep_snapshots=1"]),
    ("training states", ["--run.checkpoint_every=1", "--run.keep_checkpoints=1"]),
    ("all training states", ["--run.checkpoint_every=1", "--run.keep_checkpoints=0"]),
    ("log interval", ["--run.log_every=2"]),
    ("sample grids", ["--run.image_every=1", "--run.image_count=2"]),
    ("rank check", ["--run.sync_check_every=1"]),
    ("timeout", ["--run.timeout_minutes=1"]),
    ("tensorboard", ["--run.tensorboard=true"]),
    ("no preemption signals", ["--run.preempt_signals="]),
    ("one preemption signal", ["--run.preempt_signals=SIGUSR1"]),
    ("seed", ["--train.seed=1"]),
    ("micro-batches", ["--train.batch=2", "--train.micro_batch=1"]),
    ("fp16", ["--train.precision=fp16"]),
    ("bf16", ["--train.precision=bf16"]),
    ("fp32", ["--train.precision=fp32"]),
    ("adam", ["--train.optimizer=adam"]),
    ("radam", ["--train.optimizer=radam"]),
    ("optimizer numbers", ["--train.lr=1e-3", "--train.betas=0.5,0.9", "--train.eps=1e-6", "--train.weight_decay=0.01"]),
    ("warm-up", ["--train.warmup_steps=1"]),
    ("cosine decay", ["--train.lr_decay=cosine"]),
    ("linear decay", ["--train.lr_decay=linear"]),
    ("decay horizon", ["--train.lr_decay=cosine", "--train.lr_decay_steps=3"]),
    ("constant lr", ["--train.lr_decay=constant"]),
    ("gradient clipping", ["--train.grad_clip=1.0"]),
    ("one EMA", ["--train.ema_rates=0.5"]),
    ("power-function EMAs", ["--train.phema_stds=0.05,0.1"]),
    ("activation checkpointing", ["--train.activation_checkpointing=true"]),
    ("channels-last", ["--train.channels_last=true"]),
    # The speed options together, as README's "Speed options" lists them (compile aside: NOT_RUN).
    ("speed options together", ["--train.batch=2", "--train.micro_batch=1", "--train.activation_checkpointing=true",
                                "--train.channels_last=true", "--train.precision=bf16"]),
]

# pid-distill's own sections. {student_file} and {teacher_pkl} are files made by the `files` fixture.
DISTILL_CASES = [
    ("teacher .pkl", ["--teacher.path={teacher_pkl}"]),
    ("rounded 16-bit difference", ["--train.precision=bf16", "--pid.student_precision=train_rounded_difference"]),
    ("guided teacher", ["--teacher.guide_path={teacher_pkl}", "--teacher.guidance=2"]),  # EDM2's D_g + w (D - D_g)
    ("random student", ["--student.init=random"]),
    ("student file", ["--student.init=file", "--student.path={student_file}"]),
    ("student dropout", ["--student.dropout=0.1"]),
    ("grid", ["--pid.num_points=3", "--pid.rho=5", "--pid.sigma_min=0.01", "--pid.sigma_max=40"]),
    *[(f"metric {metric.value}", [f"--pid.metric={metric.value}"]) for metric in Metric],
    ("pseudo-Huber c", ["--pid.metric=pseudo_huber", "--pid.pseudo_huber_c=0.01"]),
    ("central", ["--pid.derivative=central"]),
    ("jvp", ["--pid.derivative=jvp"]),
    ("forward", ["--pid.derivative=forward"]),
    ("derivative form", ["--pid.form=derivative"]),
    ("denoiser form", ["--pid.form=denoiser"]),
    ("stop neighbour gradient", ["--pid.stop_neighbour_grad=true"]),
    ("central, stop neighbour gradient", ["--pid.derivative=central", "--pid.stop_neighbour_grad=true"]),
    # The paper's runs on the bundled teacher: preset cifar10 is "metric lpips_piq" above (forward, denoiser: the
    # defaults), preset cifar10-central is this one. LPIPS upsamples to 224×224: its cases are the sweep's dearest.
    ("paper: lpips_piq central", ["--pid.metric=lpips_piq", "--pid.derivative=central"]),
    # The speed options with the paper's metric (activation checkpointing then covers LPIPS' VGG stages too).
    # fp16 is run alone: CPU fp16 convolutions at LPIPS' 224×224 take minutes, and fp16 is a GPU precision.
    ("speed options with LPIPS", ["--pid.metric=lpips_piq", "--train.activation_checkpointing=true",
                                  "--train.channels_last=true", "--train.precision=bf16"]),
    ("jvp channels-last bf16", ["--pid.derivative=jvp", "--train.channels_last=true", "--train.precision=bf16"]),
]

# pid-train-teacher runs the same training loop: of the trainer's options it runs those that act on the network
# (precision, memory layout, recomputation) and micro-batches; the intervals and files are pid-distill's above.
TEACHER_TRAINER_CASES = [case for case in TRAINER_CASES if case[0] in (
    "micro-batches", "fp16", "bf16", "activation checkpointing", "channels-last", "speed options together")]

TEACHER_CASES = [
    ("resolution", ["--data.resolution=32"]),  # Below 12 the shapes' radii do not fit (toydata's own check).
    ("network", ["--network.model_channels=16", "--network.num_blocks=2", "--network.channel_mult=1,2",
                 "--network.attn_resolutions=8", "--network.dropout=0.1"]),
    ("data", ["--data.num_images=8", "--data.seed=1"]),
    ("EDM loss", ["--edm.P_mean=-1.0", "--edm.P_std=1.0", "--edm.sigma_data=0.4"]),
    ("conditional", ["--edm.conditional=true"]),
]

# Keys no case above gives a value, with the reason.
NOT_RUN = {
    "run.dir": "every run names its own folder",
    "train.steps": f"every run takes {STEPS} steps",
    "train.batch": "every run sets it (1 or 2 images)",
    "train.compile": "torch.compile on a CPU compiles C++ kernels for minutes; benchmarks/gpu_check.py runs it",
    "teacher.preset": "names a release architecture (55 M parameters and more) for a plain state dict: "
                      "test_release_commands runs it",
}


def _keys(args: list[str]) -> set[str]:
    return {arg[2:].split("=", 1)[0] for arg in args}


def command_line(common: list[str], case: list[str]) -> list[str]:
    """`common` with the case's values in place of its own for the keys the case sets (a key may be given once)."""
    given = _keys(case)
    return [arg for arg in common if arg[2:].split("=", 1)[0] not in given] + case


def test_every_key_is_covered():
    for schema, cases in ((DistillConfig, TRAINER_CASES + DISTILL_CASES), (TeacherTrainingConfig,
                                                                           TRAINER_CASES + TEACHER_CASES)):
        # pid-train-teacher's run.* and train.* are pid-distill's, run there through the same training loop.
        given = set().union(*(_keys(args) for _, args in cases), NOT_RUN)
        keys = {key for key, _, _ in leaf_fields(schema)}
        assert keys <= given, f"options no case runs: {sorted(keys - given)}"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """LPIPS stand-in weights in a TORCH_HOME, the bundled teacher as an EDM .pkl, and an official student file."""
    root = tmp_path_factory.mktemp("options")
    checkpoints = root / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    write_lpips_standins(checkpoints)
    teacher = load_teacher(BUNDLED_TEACHER)
    teacher_pkl = write_edm_pickle(root / "teacher.pkl", edm_release(teacher, teacher.init_kwargs))
    student = PIDStudent.from_teacher(teacher, 0.002, 80.0)
    torch.save(student.model.state_dict(), root / "student.pt")
    return dict(torch_home=root / "torch_home", teacher_pkl=str(teacher_pkl), student_file=str(root / "student.pt"))


@pytest.fixture
def quick_plots(monkeypatch):
    """training.png is drawn by matplotlib at every training state: a third of a two-step run's time, and no option
    changes it (test_plots and test_train check the plot). Recorded here instead of drawn."""
    drawn = []
    monkeypatch.setattr(plots, "plot_training", lambda records, path: drawn.append(path))
    return drawn


def assert_trained(folder) -> None:
    """Both steps ran with finite losses and the last training state is complete."""
    assert checkpoint.latest_training_state(str(folder))[0] == STEPS
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == STEPS and all(math.isfinite(record["loss"]) for record in records)


def _check_files(name: str, folder) -> None:
    """What a case's option writes besides the training state."""
    names = {path.name for path in folder.iterdir()}
    if name == "tensorboard":
        assert any(n.startswith("events.out.tfevents") for n in names)
    if name == "sample grids":
        assert {"samples-00000001.png", "samples-00000002.png"} <= names
    if name.startswith("snapshots"):
        expected = [2] if name == "snapshots kept" else [1, 2]
        assert [step for step, _ in checkpoint.find_snapshots(str(folder))] == expected
    if name == "training states":
        assert [step for step, _ in checkpoint.find_training_states(str(folder))] == [2]
    if name == "all training states":
        assert [step for step, _ in checkpoint.find_training_states(str(folder))] == [1, 2]


@pytest.mark.parametrize("name, args", TRAINER_CASES + DISTILL_CASES, ids=[n for n, _ in TRAINER_CASES + DISTILL_CASES])
def test_pid_distill_runs_with(name, args, files, tmp_path, monkeypatch, quick_plots):
    monkeypatch.setenv("TORCH_HOME", str(files["torch_home"]))
    args = [arg.format(**files) for arg in args]
    distill_cli.main([*command_line(DISTILL, args), f"--run.dir={tmp_path}"])
    assert_trained(tmp_path)
    assert quick_plots  # training.png was asked for
    _check_files(name, tmp_path)


@pytest.mark.parametrize("name, args", TEACHER_TRAINER_CASES + TEACHER_CASES,
                         ids=[n for n, _ in TEACHER_TRAINER_CASES + TEACHER_CASES])
def test_pid_train_teacher_runs_with(name, args, tmp_path, quick_plots):
    teacher_cli.main([*command_line(TEACHER, args), f"--run.dir={tmp_path}"])
    assert_trained(tmp_path)
    assert quick_plots
    _check_files(name, tmp_path)
