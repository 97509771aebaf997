import json

import numpy as np
import pytest

from predet.analysis.plots import plot_curves, read_metrics, smooth
from predet.errors import UserError


def test_smooth_is_a_trailing_mean():
    v = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert smooth(v, 1) == v
    assert smooth(v, 2) == pytest.approx([1.0, 1.5, 2.5, 3.5, 7.0])
    ref = [np.mean(v[max(0, i - 2): i + 1]) for i in range(len(v))]
    assert smooth(v, 3) == pytest.approx(ref)


def test_smooth_goes_on_after_a_nan_or_inf():
    """A non-finite value drops out of its windows (a running sum kept it for good: every later
    point was NaN)."""
    nan, inf = float("nan"), float("inf")
    assert smooth([1.0, nan, 3.0, 5.0, 7.0], 2) == pytest.approx([1.0, 1.0, 3.0, 4.0, 6.0])
    out = smooth([inf, nan, 2.0, 4.0], 2)
    assert np.isnan(out[0]) and np.isnan(out[1]) and out[2:] == pytest.approx([2.0, 3.0])


def test_plot_curves_writes_png(tmp_path):
    for name, slope in (("a", 1.0), ("b", 0.5)):
        run = tmp_path / name
        run.mkdir()
        rows = [{"step": s, "loss": 5 - slope * s / 10, "lookup_top1": s / 20} for s in range(20)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(read_metrics(tmp_path / "a")) == 20
    png = plot_curves({"a": tmp_path / "a", "b": tmp_path / "b"}, ["loss", "lookup_top1", "absent"], tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_bad_metrics_line_names_the_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\nnot json\n')
    with pytest.raises(UserError, match="metrics.jsonl:2"):
        read_metrics(tmp_path)
    with pytest.raises(UserError, match="no metrics"):
        read_metrics(tmp_path / "missing")


def test_a_series_of_one_point_is_drawn(tmp_path, monkeypatch):
    """A key logged once (a final cls_map, a one-row run) drew nothing: a line needs two points."""
    import matplotlib.axes

    drawn = []
    original = matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        lines = original(self, *args, **kwargs)
        drawn.extend((len(line.get_xdata()), line.get_marker()) for line in lines)
        return lines

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "cls_map": 0.3}]))
    plot_curves({"a": tmp_path}, ["loss", "cls_map"], tmp_path / "c.png")
    assert drawn == [(2, "None"), (1, "o")]
