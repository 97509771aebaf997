"""Manifests (DESIGN §4): reading the JSON Lines (or a COCO JSON as weak labels) into entries.

A manifest is JSON Lines, one image per line (relative paths are relative to the manifest's folder)::

    {"image": "images/000001.jpg", "tags": ["#Dogs", "puppy"]}
    {"image": "/abs/path.png", "labels": ["dog"], "queries": [[x1, y1, x2, y2], ...]}

A first line without ``image`` is a header (metadata such as the synthetic world's noise rates),
unless it holds ``labels``, ``tags`` or ``queries``: that is an image line whose ``image`` is missing.
A COCO JSON file is also accepted wherever a manifest is: its images become entries whose ``labels``
are the categories of their annotations (weak, image-level labels; the boxes are NOT used).

Tags are mapped to classes by :mod:`predet.data.vocab`; images are decoded by
:mod:`predet.data.images`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from predet.errors import UserError

__all__ = [
    "ManifestEntry", "Manifest", "read_manifest", "iter_manifest", "count_entries", "is_coco", "read_coco_as_manifest",
    "sample_indices",
]  # fmt: skip


@dataclass
class ManifestEntry:
    """One image of a manifest.

    ``image`` is the string as written in the manifest (the key of query caches and shards);
    ``path`` the resolved file; ``queries`` float32 ``[K, 4]`` XYXY in original-image pixels or None.
    """

    image: str
    path: Path
    tags: list[str] = field(default_factory=list)
    labels: Optional[list[str]] = None
    queries: Optional[np.ndarray] = None
    line: int = 0


@dataclass
class Manifest:
    path: Path
    entries: list[ManifestEntry]
    header: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.entries)


def sample_indices(n: int, k: Optional[int]) -> np.ndarray:
    """Sorted indices of a fixed sample of ``k`` of ``n`` manifest entries (``data.max_images``);
    all ``n`` when ``k`` is None or ``>= n``.

    The sample is a function of ``n`` and ``k`` alone (its own RNG stream, not a run's seed), so
    every run on a manifest, and the query cache computed for it, use the same entries; the
    samples for growing ``k`` are nested (a prefix of one fixed permutation).
    """
    if k is None or k >= n:
        return np.arange(n, dtype=np.int64)
    order = np.random.default_rng(5171).permutation(n)
    return np.sort(order[: max(0, int(k))]).astype(np.int64)


_IMAGE_KEYS = {"labels", "tags", "queries"}  # a line with one of these describes an image


def _str_list(obj: object, where: str, key: str) -> list[str]:
    if not isinstance(obj, list) or not all(isinstance(t, str) for t in obj):
        raise UserError(f"{where}: '{key}' must be a list of strings, got {json.dumps(obj)[:60]}")
    return list(obj)


def _parse_queries(obj: object, where: str) -> np.ndarray:
    try:
        q = np.asarray(obj, dtype=np.float32)
    except (TypeError, ValueError):
        raise UserError(f"{where}: 'queries' must be a list of [x1, y1, x2, y2] boxes") from None
    if q.size == 0:
        return np.zeros((0, 4), np.float32)
    if q.ndim != 2 or q.shape[1] != 4 or not np.isfinite(q).all():
        raise UserError(f"{where}: 'queries' must be a list of [x1, y1, x2, y2] boxes")
    return q


def _parse_entry(obj: dict, root: Path, where: str, line: int) -> ManifestEntry:
    image = obj["image"]
    if not isinstance(image, str) or not image:
        raise UserError(f"{where}: 'image' must be a non-empty string")
    path = Path(image) if os.path.isabs(image) else root / image
    tags = _str_list(obj.get("tags", []), where, "tags")
    labels = _str_list(obj["labels"], where, "labels") if "labels" in obj else None
    queries = _parse_queries(obj["queries"], where) if "queries" in obj else None
    return ManifestEntry(image=image, path=path, tags=tags, labels=labels, queries=queries, line=line)


def _looks_like_coco(path: Path) -> bool:
    """A ``.json`` file holding one object with ``images`` (else it is read as JSON Lines)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and "images" in data


def iter_manifest(path: str | os.PathLike, images_root: Optional[str | os.PathLike] = None,
                  header: Optional[dict] = None) -> Iterator[ManifestEntry]:
    """The entries of a JSONL manifest, one line at a time (memory: one line, whatever the file's
    size); the header line, if any, is put into the ``header`` dict when one is given.

    Raises :class:`UserError` naming ``file:line`` for a line that is not UTF-8 or not a JSON
    object, lacks ``image`` or has badly typed ``tags``/``labels``/``queries``.
    """
    path = Path(path)
    root = Path(images_root) if images_root is not None else path.parent
    got: dict = {}
    seen_entry = False
    for lineno, obj in _json_lines(path):
        where = f"{path}:{lineno}"
        if "image" not in obj:
            if not seen_entry and not got and not _IMAGE_KEYS & obj.keys():
                got = obj  # metadata line (e.g. the synthetic world's noise rates)
                if header is not None:
                    header.update(obj)
                continue
            raise UserError(f"{where}: missing key 'image' (keys: {', '.join(map(repr, sorted(obj)))[:80]})")
        seen_entry = True
        yield _parse_entry(obj, root, where, lineno)


def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` of each non-blank line; UserError naming the line otherwise."""
    with open(path, "rb") as f:  # decoded line by line: an error names the line
        for lineno, data in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                raw = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{where}: not UTF-8 text (byte {data[e.start]:#04x} at column {e.start + 1}); "
                    "save the manifest as UTF-8"
                ) from None
            if lineno == 1:
                raw = raw.removeprefix("\ufeff")  # a UTF-8 BOM (Windows editors write one)
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg}): {raw.strip()[:60]}") from None
            if not isinstance(obj, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def count_entries(path: str | os.PathLike) -> int:
    """The number of entries :func:`iter_manifest` yields for a well-formed manifest (non-blank
    lines, less a header line), counted without parsing the lines' JSON past the first."""
    n, first = 0, True
    with open(path, "rb") as f:
        for data in f:
            raw = data.decode("utf-8", "replace")
            if first:
                raw = raw.removeprefix("\ufeff")
            if not raw.strip():
                continue
            if first:
                first = False
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError:
                    obj = None  # iter_manifest names the line
                if isinstance(obj, dict) and "image" not in obj and not _IMAGE_KEYS & obj.keys():
                    continue  # the header
            n += 1
    return n


def is_coco(path: str | os.PathLike) -> bool:
    """Whether ``path`` is read as a COCO JSON (a ``.json`` file holding one object with ``images``)."""
    path = Path(path)
    return path.suffix == ".json" and _looks_like_coco(path)


def read_manifest(path: str | os.PathLike, images_root: Optional[str | os.PathLike] = None) -> Manifest:
    """Read a JSONL manifest (or a COCO JSON, see :func:`read_coco_as_manifest`) into memory
    (about 1 KB per line: a large manifest is better streamed with :func:`iter_manifest`).

    Raises :class:`UserError` naming ``file:line`` for a line that is not UTF-8 or not a JSON
    object, lacks ``image`` or has badly typed ``tags``/``labels``/``queries``.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"manifest not found: {path}")
    if is_coco(path):
        return read_coco_as_manifest(path, images_root)
    header: dict = {}
    entries = list(iter_manifest(path, images_root, header))
    if not entries:
        raise UserError(f"{path}: manifest has no images")
    return Manifest(path=path, entries=entries, header=header)


def read_coco_as_manifest(path: str | os.PathLike, images_root: Optional[str | os.PathLike] = None) -> Manifest:
    """A COCO JSON as weak labels: each image's ``labels`` are the category names of its annotations.

    ``images_root`` defaults to ``images/`` beside the JSON when it exists, else the JSON's folder.
    Images without annotations get ``labels == []``. The annotation boxes are never used as queries.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict) or "images" not in data or "categories" not in data:
        raise UserError(f"{path}: not a COCO JSON (needs 'images' and 'categories')")
    if images_root is None:
        images_root = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
    root = Path(images_root)
    try:
        names = {c["id"]: c["name"] for c in data["categories"]}
        labels: dict[int, set[str]] = {im["id"]: set() for im in data["images"]}
        for ann in data.get("annotations", []):
            labels[ann["image_id"]].add(names[ann["category_id"]])
        entries = [
            ManifestEntry(
                image=im["file_name"],
                path=root / im["file_name"],
                labels=sorted(labels[im["id"]]),
                line=k + 1,
            )
            for k, im in enumerate(data["images"])
        ]
    except (KeyError, TypeError) as e:
        raise UserError(f"{path}: malformed COCO JSON (missing/unknown {e})") from None
    if not entries:
        raise UserError(f"{path}: COCO JSON has no images")
    return Manifest(path=path, entries=entries, header={"format": "coco"})
