"""FID and Inception Score as EDM and StyleGAN2-ADA compute them, checked against EDM's own outputs
(`ref_fid.pt`, see the fixtures README) and against one plain numpy pass over the same images.

The real detector is a 100 MB TorchScript file that cannot be downloaded here; the tests write a stand-in
TorchScript module with its call signature. scipy's sqrtm of a 2048 × 2048 matrix takes minutes on a small
CPU, so only the 64-d formula cases and a 16-d stand-in go through it.
"""

import csv
import io
import subprocess
import sys
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from pid_diffusion.utils import dist, fileio
from pid_diffusion import encoders, evaluation, image_sources
from pid_diffusion.cli import fid as fid_cli
from pid_diffusion.cli import fid_ref, sample
from pid_diffusion.fid import FeatureStats, InceptionScoreStats, fid_from_stats, load_reference, save_reference
from pid_diffusion.guidance import GuidedDenoiser
from pid_diffusion.inception import NUM_CLASSES, load_detector
from pid_diffusion.samplers import HeunSampler
from pid_diffusion.teacher import load_teacher

from factories import (NUM_SEEDS, SMALL_FEATURE_DIM, fid_args, fixture_teacher, load_npz, small_detector,
                       write_detector, write_student_checkpoint)
from edm2_helpers import write_teacher
from launch import JOB_TIMEOUT_S, REPO, mpirun_module, needs_mpirun, subprocess_env

def numpy_inception_score(probabilities: np.ndarray, num_splits: int = 10) -> tuple[float, float]:
    """StyleGAN2-ADA's metrics/inception_score.py on all probabilities at once."""
    n = len(probabilities)
    scores = []
    for i in range(num_splits):
        part = probabilities[i * n // num_splits:(i + 1) * n // num_splits]
        kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores)), float(np.std(scores))


@pytest.fixture(scope="module")
def fid_fixture(edm_fixtures_dir) -> dict:
    return torch.load(edm_fixtures_dir / "ref_fid.pt", weights_only=True)


@pytest.fixture(autouse=True)
def _single_process_group():
    yield
    dist.shutdown()  # an interrupted main() leaves its process group behind


# ----------------------------------------------------------------------------------------------------------
# Against EDM.

def sqrtm_trace_tolerance(product: np.ndarray) -> float:
    """How far two correct float64 evaluations of FID's −2 tr(sqrtm(Σ Σ_ref)) may differ (scipy versions differ).

    sqrtm is backward stable: it returns the exact root of Σ Σ_ref + E with ‖E‖ ≈ u‖Σ Σ_ref‖ (u: float64's unit
    roundoff). A well-separated eigenvalue λ moves by about ‖E‖ / (2√λ), which is far below u·FID for these
    cases; a zero eigenvalue moves by up to √‖E‖, the root's square-root sensitivity at 0. So each of the
    (d − rank) null directions may add √(u‖Σ Σ_ref‖) to the trace, counted twice by the formula's −2, and a
    full-rank product keeps a relative tolerance (rel=1e-10 below, 10⁶ u).
    """
    null_dims = product.shape[0] - np.linalg.matrix_rank(product)
    return 2 * null_dims * float(np.sqrt(np.finfo(np.float64).eps * np.linalg.norm(product, 2)))


