"""Plots of a run folder: fid.png from a fixed results table and training.png from metrics.jsonl, through
`pid-plot`; the axes' tick labels are read back from the figures matplotlib draws."""

import json

import matplotlib.pyplot as plt
import PIL.Image
import pytest

from pid_diffusion import evaluation
from pid_diffusion.training import plots
from pid_diffusion.cli import plot as plot_cli

# Three checkpoints (steps 1, 2, 3: the case where a float axis shows 1.5 and 2.5), trained weights and one EMA,
# Inception Scores between 9.4 and 9.6 (where an offset axis writes every tick alike).
CSV = """checkpoint,step,ema,seeds,num_samples,fid,is_mean,is_std,sampler,detector,reference,error
checkpoint-00000001.pt,1,0.999,0-9,10,30.5,9.41,0.1,OneStepSampler (1 NFE),d.pt,ref.npz,
checkpoint-00000001.pt,1,none,0-9,10,35.25,9.45,0.1,OneStepSampler (1 NFE),d.pt,ref.npz,
checkpoint-00000002.pt,2,0.999,0-9,10,20.0,9.52,0.1,OneStepSampler (1 NFE),d.pt,ref.npz,
checkpoint-00000002.pt,2,none,0-9,10,25.0,9.50,0.1,OneStepSampler (1 NFE),d.pt,ref.npz,
checkpoint-00000003.pt,3,0.999,0-9,10,10.0,9.58,0.1,OneStepSampler (1 NFE),d.pt,ref.npz,
checkpoint-00000003.pt,3,none,0-9,10,12.0,9.60,0.1,OneStepSampler (1 NFE),d.pt,ref.npz,
"""


@pytest.fixture
def drawn(monkeypatch):
    """The figures `plots` saves, kept open for inspection (plots closes them after saving)."""
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    yield figures
    monkeypatch.undo()
    for figure in figures:
        plt.close(figure)


def tick_labels(axis, which: str) -> list[str]:
    axis.figure.canvas.draw()
    ticks = axis.get_xticklabels() if which == "x" else axis.get_yticklabels()
    low, high = axis.get_xlim() if which == "x" else axis.get_ylim()
    values = axis.get_xticks() if which == "x" else axis.get_yticks()
    return [t.get_text() for t, v in zip(ticks, values) if low <= v <= high]


def test_fid_plot_from_a_fixed_csv(tmp_path, drawn):
    (tmp_path / "fid.csv").write_text(CSV)
    plot_cli.main([str(tmp_path)])
    image = PIL.Image.open(tmp_path / "fid.png")
    assert image.size == (800, 700)
    fid_axis, is_axis = drawn[0].axes
    assert tick_labels(is_axis, "x") == ["1", "2", "3"]  # whole steps only (the axes share them)
    assert list(fid_axis.get_xticks()) == list(is_axis.get_xticks())
    assert [line.get_label() for line in fid_axis.get_lines()] == ["EMA 0.999", "trained weights"]
    assert [list(line.get_ydata()) for line in fid_axis.get_lines()] == [[30.5, 20.0, 10.0], [35.25, 25.0, 12.0]]
    is_ticks = tick_labels(is_axis, "y")
    assert len(set(is_ticks)) == len(is_ticks) >= 3  # distinct values, not "1" everywhere
    assert all(9.4 <= float(label.replace("−", "-")) <= 9.6 for label in is_ticks)
    assert not (tmp_path / "training.png").exists()  # no metrics.jsonl: nothing else drawn


def test_training_plot_from_metrics(tmp_path, drawn):
    records = [dict(step=step, loss=1.0 / step, grad_norm=2.0 / step, lr=1e-3 * min(1, step / 4), time=0.0)
               for step in range(10, 60, 10)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    plot_cli.main([str(tmp_path)])
    assert PIL.Image.open(tmp_path / "training.png").size == (800, 800)
    loss, grad_norm, lr = drawn[0].axes
    assert [axis.get_ylabel() for axis in drawn[0].axes] == ["loss", "gradient norm", "learning rate"]
    assert (loss.get_yscale(), grad_norm.get_yscale(), lr.get_yscale()) == ("log", "log", "linear")
    steps = tick_labels(lr, "x")
    assert all(label.isdigit() for label in steps) and {"10", "50"} <= set(steps)  # whole steps, written out
    assert list(lr.get_lines()[0].get_ydata()) == [r["lr"] for r in records]


def test_plot_of_an_empty_folder_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        plot_cli.main([str(tmp_path)])
    assert "nothing to plot" in capsys.readouterr().err


def test_results_table_round_trips_the_csv(tmp_path):
    (tmp_path / "fid.csv").write_text(CSV)
    best = evaluation.ResultsTable(str(tmp_path / "fid.csv")).best()
    assert [(r.step, r.ema) for r in best] == [(1, "0.999"), (1, "none"), (2, "0.999"), (2, "none"), (3, "0.999"),
                                               (3, "none")]
