"""benchmarks/trends.py end to end at its smallest configuration (files and table, not the study's conclusions)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "trends.py"


def _trends_module():
    spec = importlib.util.spec_from_file_location("trends", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smallest_study_writes_results_table_and_figures(tmp_path):
    page = tmp_path / "docs" / "trends.md"
    page.parent.mkdir()
    page.write_text("# Trends\n\nHand-written reading above.\n\n<!-- trends.py: generated, begin -->\nold\n"
                    "<!-- trends.py: generated, end -->\n\nHand-written reading below.\n")
    subprocess.run([sys.executable, str(SCRIPT), "--settings", "baseline", "--seeds", "1", "--steps", "2",
                    "--batch", "2", "--checkpoint-every", "1", "--eval-images", "2", "--out", str(tmp_path / "out"),
                    "--page", str(page)], cwd=ROOT, check=True, capture_output=True)

    results = json.loads((tmp_path / "out" / "trends.json").read_text())
    (run,) = results["results"]
    assert run["setting"] == "baseline" and [point["step"] for point in run["curve"]] == [0, 1, 2]
    assert set(results["euler_ceiling"]) == {"40"}  # the grid sizes of the settings run
    text = page.read_text()
    assert "Hand-written reading above." in text and "Hand-written reading below." in text and "\nold\n" not in text
    assert "| baseline | N (forward) |" in text and "--settings baseline" in text
    assert "LPIPS: " in text  # measured, or said not to be
    for figure in ("psnr-vs-n.png", "psnr-vs-steps.png"):
        assert (page.parent / "trends" / figure).read_bytes().startswith(b"\x89PNG")


def test_settings_change_one_thing_from_the_baseline():
    trends = _trends_module()
    settings = trends.all_settings(lpips=True)
    names = [s.name for s in settings]
    assert len(names) == len(set(names)) and "LPIPS" in names and "LPIPS" not in [s.name for s in trends.all_settings(False)]
    for setting in settings:
        config = trends.config_of(setting, trends.QUICK, seed=0, out=Path("unused"))
        assert config.train.steps == trends.QUICK.steps and config.train.batch == trends.QUICK.batch
    # Every row of the axes' panels names a setting of the study.
    assert {name for rows in trends.AXES.values() for name in rows} <= set(names)


def test_a_diverged_seed_is_reported_not_averaged():
    trends = _trends_module()
    curve = [{"step": 0, "rmse": 0.5, "psnr": 6.0}, {"step": 2, "rmse": 0.2, "psnr": 14.0}]
    results = [{"setting": "jvp", "axis": "derivative", "seed": 0, "s_per_step": 0.5, "diverged": None, "curve": curve},
               {"setting": "jvp", "axis": "derivative", "seed": 1, "s_per_step": None,
                "diverged": "non-finite loss (nan) at step 1", "curve": curve[:1]},
               {"setting": "L1", "axis": "distance", "seed": 0, "s_per_step": None,
                "diverged": "non-finite loss (nan) at step 1", "curve": curve[:1]}]
    rows = trends.table(results).splitlines()
    assert rows[2] == "| jvp | derivative | 14.00 (1 of 2 seeds diverged: non-finite loss) | 0.2000 | 1 | 0.50 |"
    assert rows[3] == "| L1 | distance | diverged in all 1 seeds (non-finite loss) | — | 0 | — |"


@pytest.mark.slow
def test_a_partial_or_quick_study_leaves_the_published_page_alone(tmp_path):
    """Only the full default study (or --page) writes docs/trends.md; --quick says it checks the tool, and
    deletes its run folders."""
    (tmp_path / "model_zoo").symlink_to(ROOT / "model_zoo")  # the default preset's teacher, by its relative path
    published = tmp_path / "docs" / "trends.md"
    published.parent.mkdir()
    published.write_text("the published study\n")
    out = tmp_path / "runs" / "trends-mine"
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--settings", "baseline", "--steps", "2",
                             "--checkpoint-every", "1", "--eval-images", "2", "--out", str(out)], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert published.read_text() == "the published study\n" and not (published.parent / "trends").exists()
    page = (out / "trends.md").read_text()
    assert "checks the tool, not the claims" in page and "| baseline | N (forward) |" in page
    assert (out / "trends" / "psnr-vs-n.png").is_file() and not (out / "runs").exists()
    assert f"Left on disk: {out}" in result.stdout.splitlines()[-1]

    trends = _trends_module()
    full = trends.parse_args([])[0]
    partial = trends.parse_args(["--settings", "baseline", "--out", str(out)])[0]
    assert full.page == trends.PUBLISHED_PAGE and partial.page == out / "trends.md"