@pytest.mark.parametrize("case", ["full_rank_d64", "rank_deficient_d64"])
def test_fid_formula_matches_edm(fid_fixture, case):
    c = {key: value.numpy() if torch.is_tensor(value) else value
         for key, value in fid_fixture["formula_cases"][case].items()}
    tolerance = sqrtm_trace_tolerance(c["sigma"] @ c["sigma_ref"])
    assert (tolerance == 0) == (case == "full_rank_d64")  # the rank-deficient case exercises the null directions
    expected = pytest.approx(c["fid"], rel=1e-10, abs=tolerance)
    assert fid_from_stats(c["mu"], c["sigma"], c["mu_ref"], c["sigma_ref"]) == expected


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=needs_mpirun)])
def test_reference_statistics_match_edm(tmp_path, fid_fixture, processes):
    case = fid_fixture["stats_case"]
    folder = tmp_path / "images"
    folder.mkdir()
    for image, name in zip(case["images_uint8"], case["filenames"]):
        PIL.Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / name)
    detector = write_detector(tmp_path / "detector.pt", case["detector_W"], case["detector_b"])

    args = ["--data", str(folder), "--dest", str(tmp_path / "ref.npz"), "--detector", detector,
            "--num-images", str(case["num_expected"]), "--seed", str(case["seed"]),
            "--batch", str(case["max_batch_size"])]
    if processes == 1:
        fid_ref.main(args)
    else:
        mpirun_module(processes, "pid_diffusion.cli.fid_ref", *args)
    mu, sigma = load_reference(str(tmp_path / "ref.npz"))

    np.testing.assert_allclose(mu, case["mu"].numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.diag(sigma), case["sigma_diag"].numpy(), rtol=0, atol=1e-12)
    assert np.trace(sigma) == pytest.approx(case["sigma_trace"], rel=1e-12)
    proj = case["proj"].numpy()
    np.testing.assert_allclose(proj.T @ sigma @ proj, case["sigma_proj"].numpy(), rtol=1e-10, atol=1e-10)

    # The whole matrix equals one numpy pass over EDM's selection of the images ...
    selected = case["images_uint8"][case["selected_raw_indices"]]
    np.testing.assert_array_equal(image_sources.edm_subset(len(case["images_uint8"]), case["num_expected"], case["seed"]),
                                  case["selected_raw_indices"].numpy())
    features = load_detector(detector).features(selected).double().numpy()
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=0, atol=1e-12)
    # ... whose FID against the Kronecker reference is EDM's. `repeat` in fid_against_kron_ref_def is numpy's
    # (each entry 32 times in a row, matching kron(Σ, I)), not torch's tiling. Σ has rank N − 1 = 99, so
    # tr sqrtm(Σ Σ_ref) = Σ sqrt(eig(Aᵀ Σ_ref A)) with Σ = A Aᵀ (A = centred features / sqrt(N − 1)): the
    # 2048-d sqrtm, minutes on this CPU, becomes a 100-d eigenproblem. scipy's sqrtm of the singular product
    # (EDM's number) is accurate to about 1e-4 here.
    full = fid_fixture["formula_cases"]["full_rank_d64"]
    copies = len(mu) // len(full["mu"])
    mu_ref, sigma_ref = np.repeat(full["mu"].numpy(), copies), np.kron(full["sigma"].numpy(), np.eye(copies))
    A = (features - mu).T / np.sqrt(len(features) - 1)
    root_trace = np.sqrt(np.clip(np.linalg.eigvalsh(A.T @ sigma_ref @ A), 0, None)).sum()
    fid = np.square(mu - mu_ref).sum() + np.trace(sigma) + np.trace(sigma_ref) - 2 * root_trace
    assert fid == pytest.approx(case["fid_against_kron_ref"], abs=1e-3)


def test_folder_zip_and_npz_give_the_same_images_in_name_order(tmp_path):
    generator = np.random.default_rng(0)
    images = generator.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    names = ["a/0.png", "a/1.png", "b.png", "c/d/e.png", "f.png"]  # sorted, two of them in subfolders
    archive = zipfile.ZipFile(tmp_path / "images.zip", "w")
    for image, name in zip(images, names):
        (tmp_path / "folder" / name).parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(image).save(tmp_path / "folder" / name)
        archive.write(tmp_path / "folder" / name, name)
    archive.close()
    (tmp_path / "folder" / "notes.txt").write_text("not an image")
    np.savez(tmp_path / "images.npz", arr_0=images)

    for source in ("folder", "images.zip", "images.npz"):
        found = image_sources.open_images(str(tmp_path / source))
        np.testing.assert_array_equal(np.stack([found[i] for i in range(len(found))]), images, err_msg=source)


# ----------------------------------------------------------------------------------------------------------
# Streaming statistics.

def test_streamed_statistics_equal_one_numpy_pass():
    generator = torch.Generator().manual_seed(0)
    num, dim = 53, 12
    features = torch.randn(num, dim, generator=generator, dtype=torch.float64) * 3 + 1
    probabilities = torch.softmax(torch.randn(num, NUM_CLASSES, generator=generator, dtype=torch.float64) * 4, 1)

    stats, scores = FeatureStats(dim), InceptionScoreStats(num)
    order = torch.randperm(num, generator=generator)  # any order and any batch sizes
    for chunk in order.split(7):
        stats.update(features[chunk])
        scores.update(probabilities[chunk], chunk)
    stats.all_reduce()
    scores.all_reduce()

    mu, sigma = stats.mean_and_covariance()
    np.testing.assert_allclose(mu, features.mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features.numpy(), rowvar=False), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(scores.score(), numpy_inception_score(probabilities.numpy()), rtol=1e-10)


