"""EDM2 teachers through the commands a user types, on tiny networks: a latent teacher guided by a second
network → pid-distill (decoded previews) → pid-sample (grid, npz, PNGs) → pid-fid against EDM2's reference
pickle; the teacher's guided Heun sampler; the one-line errors of the latent path. The VAE is the fixtures'
tiny AutoencoderKL, put by the test into a Hugging Face cache folder as `stabilityai/sd-vae-ft-mse`. The
full-size img512-xs path is test_edm2_release.py's."""

import csv
import io
import math
import pickle
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from edm2_helpers import install_tiny_vae, sd_vae_description, write_teacher
from launch import REPO, mpirun_command, mpirun_env, needs_mpirun, subprocess_env
from pid_diffusion import encoders
from pid_diffusion.images import PREVIEW_MIN_PIXELS
from factories import SMALL_FEATURE_DIM, small_detector, write_lpips_standins

pytest.importorskip("diffusers", reason=encoders.DIFFUSERS_MISSING)

# A latent teacher shaped like EDM2's ImageNet-512 nets (4 latent channels, conditional), shrunk: 8×8 latents
# decoded by the tiny VAE (two blocks: ×2) to 16×16 RGB images.
TINY = dict(img_resolution=8, img_channels=4, label_dim=10, model_channels=16, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[4], channels_per_head=16, use_fp16=False)
IMAGE_SHAPE = (16, 16, 3)
GUIDANCE = "2.1"  # EDM2's FID-optimal weight for img512-s guided by xs

pytestmark = pytest.mark.slow  # every test runs the commands as processes


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("edm2")
    install_tiny_vae(root / "hub")
    (root / "torch_home" / "hub" / "checkpoints").mkdir(parents=True)
    write_lpips_standins(root / "torch_home" / "hub" / "checkpoints")
    write_teacher(root / "main.pt", TINY, sd_vae_description(), seed=0)
    write_teacher(root / "guide.pt", TINY, sd_vae_description(), seed=1)
    return root


def run(workspace, module: str, *args: str, status: int = 0) -> str:
    env = subprocess_env(HF_HUB_CACHE=str(workspace / "hub"), HF_HUB_OFFLINE="1",
                         TORCH_HOME=str(workspace / "torch_home"))
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == status, f"{module} {args}\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def distill(workspace, *overrides: str, metric: str = "l2", status: int = 0) -> str:
    return run(workspace, "pid_diffusion.cli.distill", f"--teacher.path={workspace / 'main.pt'}",
               f"--teacher.guide_path={workspace / 'guide.pt'}", f"--teacher.guidance={GUIDANCE}",
               f"--pid.metric={metric}", "--train.steps=2", "--train.batch=2", "--train.ema_rates=0.999",
               "--run.image_count=4", *overrides, status=status)


def test_guided_latent_teacher_through_distill_sample_and_fid(workspace):
    run_dir = workspace / "run"
    distill(workspace, f"--run.dir={run_dir}", "--run.image_every=2", "--run.checkpoint_every=1",
            "--run.snapshot_every=1")
    preview = np.asarray(PIL.Image.open(run_dir / "samples-00000002.png"))
    scale = math.ceil(PREVIEW_MIN_PIXELS / IMAGE_SHAPE[0])  # previews magnify small images
    assert preview.shape == (2 * scale * IMAGE_SHAPE[0] + 6, 2 * scale * IMAGE_SHAPE[1] + 6, 3)  # 2×2 decoded, padding 2
    payload = torch.load(run_dir / "checkpoint-00000002.pt", weights_only=True)
    kwargs = payload["model_spec"]["kwargs"]
    assert kwargs["network_class"] == "Precond" and kwargs["encoder"] == sd_vae_description()
    assert sorted(payload["fingerprints"]) == ["teacher.guide_path", "teacher.path", "teacher.preset"]

    # One-step samples, decoded by the VAE: a grid, an npz of uint8 NHWC images, one PNG per seed.
    last = str(run_dir / "checkpoint-00000002.pt")
    run(workspace, "pid_diffusion.cli.sample", "--checkpoint", last, "--ema", "0.999", "--seeds", "0-3",
        "--grid", str(workspace / "grid.png"), "--npz", str(workspace / "samples.npz"),
        "--png-dir", str(workspace / "pngs"))
    with np.load(workspace / "samples.npz") as samples:
        assert samples["images"].shape == (4, *IMAGE_SHAPE) and samples["images"].dtype == np.uint8
        assert samples["images"].std() > 0
        assert list(samples["seeds"]) == [0, 1, 2, 3] and samples["labels"].shape == (4,)
        first = samples["images"][0]
    assert np.array_equal(np.asarray(PIL.Image.open(workspace / "pngs" / "000000.png")), first)

    # FID of every snapshot against EDM2's reference pickle (dict(num_images, fid=dict(mu, sigma), ...)).
    reference = workspace / "img512.pkl"
    with open(reference, "wb") as file:
        pickle.dump(dict(num_images=10, fid=dict(mu=np.zeros(SMALL_FEATURE_DIM), sigma=np.eye(SMALL_FEATURE_DIM)),
                         fd_dinov2=dict(mu=np.zeros(4), sigma=np.eye(4))), file)
    run(workspace, "pid_diffusion.cli.fid", f"--run={run_dir}", f"--ref={reference}", "--seeds", "0-9",
        "--ema", "0.999", "--batch=4", f"--detector={small_detector(workspace / 'detector.pt')}")
    rows = list(csv.DictReader(io.StringIO((run_dir / "fid.csv").read_text())))
    assert sorted(int(row["step"]) for row in rows) == [1, 2]
    assert all(row["fid"] and float(row["fid"]) > 0 and not row["error"] for row in rows), rows


