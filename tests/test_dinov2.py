"""FD_DINOv2: the DINOv2 network and EDM2's preprocessing against the outputs of DINOv2's and EDM2's own code
(fixtures/dinov2/, README.md there), the weights from torch hub's cache, EDM2's reference format, and the whole
chain through the commands: pid-distill with power-function EMAs → pid-phema → pid-fid-ref and pid-fid with
FD_DINOv2 beside FID."""

import csv
import io
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from pid_diffusion import dinov2
from pid_diffusion.fid import FeatureStats, fid_from_stats
from pid_diffusion.images import write_npz
from pid_diffusion.reference_stats import ReferenceStats, load_stats, save_stats
from pid_diffusion.utils import hub

from factories import load_npz, small_detector, tiny_dinov2_reference, write_tiny_dinov2_weights
from launch import subprocess_env

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "dinov2"
REF = tiny_dinov2_reference()
FEATURES_ATOL = 1e-5  # The fixture README's check for bit-identical preprocessing (measured here: 0).
FD_ATOL = 1e-4  # The fixture README's check of fd_ab (measured here: 0).


def tiny_model() -> dinov2.DINOv2:
    model = dinov2.DINOv2(dinov2.shape_of(REF["state_dict"], REF["model_kwargs"]["num_heads"]))
    model.load_state_dict(REF["state_dict"])  # strict: DINOv2's key names, nothing missing or extra
    return model.eval()