def test_inception_score_of_confident_balanced_classes_is_the_number_of_classes():
    # Every split sees each of k classes equally often, each image certain of its class: IS = k, std 0.
    k, per_split = 4, 8
    labels = torch.arange(10 * per_split) % k
    scores = InceptionScoreStats(len(labels))
    scores.update(F.one_hot(labels, NUM_CLASSES).double(), torch.arange(len(labels)))
    mean, std = scores.score()
    assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0, abs=1e-12)


def test_detector_takes_only_quantised_images(tmp_path):
    detector = load_detector(small_detector(tmp_path / "detector.pt"))
    with pytest.raises(ValueError, match="uint8"):
        detector.features(torch.zeros(2, 3, 16, 16))
    gray = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)
    torch.testing.assert_close(detector.features(gray), detector.features(gray.repeat(1, 3, 1, 1)))
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05"):
        load_detector(str(tmp_path / "missing.pt"))


# ----------------------------------------------------------------------------------------------------------
# pid-fid over a run folder.

def read_rows(path: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(fileio.read_bytes(path).decode())))


@needs_mpirun
@pytest.mark.parametrize("run_folder", [(100,)], indirect=True)
def test_pid_fid_equals_a_numpy_pass_over_pid_sample_images_on_one_and_two_ranks(tmp_path, run_folder):
    fid_cli.main(fid_args(run_folder, "--ema", "0.999"))
    row = read_rows(run_folder["csv"])[0]
    assert (row["checkpoint"], row["ema"], row["seeds"], row["num_samples"]) == (
        "checkpoint-00000100.pt", "0.999", f"0-{NUM_SEEDS - 1}", str(NUM_SEEDS))

    # The same images through pid-sample, then the detector and the formulas in one numpy pass.
    sample.main(["--checkpoint", f"{run_folder['run']}/checkpoint-00000100.pt", "--ema", "0.999",
                 "--seeds", f"0-{NUM_SEEDS - 1}", "--npz", str(tmp_path / "images.npz")])
    images = torch.from_numpy(load_npz(tmp_path / "images.npz")["images"]).permute(0, 3, 1, 2)
    detector = load_detector(run_folder["detector"])
    features = detector.features(images).double().numpy()
    fid = fid_from_stats(features.mean(0), np.cov(features, rowvar=False), *load_reference(run_folder["ref"]))
    is_mean, is_std = numpy_inception_score(detector.probabilities(images).double().numpy())
    for name, value in dict(fid=fid, is_mean=is_mean, is_std=is_std).items():
        assert float(row[name]) == pytest.approx(value, rel=1e-6), name

    two_ranks = dict(run_folder, csv=str(tmp_path / "two_ranks.csv"), plot=str(tmp_path / "two_ranks.png"))
    mpirun_module(2, "pid_diffusion.cli.fid", *fid_args(two_ranks, "--ema", "0.999"))
    for one, two in zip(read_rows(run_folder["csv"]), read_rows(two_ranks["csv"]), strict=True):
        for name in ("fid", "is_mean", "is_std"):
            assert float(two[name]) == pytest.approx(float(one[name]), rel=1e-6), name