def test_guided_teacher_samples_with_edm2_heun(workspace):
    out = run(workspace, "pid_diffusion.cli.sample", "--teacher", str(workspace / "main.pt"), "--guide",
              str(workspace / "guide.pt"), "--guidance", GUIDANCE, "--seeds", "0-1", "--npz",
              str(workspace / "teacher.npz"))
    assert "63 network call(s) each" in out  # EDM2's 32 Heun steps
    with np.load(workspace / "teacher.npz") as samples:
        assert samples["images"].shape == (2, *IMAGE_SHAPE)


def test_latent_path_errors_are_one_line(workspace, tmp_path):
    lpips = distill(workspace, f"--run.dir={tmp_path / 'lpips'}", metric="lpips_piq", status=2)
    assert "pid-distill: error: pid.metric: lpips_piq compares pixels" in lpips
    assert "metric=l2 or metric=pseudo_huber" in lpips

    checkpointing = distill(workspace, f"--run.dir={tmp_path / 'ckpt'}", "--train.activation_checkpointing=true",
                            status=2)
    assert "pid-distill: error: train.activation_checkpointing: applies to EDM's U-Nets only" in checkpointing

    no_guide = run(workspace, "pid_diffusion.cli.distill", f"--teacher.path={workspace / 'main.pt'}",
                   f"--teacher.guidance={GUIDANCE}", "--pid.metric=l2", "--dry-run", status=2)
    assert "pid-distill: error: teacher.guide_path: a guide needs a guidance weight" in no_guide

    env_missing = subprocess.run(
        [sys.executable, "-m", "pid_diffusion.cli.sample", "--teacher", str(workspace / "main.pt"), "--seeds", "0",
         "--steps", "2", "--npz", str(tmp_path / "x.npz")], cwd=REPO, capture_output=True, text=True, timeout=300,
        env=subprocess_env(HF_HUB_CACHE=str(tmp_path / "empty_hub"), HF_HUB_OFFLINE="1"))
    assert env_missing.returncode == 2, env_missing.stderr
    lines = [line for line in env_missing.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("pid-sample: error: the VAE stabilityai/sd-vae-ft-mse")
    for expected in (*encoders.VAE_FILES, str(tmp_path / "empty_hub"), "pid-fetch-weights"):
        assert expected in lines[0]


@needs_mpirun
def test_two_ranks_keep_forced_weight_normalisation_in_step(workspace):
    """DDP with EDM2's in-place weight normalisation: two ranks of one sample each, their weights compared after
    every step (sync_check_every=1); the result equals the one-process run of the same global batch."""
    runs = {}
    for processes in (1, 2):
        run_dir = workspace / f"ranks-{processes}"
        arguments = ["-m", "pid_diffusion.cli.distill", f"--teacher.path={workspace / 'main.pt'}",
                     f"--teacher.guide_path={workspace / 'guide.pt'}", f"--teacher.guidance={GUIDANCE}",
                     "--pid.metric=l2", "--train.steps=2", "--train.batch=2", "--train.ema_rates=0.999",
                     "--run.image_every=0", "--run.sync_check_every=1", f"--run.dir={run_dir}"]
        env = {**mpirun_env(), "HF_HUB_CACHE": str(workspace / "hub"), "HF_HUB_OFFLINE": "1",
               "OMP_NUM_THREADS": "1"}
        command = mpirun_command(processes, *arguments) if processes > 1 else [sys.executable, *arguments]
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout + result.stderr
        runs[processes] = torch.load(run_dir / "checkpoint-00000002.pt", weights_only=True)["model"]
    for key, value in runs[1].items():
        torch.testing.assert_close(runs[2][key], value, rtol=1e-4, atol=1e-5, msg=key)
