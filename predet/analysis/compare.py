"""``predet compare RUN [RUN ...]``: a markdown table of fine-tuning results, like the paper's Table 2.

One row per run, named by its initialisation (``RUN/init.json``'s ``init``: ``scratch``,
``predet``, ``cls-only`` or the init file's stem), with box AP, AP50, AP75 and, when any run has
masks, mask AP, AP50, AP75 from ``RUN/results.json``. With a ``scratch`` row, a last column gives
each run's box AP gain over it. Numbers are printed as measured (one decimal; ``-`` if undefined).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from predet.errors import UserError
from predet.utils import atomic_write_text

__all__ = ["compare", "load_run_results", "run"]

_METRICS = ("AP", "AP50", "AP75")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} not found (run `predet evaluate --run {path.parent}` first)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON: {e}") from None


def load_run_results(run: str | Path) -> tuple[str, dict]:
    """(row name, results dict) of a fine-tuning run folder."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"run folder not found: {run}")
    results = _read_json(run / "results.json")
    if "bbox" not in results:
        raise UserError(f"{run / 'results.json'}: no 'bbox' results")
    init = run / "init.json"
    name = _read_json(init).get("init") if init.is_file() else None
    return name or run.name, results


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.1f}"


def compare(runs: Sequence[str | Path]) -> str:
    """A markdown table (with a trailing newline) of the runs' ``results.json``, one row per run."""
    if not runs:
        raise UserError("predet compare needs at least one run folder")
    rows = [load_run_results(r) for r in runs]
    with_masks = any("segm" in res for _, res in rows)
    header = ["init"] + [f"AP^bb{m[2:] and '_' + m[2:]}" for m in _METRICS]
    if with_masks:
        header += [f"AP^mk{m[2:] and '_' + m[2:]}" for m in _METRICS]
    scratch = next((res["bbox"].get("AP") for name, res in rows if name == "scratch"), None)
    if scratch is not None:
        header.append("ΔAP^bb vs scratch")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name, res in rows:
        cells = [name] + [_fmt(res["bbox"].get(m)) for m in _METRICS]
        if with_masks:
            cells += [_fmt(res.get("segm", {}).get(m)) for m in _METRICS]
        if scratch is not None:
            ap = res["bbox"].get("AP")
            cells.append("-" if ap is None else f"{ap - scratch:+.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(args) -> int:
    table = compare(args.runs)
    out = Path(args.out or "compare.md")
    atomic_write_text(out, table)
    print(table, end="")
    print(f"wrote {out}")
    return 0