def test_shape_and_keys_are_dinov2s():
    kwargs = REF["model_kwargs"]
    assert dinov2.shape_of(REF["state_dict"], kwargs["num_heads"]) == dinov2.ViTShape(
        embed_dim=kwargs["embed_dim"], depth=kwargs["depth"], num_heads=kwargs["num_heads"],
        patch_size=kwargs["patch_size"], grid=kwargs["img_size"] // kwargs["patch_size"], mlp_ratio=kwargs["mlp_ratio"])
    vitl14 = REF["vitl14_kwargs"]
    assert (dinov2.VITL14.embed_dim, dinov2.VITL14.depth, dinov2.VITL14.num_heads) == (
        vitl14["embed_dim"], vitl14["depth"], vitl14["num_heads"])
    # The full-size network, built on the meta device: the released checkpoint's 343 entries, in order.
    with torch.device("meta"):
        full = dinov2.DINOv2()
    lines = (FIXTURES / "dinov2_vitl14_keys.txt").read_text().splitlines()
    assert int(lines[0]) == sum(p.numel() for p in full.parameters()) == 304_368_640
    assert [f"{key}\t{list(value.shape)}" for key, value in full.state_dict().items()] == lines[1:]


@pytest.mark.parametrize("case", sorted(REF["cases"]))
def test_preprocessing_and_features_equal_edm2_and_dinov2(case):
    ref = REF["cases"][case]
    x = dinov2.preprocess(ref["images_uint8"])
    assert x.shape[-2:] == (dinov2.INPUT_SIZE, dinov2.INPUT_SIZE)
    sub, corner = REF["preprocess"]["sub_stride"], REF["preprocess"]["corner"]
    assert torch.equal(x[:, :, ::sub, ::sub], ref["preprocessed_sub"])
    assert torch.equal(torch.stack([x[..., :corner, :corner], x[..., -corner:, -corner:]], dim=1),
                       ref["preprocessed_corners"])
    torch.testing.assert_close(x.double().sum((2, 3)), ref["preprocessed_sum"], rtol=1e-7, atol=1e-3)
    torch.testing.assert_close(x.amin((1, 2, 3)), ref["preprocessed_min"], rtol=0, atol=0)
    torch.testing.assert_close(x.amax((1, 2, 3)), ref["preprocessed_max"], rtol=0, atol=0)
    features = dinov2.DINOv2Detector(tiny_model()).features(ref["images_uint8"])
    torch.testing.assert_close(features, ref["features_fp32"], rtol=0, atol=FEATURES_ATOL)
    torch.testing.assert_close(features.double(), ref["features_fp64"], rtol=0, atol=10 * FEATURES_ATOL)


def test_position_embeddings_resampled_as_dinov2_does():
    patches = dinov2.INPUT_SIZE // REF["model_kwargs"]["patch_size"]
    torch.testing.assert_close(tiny_model().position_embedding(patches, patches), REF["pos_embed_224_fp32"],
                               rtol=0, atol=1e-6)


def test_fd_equals_edm2():
    detector, fd, stats = dinov2.DINOv2Detector(tiny_model()), REF["fd"], {}
    for name, batch in zip("ab", fd["batch_sizes"]):
        accumulator = FeatureStats(detector.feature_dim)
        for images in fd[f"images_{name}"].split(batch):
            accumulator.update(detector.features(images))
        stats[name] = accumulator.mean_and_covariance()
        np.testing.assert_allclose(stats[name][0], fd[f"mu_{name}"].numpy(), rtol=0, atol=1e-6)
    assert fid_from_stats(*stats["a"], *stats["b"]) == pytest.approx(fd["fd_ab"], abs=FD_ATOL)
    assert fid_from_stats(*stats["b"], *stats["a"]) == pytest.approx(fd["fd_ba"], abs=FD_ATOL)


# ----------------------------------------------------------------------------------------------------------
# The weights file and the reference format.

def test_weights_come_from_the_hub_cache_and_offline_the_error_names_file_and_url(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *args, **kwargs: (_ for _ in ()).throw(urllib.error.URLError("offline (simulated)")))
    with pytest.raises(hub.MissingWeightsError) as error:
        dinov2.load_dinov2()
    assert dinov2.DINOV2.url in str(error.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / dinov2.DINOV2_FILENAME) in str(error.value)
    write_tiny_dinov2_weights(tmp_path / "torch")
    features = dinov2.load_dinov2().features(REF["cases"]["img32"]["images_uint8"])
    torch.testing.assert_close(features, REF["cases"]["img32"]["features_fp32"], rtol=0, atol=FEATURES_ATOL)

    # DINOv2's own release format, a bare state dict: the heads are 64 channels wide, as in every release.
    shape = dinov2.ViTShape(embed_dim=128, depth=1, num_heads=2, grid=4)
    torch.manual_seed(0)
    model = dinov2.DINOv2(shape)
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    loaded = dinov2.load_dinov2(str(tmp_path / "bare.pth"))
    assert loaded.model.shape == shape
    images = torch.randint(0, 256, (2, 3, 20, 20), dtype=torch.uint8)
    torch.testing.assert_close(loaded.features(images), dinov2.DINOv2Detector(model).features(images), rtol=0, atol=0)
    torch.save({"cls_token": torch.zeros(1, 1, 8)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a DINOv2 state dict"):
        dinov2.load_dinov2(str(tmp_path / "other.pth"))


def test_edm2_reference_format_round_trips_and_edm_npz_is_fid_only(tmp_path):
    generator = np.random.default_rng(0)
    stats = ReferenceStats(fid=(generator.standard_normal(4), np.eye(4)), fd_dinov2=(np.ones(3), np.eye(3) * 2),
                           num_images=7)
    save_stats(str(tmp_path / "ref.pkl"), stats)
    loaded = load_stats(str(tmp_path / "ref.pkl"))
    assert loaded.num_images == 7 and np.array_equal(loaded.fid[0], stats.fid[0])
    assert np.array_equal(loaded.fd_dinov2[1], stats.fd_dinov2[1])
    with pytest.raises(ValueError, match="EDM's .npz holds the Inception statistics only"):
        save_stats(str(tmp_path / "ref.npz"), stats)
    save_stats(str(tmp_path / "ref.npz"), ReferenceStats(fid=stats.fid))
    assert load_stats(str(tmp_path / "ref.npz")).fd_dinov2 is None
    # A pickle with anything but numbers, dicts and arrays is refused before it runs.
    (tmp_path / "evil.pkl").write_bytes(b"cos\nsystem\n(S'true'\ntR.")
    with pytest.raises(ValueError, match="refusing to load global os.system"):
        load_stats(str(tmp_path / "evil.pkl"))


# ----------------------------------------------------------------------------------------------------------
# The chain through the commands.

NUM_IMAGES = 100  # Enough images for covariances of the tiny network's 64 features (rank 63 after LayerNorm).


def run(*command: str, torch_home: Path) -> str:
    job = subprocess.run([sys.executable, "-m", *command], cwd=REPO, env=subprocess_env(TORCH_HOME=str(torch_home)),
                         capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stdout + job.stderr
    return job.stdout


@pytest.mark.slow
def test_distill_with_power_emas_then_phema_then_fid_with_fd_dinov2(tmp_path):
    torch_home = tmp_path / "torch"
    write_tiny_dinov2_weights(torch_home)
    detector = small_detector(tmp_path / "detector.pt")
    run_dir = tmp_path / "run"
    run("pid_diffusion.cli.distill", "--preset=default", f"--run.dir={run_dir}", "--train.steps=4",
        "--train.batch=2", "--pid.num_points=10", "--run.snapshot_every=1", "--run.image_every=0",
        "--train.phema_stds=0.05,0.1", "--train.ema_rates=0.999", torch_home=torch_home)
    out = run("pid_diffusion.cli.phema", str(run_dir), "--std", "0.03", "0.08", torch_home=torch_home)
    assert f"phema-00000004.pt (ema std-0.030, std-0.080)" in out

    # EDM2's reference format from images, then both metrics of the reconstructions.
    images = np.random.default_rng(0).integers(0, 256, (NUM_IMAGES, 16, 16, 3), dtype=np.uint8)
    write_npz(str(tmp_path / "data.npz"), images=images)
    run("pid_diffusion.cli.fid_ref", "--data", str(tmp_path / "data.npz"), "--fd-dinov2", "--dest",
        str(tmp_path / "ref.pkl"), "--detector", detector, torch_home=torch_home)
    reference = load_stats(str(tmp_path / "ref.pkl"))
    assert reference.num_images == NUM_IMAGES and reference.fd_dinov2[0].shape == (REF["model_kwargs"]["embed_dim"],)
    csv_path = tmp_path / "fid.csv"
    run("pid_diffusion.cli.fid", "--run", str(run_dir), "--phema-std", "0.03", "0.08", "--ref",
        str(tmp_path / "ref.pkl"), "--fd-dinov2", "--detector", detector, "--csv", str(csv_path), "--seeds",
        f"0-{NUM_IMAGES - 1}", "--batch", "50", torch_home=torch_home)
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert [(row["checkpoint"], row["ema"]) for row in rows] == [("phema-00000004.pt", "std-0.030"),
                                                                 ("phema-00000004.pt", "std-0.080")]
    assert all(float(row["fid"]) > 0 and float(row["fd_dinov2"]) > 0 and not row["error"] for row in rows)
    assert rows[0]["fd_dinov2"] != rows[1]["fd_dinov2"]
    assert (run_dir / "fid-phema.png").is_file()

    # The same images through pid-sample and the fixture-checked network: the same FD_DINOv2.
    run("pid_diffusion.cli.sample", "--checkpoint", str(run_dir / "phema-00000004.pt"), "--ema", "std-0.030",
        "--seeds", f"0-{NUM_IMAGES - 1}", "--npz", str(tmp_path / "samples.npz"), torch_home=torch_home)
    samples = torch.from_numpy(load_npz(tmp_path / "samples.npz")["images"]).permute(0, 3, 1, 2)
    features = dinov2.DINOv2Detector(tiny_model()).features(samples).double().numpy()
    expected = fid_from_stats(features.mean(0), np.cov(features, rowvar=False), *reference.fd_dinov2)
    assert float(rows[0]["fd_dinov2"]) == pytest.approx(expected, rel=1e-5)


def test_fd_dinov2_needs_edm2_reference_format_and_older_tables_still_load(tmp_path, capsys):
    from pid_diffusion.cli import fid as fid_cli
    from pid_diffusion.evaluation import CSV_FIELDS, ResultsTable
    write_npz(str(tmp_path / "images.npz"), images=np.zeros((10, 16, 16, 3), dtype=np.uint8))
    save_stats(str(tmp_path / "ref.npz"), ReferenceStats(fid=(np.zeros(4), np.eye(4))))
    with pytest.raises(SystemExit) as exit_info:
        fid_cli.main(["--images", str(tmp_path / "images.npz"), "--ref", str(tmp_path / "ref.npz"), "--fd-dinov2"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "pid-fid: error: " in error and "holds no DINOv2 statistics" in error and "--fd-dinov2 --dest" in error
    # A results table written before the fd_dinov2 column loads, the column empty.
    older = [name for name in CSV_FIELDS if name != "fd_dinov2"]
    (tmp_path / "old.csv").write_text(",".join(older) + "\n" + ",".join(
        {"checkpoint": "snapshot-00000001.pt", "step": "1", "ema": "none", "seeds": "0-9", "num_samples": "10",
         "fid": "3.5"}.get(name, "") for name in older) + "\n")
    (result,) = ResultsTable(str(tmp_path / "old.csv")).results.values()
    assert result.fid == 3.5 and result.fd_dinov2 is None


def test_fetch_weights_fetches_dinov2_when_asked(tmp_path, monkeypatch, capsys):
    from pid_diffusion.cli import fetch_weights
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.chdir(REPO)  # The default preset's teacher: the bundled one, present.
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *args, **kwargs: (_ for _ in ()).throw(urllib.error.URLError("offline (simulated)")))
    with pytest.raises(SystemExit):
        fetch_weights.main(["--preset=default", "--no-detector", "--fd-dinov2"])
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    assert f"download {dinov2.DINOV2.url}\n      save as  {cache / dinov2.DINOV2_FILENAME}" in capsys.readouterr().out
    fetched = []
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, dst, *args, **kwargs: (
        fetched.append(url), Path(dst).write_bytes(b"weights")))
    fetch_weights.main(["--preset=default", "--no-detector", "--fd-dinov2"])
    assert fetched == [dinov2.DINOV2.url] and (cache / dinov2.DINOV2_FILENAME).is_file()