def test_csv_survives_an_interruption_and_a_bad_checkpoint(tmp_path, run_folder, monkeypatch):
    fileio.atomic_write_bytes(b"not a checkpoint", f"{run_folder['run']}/checkpoint-00000300.pt")
    evaluated = []
    real_evaluate = evaluation.evaluate

    def interrupted_after_two(*args, **kwargs):
        if len(evaluated) == 2:
            raise KeyboardInterrupt
        evaluated.append(args)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        fid_cli.main(fid_args(run_folder))
    rows = read_rows(run_folder["csv"])
    assert [(r["checkpoint"], r["ema"]) for r in rows] == [
        ("checkpoint-00000100.pt", "0.999"), ("checkpoint-00000100.pt", evaluation.NO_EMA)]
    assert all(r["fid"] and not r["error"] for r in rows)
    dist.shutdown()

    # Re-running the same command evaluates only what is missing and records the unreadable checkpoint.
    evaluated.clear()
    monkeypatch.setattr(evaluation, "evaluate", lambda *args, **kwargs: (evaluated.append(args),
                                                                     real_evaluate(*args, **kwargs))[1])
    fid_cli.main(fid_args(run_folder))
    assert len(evaluated) == 2
    rows = read_rows(run_folder["csv"])
    assert [(r["step"], r["ema"], bool(r["error"])) for r in rows] == [
        ("100", "0.999", False), ("100", evaluation.NO_EMA, False), ("200", "0.999", False),
        ("200", evaluation.NO_EMA, False), ("300", "", True)]
    assert "checkpoint-00000300.pt" in rows[-1]["checkpoint"] and rows[-1]["error"]
    fids = [float(r["fid"]) for r in rows[:4]]
    assert len(set(fids)) == 4  # four different sets of weights

    # And a third run has nothing left to do; the plot shows both steps.
    evaluated.clear()
    fid_cli.main(fid_args(run_folder))
    assert evaluated == [] and read_rows(run_folder["csv"]) == rows
    plot = PIL.Image.open(run_folder["plot"])
    assert plot.size[0] > 500 and plot.size[1] > 500


def test_results_are_read_back_exactly(tmp_path):
    result = evaluation.Result("checkpoint-00000100.pt", 100, "0.9999", "0-49999", 50000, fid=3.9182736451,
                            is_mean=9.5, is_std=0.125, sampler="OneStepSampler (1 NFE)", detector="d.pt",
                            reference="cifar10-32x32.npz")
    table = evaluation.ResultsTable(str(tmp_path / "fid.csv"))
    table.record(result, write=True)
    assert evaluation.ResultsTable(str(tmp_path / "fid.csv")).results == {result.key: result}


# ----------------------------------------------------------------------------------------------------------
# pid-fid of anything: one file, a teacher with its sampler, a file of images; pid-fid-ref --compare.

def single_args(paths: dict, csv_name: str, *source: str) -> list[str]:
    return [*source, "--ref", paths["ref"], "--detector", paths["detector"], "--csv", paths[csv_name], "--batch", "8"]


@pytest.mark.parametrize("run_folder", [(100,)], indirect=True)
def test_pid_fid_scores_a_file_a_teacher_or_images_as_the_run_does(tmp_path, run_folder, edm_fixtures_dir, capsys):
    paths = dict(run_folder, one=str(tmp_path / "one.csv"), teacher_csv=str(tmp_path / "teacher.csv"),
                 images_csv=str(tmp_path / "images.csv"))
    seeds = ["--seeds", f"0-{NUM_SEEDS - 1}"]
    # A snapshot beside the training state of step 100: --run scores both steps; --checkpoint one file.
    snapshot = f"{run_folder['run']}/snapshot-00000200.pt"
    teacher = fixture_teacher(edm_fixtures_dir, "ref_song_uncond.pt")
    write_student_checkpoint(snapshot, teacher, 200)
    fid_cli.main(fid_args(run_folder, "--ema", "0.999"))
    by_run = {row["checkpoint"]: row for row in read_rows(run_folder["csv"])}
    assert sorted(by_run) == ["checkpoint-00000100.pt", "snapshot-00000200.pt"]
    fid_cli.main(single_args(paths, "one", "--checkpoint", snapshot, "--ema", "0.999", *seeds))
    assert read_rows(paths["one"]) == [by_run["snapshot-00000200.pt"]]

    # The teacher with Heun (2 steps, 3 calls), and the same images written by pid-sample, scored as images.
    teacher_file = str(tmp_path / "teacher.pt")
    torch.save(dict(network_kwargs=teacher.init_kwargs, state_dict=teacher.state_dict()), teacher_file)
    fid_cli.main(single_args(paths, "teacher_csv", "--teacher", teacher_file, "--sampler", "heun", "--steps", "2",
                             *seeds))
    (row,) = read_rows(paths["teacher_csv"])
    assert (row["checkpoint"], row["step"], row["sampler"]) == ("teacher.pt", "", "HeunSampler (3 NFE)")
    sample.main(["--teacher", teacher_file, "--sampler", "heun", "--steps", "2", *seeds,
                 "--npz", str(tmp_path / "heun.npz")])
    fid_cli.main(single_args(paths, "images_csv", "--images", str(tmp_path / "heun.npz")))
    (images_row,) = read_rows(paths["images_csv"])
    assert images_row["num_samples"] == str(NUM_SEEDS)
    for name in ("fid", "is_mean", "is_std"):
        assert float(images_row[name]) == pytest.approx(float(row[name]), rel=1e-9), name

    # pid-fid-ref --compare: statistics of the same images against the reference give the same FID.
    images = torch.from_numpy(load_npz(tmp_path / "heun.npz")["images"]).permute(0, 3, 1, 2)
    features = load_detector(run_folder["detector"]).features(images).double().numpy()
    save_reference(str(tmp_path / "heun-stats.npz"), features.mean(0), np.cov(features, rowvar=False))
    capsys.readouterr()
    fid_ref.main(["--compare", str(tmp_path / "heun-stats.npz"), run_folder["ref"]])
    assert f"FID {float(row['fid']):.4f}" in capsys.readouterr().out


