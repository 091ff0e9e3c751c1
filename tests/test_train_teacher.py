"""`pid-train-teacher` end to end at toy size: EDM training on the shared trainer, export, and loading."""

import PIL.Image
import torch

from pid_diffusion.cli import train_teacher
from pid_diffusion.networks.edm import EDMPrecond
from pid_diffusion.teacher import load_teacher


def test_trains_exports_and_the_export_loads_as_a_teacher(tmp_path):
    run_dir, exported = tmp_path / "run", tmp_path / "teacher.pt"
    tiny = ["--data.num_images=64", "--network.model_channels=8", "--network.channel_mult=1,2",
            "--train.steps=3", "--train.batch=8", "--run.checkpoint_every=3", "--run.image_every=0",
            f"--run.dir={run_dir}"]
    train_teacher.main(tiny)
    assert (run_dir / "checkpoint-00000003.pt").is_file()
    train_teacher.main([*tiny, f"--export={exported}"])  # resumes at the last step, trains no further

    teacher = load_teacher(str(exported))
    assert isinstance(teacher, EDMPrecond) and not teacher.training
    assert teacher.img_resolution == 16 and teacher.label_dim == 0
    checkpoint = torch.load(run_dir / "checkpoint-00000003.pt", weights_only=True)
    ema = checkpoint["ema"][str(0.999)]
    assert all(torch.equal(ema[key], value) for key, value in teacher.state_dict().items())
    assert PIL.Image.open(train_teacher.grid_path(str(exported))).size[0] > 16
