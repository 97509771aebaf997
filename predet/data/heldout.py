"""The held-out slice of a pre-training manifest: images never trained on, on which the
classification head is scored (``cls_map`` against the tags, ``cls_map_true`` against
``truth.jsonl`` when the world ships one; see :mod:`predet.analysis.cls_map`).

The slice is a function of the manifest's length alone (its own RNG stream, not the run's seed),
so runs with different seeds or loss switches are scored on the same images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

__all__ = ["HeldOutSet", "heldout_indices", "read_truth_labels", "build_heldout_set"]


@dataclass
class HeldOutSet:
    """Held-out images: ``tags`` / ``truth`` multi-hot ``[H, K]`` (truth None without
    ``truth.jsonl``)."""

    paths: list[str]
    tags: np.ndarray
    truth: Optional[np.ndarray] = None


def heldout_indices(n: int, size: int) -> np.ndarray:
    """Sorted indices of the ``size`` held-out entries of an ``n``-entry manifest.

    At most a fifth of the manifest is held out, so a tiny manifest still trains.
    """
    size = max(0, min(int(size), n // 5))
    rng = np.random.default_rng(7411)
    return np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)


def read_truth_labels(
    manifest: str | Path, images: Sequence[str], classes: Sequence[str]
) -> Optional[np.ndarray]:
    """Multi-hot true labels ``[len(images), K]`` from ``truth.jsonl`` beside ``manifest``.

    ``images`` are the manifest's ``image`` strings of the entries to look up. Returns ``None``
    when there is no ``truth.jsonl`` or it does not cover every image (it is analysis-only data).
    """
    path = Path(manifest).parent / "truth.jsonl"
    if not path.is_file():
        return None
    index = {c: k for k, c in enumerate(classes)}
    wanted = {im: i for i, im in enumerate(images)}
    out = np.zeros((len(images), len(classes)), dtype=np.float32)
    found = np.zeros(len(images), dtype=bool)
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            i = wanted.get(rec.get("image"))
            if i is None:
                continue
            found[i] = True
            for c in rec.get("labels", []):
                if c in index:
                    out[i, index[c]] = 1.0
    return out if found.all() else None


def build_heldout_set(
    manifest: str | Path,
    images: Sequence[str],
    paths: Sequence[str | Path],
    labels: Sequence[Sequence[str]],
    classes: Sequence[str],
) -> Optional[HeldOutSet]:
    """The held-out set of entries given by their manifest ``images`` strings, resolved
    ``paths`` and class names ``labels`` (from the tags); None when empty."""
    if not len(images):
        return None
    index = {c: k for k, c in enumerate(classes)}
    tags = np.zeros((len(images), len(classes)), np.float32)
    for i, names in enumerate(labels):
        tags[i, [index[c] for c in names if c in index]] = 1.0
    truth = read_truth_labels(manifest, images, classes)
    return HeldOutSet(paths=[str(p) for p in paths], tags=tags, truth=truth)
