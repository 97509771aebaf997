"""Manifests, tag normalisation and robust image loading (DESIGN §4).

A manifest is JSON Lines, one image per line (relative paths are relative to the manifest's folder)::

    {"image": "images/000001.jpg", "tags": ["#Dogs", "puppy"]}
    {"image": "/abs/path.png", "labels": ["dog"], "queries": [[x1, y1, x2, y2], ...]}

A first line without ``image`` is a header (metadata such as the synthetic world's noise rates).
A COCO JSON file is also accepted wherever a manifest is: its images become entries whose ``labels``
are the categories of their annotations (weak, image-level labels; the boxes are NOT used).

Images are read through :func:`load_image`, which returns RGB whatever the file holds (EXIF
rotation applied; CMYK, RGBA, LA, P, L, 16-bit converted) and raises :class:`BadImage` with a
one-line reason for missing, truncated, corrupt or too-small files, so callers count and name them.
"""

from __future__ import annotations

import io
import json
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps

from predet.errors import UserError

__all__ = [
    "BadImage",
    "ManifestEntry",
    "Manifest",
    "read_manifest",
    "read_coco_as_manifest",
    "normalize_tag",
    "load_synonyms",
    "tag_to_classes",
    "load_image",
    "decode_image",
    "resolve_labels",
    "MIN_IMAGE_SIDE",
]

MIN_IMAGE_SIDE = 32  # smaller images carry no usable query boxes at 480x480 views

# A truncated JPEG must raise, not decode to a grey bottom half.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class BadImage(Exception):
    """An image that cannot be used; ``str(e)`` is a one-line reason. Callers count and name these."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


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
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and "images" in data


def read_manifest(path: str | os.PathLike, images_root: Optional[str | os.PathLike] = None) -> Manifest:
    """Read a JSONL manifest (or a COCO JSON, see :func:`read_coco_as_manifest`).

    Raises :class:`UserError` naming ``file:line`` for a line that is not a JSON object, lacks
    ``image`` or has badly typed ``tags``/``labels``/``queries``.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"manifest not found: {path}")
    if path.suffix == ".json" and _looks_like_coco(path):
        return read_coco_as_manifest(path, images_root)
    root = Path(images_root) if images_root is not None else path.parent
    entries: list[ManifestEntry] = []
    header: dict = {}
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg}): {raw.strip()[:60]}") from None
            if not isinstance(obj, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            if "image" not in obj:
                if not entries and not header:
                    header = obj  # metadata line (e.g. the synthetic world's noise rates)
                    continue
                raise UserError(f"{where}: missing key 'image'")
            entries.append(_parse_entry(obj, root, where, lineno))
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
        data = json.loads(path.read_text(encoding="utf-8"))
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


# --------------------------------------------------------------------------------------------
# Tags -> classes
# --------------------------------------------------------------------------------------------
def normalize_tag(tag: str) -> str:
    """``"  #Dogs "`` -> ``"dogs"``: Unicode NFKC, case-folded, leading ``#`` and whitespace removed."""
    t = unicodedata.normalize("NFKC", tag).strip().casefold()
    return t.lstrip("#").strip()


def load_synonyms(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read a synonyms file ``{class: [tag, ...]}``; raises UserError naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"synonyms file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path}: expected a non-empty JSON object {{class: [tag, ...]}}")
    for cls, tags in data.items():
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise UserError(f"{path}: class '{cls}' must map to a list of tag strings")
    return data


def tag_to_classes(synonyms: dict[str, list[str]]) -> dict[str, list[str]]:
    """Normalised tag -> classes it names. A class's own name is one of its tags (paper §4.1:
    "dog" expands to "#dogs", "#canine", ...); a tag listed under two classes names both."""
    out: dict[str, list[str]] = {}
    for cls, tags in synonyms.items():
        for t in [cls, *tags]:
            key = normalize_tag(t)
            if key and cls not in out.setdefault(key, []):
                out[key].append(cls)
    return out


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------
def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16/32-bit greyscale is scaled by its dtype's range, alpha is
    composited on white (a transparent background is not black in the photo the user saw)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if img.mode.startswith("I;16"):
            arr8 = (arr.astype(np.uint32) >> 8).astype(np.uint8)
        else:  # 32-bit int or float: map its own range to 0..255
            arr = arr.astype(np.float64)
            lo, hi = float(arr.min()), float(arr.max())
            arr8 = ((arr - lo) * (255.0 / max(hi - lo, 1e-12))).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def decode_image(
    data: bytes | str | os.PathLike,
    *,
    name: str | os.PathLike = "<bytes>",
    min_side: int = MIN_IMAGE_SIDE,
    draft_short_side: Optional[int] = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode an image file (path or bytes) to RGB; EXIF orientation applied.

    Args:
        data: a path or the file's bytes.
        name: how errors name the image.
        min_side: smaller images raise :class:`BadImage`.
        draft_short_side: for JPEG, let libjpeg decode at 1/2, 1/4 or 1/8 scale as long as the
            short side stays >= this (much faster for large photos); boxes must then be scaled by
            ``image.size / full_size``.

    Returns:
        ``(image, full_size)``: the RGB image and the ``(width, height)`` the file has at full
        resolution after EXIF rotation (the pixel frame of the query cache).
    """
    if isinstance(data, (str, os.PathLike)) and not os.path.isfile(data):
        raise BadImage(name, "file not found")
    try:
        img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        full = img.size
        if draft_short_side is not None and img.format == "JPEG":
            scale = max(draft_short_side / max(min(full), 1), 1e-6)
            img.draft("RGB", (max(1, int(full[0] * scale)), max(1, int(full[1] * scale))))
        img.load()  # raises on truncated/corrupt data
        transposed = ImageOps.exif_transpose(img)
        if transposed is not None and transposed is not img:
            if transposed.size != img.size:
                full = (full[1], full[0])  # 90/270 degree orientation
            img = transposed
        img = _to_rgb(img)
    except BadImage:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError) as e:
        raise BadImage(name, f"cannot decode ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if min(full) < min_side:
        raise BadImage(name, f"too small ({full[0]}x{full[1]} < {min_side} px)")
    return img, full


def load_image(
    path: str | os.PathLike, *, min_side: int = MIN_IMAGE_SIDE, draft_short_side: Optional[int] = None
) -> tuple[Image.Image, tuple[int, int]]:
    """:func:`decode_image` for a file path (the error names the path)."""
    return decode_image(path, name=path, min_side=min_side, draft_short_side=draft_short_side)


def resolve_labels(
    entries: Sequence[ManifestEntry], synonyms: Optional[dict[str, list[str]]]
) -> tuple[list[list[str]], dict[str, int]]:
    """Class names of each entry: its ``labels`` if given, else its tags mapped through ``synonyms``.

    Returns the per-entry class lists (sorted, unique) and a count of unseen normalised tags.
    """
    t2c = tag_to_classes(synonyms) if synonyms else {}
    unknown: dict[str, int] = {}
    out = []
    for e in entries:
        if e.labels is not None:
            out.append(sorted(set(e.labels)))
            continue
        classes: set[str] = set()
        for t in e.tags:
            key = normalize_tag(t)
            if key in t2c:
                classes.update(t2c[key])
            elif key:
                unknown[key] = unknown.get(key, 0) + 1
        out.append(sorted(classes))
    return out, unknown
