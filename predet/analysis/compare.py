"""``predet compare RUN [RUN ...]``: a markdown table of fine-tuning results, like the paper's Table 2.

One row per initialisation (``RUN/init.json``'s ``init``: ``scratch``, ``predet``, ``cls-only``
or the init file's stem), with box AP, AP50, AP75 and, when any run has masks, mask AP, AP50,
AP75 from ``RUN/results.json``. Runs of the same init (fine-tuning seeds) make one row: each
number is ``mean ± std`` (sample standard deviation) over them, and a column ``n`` counts them.
With a ``scratch`` row, a last column gives each row's mean box AP gain over it. Numbers are
printed as measured (one decimal; ``-`` if undefined). Runs are pooled into a row only when they
fine-tuned the same detector and were scored on the same set (``RUN/scored.json``, written with
``results.json``, else the run's ``config.yaml``): anything else is an error naming the two runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from predet.errors import UserError
from predet.utils import atomic_write_text

__all__ = ["compare", "group_results", "summarize", "mean_std", "load_run_results", "write_compare"]

_METRICS = ("AP", "AP50", "AP75")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} not found (run `predet evaluate --run {path.parent}` first)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON: {e}") from None


SETUP_KEYS = ("arch", "ann", "format", "images")


def _setup(run: Path) -> dict[str, Any]:
    """What a run fine-tuned and scored (``SETUP_KEYS``): ``scored.json``, written by ``predet
    evaluate`` beside ``results.json``; for older runs the detector and val set of their
    ``config.yaml`` (a relative val path, as runs recorded before their paths were made
    absolute, says nothing about where it pointed: unknown). Unknown values are None."""
    try:
        data = json.loads((run / "scored.json").read_text())
    except (OSError, json.JSONDecodeError):
        data = None
    if not isinstance(data, dict):
        try:
            cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            cfg = {}
        ann = ((cfg.get("data") or {}).get("val") or {}).get("ann")
        data = {"arch": (cfg.get("model") or {}).get("arch"), "ann": ann if ann and Path(ann).is_absolute() else None}
    return {k: data.get(k) for k in SETUP_KEYS}


def _differ(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The setup keys both runs know and disagree on."""
    return [k for k in SETUP_KEYS if a[k] is not None and b[k] is not None and a[k] != b[k]]


def _load_run(run: str | Path) -> tuple[str, Optional[str], dict]:
    """(row name, the init file when the name was taken from its stem, results dict) of a run."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"run folder not found: {run}")
    results = _read_json(run / "results.json")
    if "bbox" not in results:
        raise UserError(f"{run / 'results.json'}: no 'bbox' results")
    init = run / "init.json"
    info = _read_json(init) if init.is_file() else {}
    name, path = info.get("init") or run.name, info.get("path")
    from_file = path and not info.get("named") and Path(path).stem == name
    return name, (path if from_file else None), results


def load_run_results(run: str | Path) -> tuple[str, dict]:
    """(row name, results dict) of a fine-tuning run folder."""
    name, _, results = _load_run(run)
    return name, results


def mean_std(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (ddof 1) of the defined values; the std is None for
    one value (unmeasured, not 0: a single run says nothing about the noise)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return mean, None
    return mean, (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5


def group_results(runs: Sequence[str | Path]) -> dict[str, list[dict]]:
    """``{init name: [results.json of each of its runs]}``, in the order the names first appear.

    A name given to the runs (``name=predet``: e.g. the exports of several pre-training seeds)
    makes one row; a name that is only the init file's stem is that file: two files of one stem
    (``a/backbone.pth``, ``b/backbone.pth``) are two rows, each named with its path."""
    if not runs:
        raise UserError("predet compare needs at least one run folder")
    keyed: dict[tuple[str, Optional[str]], list[dict]] = {}
    first: dict[tuple[str, Optional[str]], tuple[Path, dict]] = {}  # each row's first run and setup
    for r in runs:
        name, path, res = _load_run(r)
        setup = _setup(Path(r))
        run0, setup0 = first.setdefault((name, path), (Path(r), setup))
        if differ := _differ(setup0, setup):  # seeds of one init are pooled; other setups are not seeds
            what = ", ".join(f"{k} {setup0[k]} vs {setup[k]}" for k in differ)
            raise UserError(
                f"{run0} and {r} share the init '{name}' but were not fine-tuned and scored alike "
                f"({what}): compare runs of one detector and one val set"
            )
        keyed.setdefault((name, path), []).append(res)
    shared = {n for n, _ in keyed if sum(1 for m, _ in keyed if m == n) > 1}
    return {(f"{n} ({p})" if n in shared and p else n): res for (n, p), res in keyed.items()}


def summarize(groups: dict[str, list[dict]]) -> dict[str, dict]:
    """``{init: {"n": runs, "bbox": {metric: [mean, std]}, "segm": {...}}}`` (segm when present)."""
    out: dict[str, dict] = {}
    for name, results in groups.items():
        row: dict = {"n": len(results)}
        for task in ("bbox", "segm"):
            if any(task in res for res in results):
                row[task] = {m: list(mean_std([res.get(task, {}).get(m) for res in results])) for m in _METRICS}
        out[name] = row
    return out


def _cell(stat: Optional[list], with_std: bool) -> str:
    mean, std = stat if stat else (None, None)
    if mean is None:
        return "-"
    return f"{mean:.1f} ± {std:.1f}" if with_std and std is not None else f"{mean:.1f}"


def compare(runs: Sequence[str | Path]) -> str:
    """A markdown table (with a trailing newline) of the runs' ``results.json``, one row per init."""
    stats = summarize(group_results(runs))
    with_masks = any("segm" in s for s in stats.values())
    with_std = any(s["n"] > 1 for s in stats.values())
    header = ["init"] + (["n"] if with_std else []) + [f"AP^bb{m[2:] and '_' + m[2:]}" for m in _METRICS]
    if with_masks:
        header += [f"AP^mk{m[2:] and '_' + m[2:]}" for m in _METRICS]
    scratch = stats.get("scratch", {}).get("bbox", {}).get("AP", [None])[0]
    if scratch is not None:
        header.append("ΔAP^bb vs scratch")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name, s in stats.items():
        cells = [name] + ([str(s["n"])] if with_std else [])
        cells += [_cell(s["bbox"].get(m), with_std) for m in _METRICS]
        if with_masks:
            cells += [_cell(s.get("segm", {}).get(m), with_std) for m in _METRICS]
        if scratch is not None:
            ap = s["bbox"]["AP"][0]
            cells.append("-" if ap is None else f"{ap - scratch:+.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _check_replaceable(out: Path) -> None:
    """``--out`` may replace a table an earlier ``predet compare`` wrote, nothing else (e.g. an
    export's ``F.json`` given by mistake)."""
    if out.is_dir():
        raise UserError(f"--out {out}: a folder; give a file name (e.g. {out / 'compare.md'})")
    if out.exists():
        with open(out, "rb") as f:
            head = f.read(8)
        if head != b"| init |":
            raise UserError(f"--out {out}: exists and is not a table predet compare wrote; choose another file")


def write_compare(runs: Sequence[str | Path], out: str | Path) -> str:
    """The table of :func:`compare` written to ``out`` (atomically; ``out`` may only replace a table
    an earlier ``predet compare`` wrote); returns the table."""
    table = compare(runs)
    out = Path(out)
    _check_replaceable(out)
    atomic_write_text(out, table)
    return table