def test_pid_fid_rejects_options_that_do_not_apply(tmp_path, run_folder, capsys):
    for bad, message in ((["--images", run_folder["ref"], "--seeds", "0-9"], "--images scores the given ones"),
                         (["--teacher", run_folder["ref"], "--ema", "0.999"], "--ema names weights"),
                         (["--checkpoint", str(tmp_path / "missing.pt")], "no such file")):
        with pytest.raises(SystemExit):
            fid_cli.main([*bad, "--ref", run_folder["ref"]])
        assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# pid-fid of a guided teacher (EDM2's D_g + w (D - D_g)), through the command.

# Tiny EDM2 pixel nets (StandardRGBEncoder) of the stand-in detector's 16×16 images: a conditional main network and
# the unconditional guide of classifier-free guidance.
PIXEL_EDM2 = dict(img_resolution=16, img_channels=3, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                  attn_resolutions=[8], channels_per_head=16, use_fp16=False)
GUIDANCE = 2.1


@pytest.mark.slow  # runs the console command
def test_pid_fid_scores_a_guided_teacher_as_the_library_does(tmp_path):
    pixels = {"class_name": encoders.STANDARD_RGB}
    main = str(write_teacher(tmp_path / "main.pt", {**PIXEL_EDM2, "label_dim": 10}, pixels, seed=0))
    guide = str(write_teacher(tmp_path / "guide.pt", {**PIXEL_EDM2, "label_dim": 0}, pixels, seed=1))
    detector, reference, table = small_detector(tmp_path / "detector.pt"), str(tmp_path / "ref.npz"), tmp_path / "fid.csv"
    save_reference(reference, np.zeros(SMALL_FEATURE_DIM), np.eye(SMALL_FEATURE_DIM))
    seeds = range(NUM_SEEDS)
    common = ["--ref", reference, "--detector", detector, "--csv", str(table), "--seeds", f"0-{NUM_SEEDS - 1}",
              "--steps", "2", "--batch", "8"]
    for source in (["--teacher", main, "--guide", guide, "--guidance", str(GUIDANCE)], ["--teacher", main]):
        result = subprocess.run([sys.executable, "-m", "pid_diffusion.cli.fid", *source, *common], cwd=REPO,
                                env=subprocess_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
        assert result.returncode == 0, result.stdout + result.stderr
    rows = {row["checkpoint"]: row for row in read_rows(str(table))}
    guided, unguided = rows[f"main.pt guided by guide.pt w={GUIDANCE}"], rows["main.pt"]
    assert guided["sampler"] == unguided["sampler"] == "HeunSampler (3 NFE)"
    # Random tiny nets make similar images either way: the rows differ far beyond the tolerance of the equalities below.
    assert float(guided["fid"]) != pytest.approx(float(unguided["fid"]), rel=1e-5)

    # The library on the same seeds: the guided denoiser, and the main network alone.
    networks = {"guided": GuidedDenoiser(load_teacher(main), load_teacher(guide), GUIDANCE),
                "unguided": load_teacher(main)}
    for name, row in (("guided", guided), ("unguided", unguided)):
        fid, is_mean, is_std, _ = evaluation.evaluate(networks[name], HeunSampler(num_steps=2), seeds,
                                                      load_detector(detector), load_reference(reference), batch_size=8)
        assert (float(row["fid"]), float(row["is_mean"]), float(row["is_std"])) == pytest.approx(
            (fid, is_mean, is_std), rel=1e-9), name
