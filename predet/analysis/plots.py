"""Plots of run logs: loss and metric curves from ``metrics.jsonl``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from predet.errors import UserError  # noqa: E402


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a ``metrics.jsonl`` (a run folder or the file itself); bad lines name the line."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"no metrics file at {path}")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(f"{path}:{n}: not a JSON line") from None
    return rows


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` points (window 1 returns the values). A NaN/inf
    value (``metrics.jsonl`` may hold one) is left out of the windows it falls in, so the curve
    goes on after it; a window of nothing finite is NaN (a gap in the plot)."""
    out = []
    for i in range(len(values)):
        finite = [v for v in values[max(0, i - window + 1) : i + 1] if math.isfinite(v)]
        out.append(sum(finite) / len(finite) if finite else math.nan)
    return out


def plot_curves(
    runs: Mapping[str, str | Path],
    keys: Sequence[str],
    out: str | Path,
    *,
    window: int = 5,
    title: str = "",
) -> Path:
    """One panel per key, one line per run: ``value`` against ``step``, smoothed over ``window`` rows.

    Args:
        runs: name -> run folder (or metrics.jsonl).
        keys: metric names, e.g. ``["loss", "loss_cls", "lookup_top1"]``; a key a run lacks is skipped.
        out: PNG path.
    """
    series = {name: read_metrics(path) for name, path in runs.items()}
    asked, keys = list(keys), [k for k in keys if any(k in r for rows in series.values() for r in rows)]
    if not keys:
        raise UserError(f"none of the runs log any of the keys {asked}")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, rows in series.items():
            pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
            if pts:
                steps, vals = zip(*pts)
                # a series of one point (a key logged once, e.g. a final cls_map) gets a marker:
                # a line of one point draws nothing
                ax.plot(steps, smooth(list(vals), window), label=name, marker="o" if len(pts) == 1 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, out)


def save_figure(fig: plt.Figure, out: str | Path, dpi: int = 110) -> Path:
    """Lay out ``fig``, write it to ``out`` (parent folders made), close it; returns the path."""
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out
