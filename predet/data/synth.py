"""The built-in synthetic world (DESIGN §3): cluttered scenes of K classes, shape x appearance.

``predet data synth --out W`` writes (DESIGN §6)::

    W/pretrain/manifest.jsonl   {"image": "images/000000.jpg", "tags": ["#redcircle", ...]}
    W/pretrain/synonyms.json    {class: [tag, ...]}
    W/pretrain/truth.jsonl      {"image", "labels", "boxes" (XYXY px), "box_labels"}  (analysis only)
    W/pretrain/meta.json        preset, seed, size, drop, add, counts, classes, measured noise rates
    W/pretrain/images/          JPEG, quality 90
    W/det/train.json, val.json  COCO: bbox (XYWH), RLE segmentation, area, iscrowd, categories 1..K
    W/det/images/               train_000000.jpg, val_000000.jpg, ...

A class is a shape crossed with an appearance (``striped_star``): every shape comes in every
appearance and vice versa, so recognising a class needs both. Each image holds 1-8 objects whose
sides span 5%-60% of the image side; later objects occlude earlier ones, but never below
``MIN_VISIBLE`` of an object's area, so every painted object is annotated. A box is the tight box
of the object's *visible* mask. Backgrounds mix crops of scikit-image's shipped photographs and
textures with colour noise.

Pre-training images carry noisy tags only: each present class's tags are dropped with probability
``drop``; each absent class's tags are added with probability ``add``; a few distractor tags
(``#love``) map to no class. Tag noise has its own RNG stream, separate from rendering.

Determinism: image ``i`` of split ``s`` is drawn from ``default_rng([seed, s, i])`` alone, so any
number of worker processes writes identical bytes; JSON is written with sorted keys.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import cv2
import numpy as np

from predet.errors import UserError

__all__ = [
    "PRESETS",
    "class_names",
    "synonyms_for",
    "sample_tags",
    "measure_tag_noise",
    "render_scene",
    "generate_world",
    "run",
]

# Preset: image side, image counts per split, and how many shapes/appearances make the classes.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"size": 96, "pretrain": 200, "det_train": 64, "det_val": 32, "shapes": 3, "appearances": 2},
    "small": {"size": 128, "pretrain": 4000, "det_train": 800, "det_val": 200, "shapes": 8, "appearances": 3},
    "base": {"size": 256, "pretrain": 50000, "det_train": 5000, "det_val": 1000, "shapes": 8, "appearances": 3},
}
SPLITS = ("pretrain", "det_train", "det_val")
_SPLIT_ID = {name: i for i, name in enumerate(SPLITS)}

# shape -> its tag words (singular, plural, synonym); appearance -> (word, synonym)
SHAPE_WORDS: dict[str, tuple[str, str, str]] = {
    "circle": ("circle", "circles", "round"),
    "square": ("square", "squares", "boxy"),
    "triangle": ("triangle", "triangles", "triangular"),
    "star": ("star", "stars", "starry"),
    "cross": ("cross", "crosses", "plus"),
    "ring": ("ring", "rings", "donut"),
    "diamond": ("diamond", "diamonds", "rhombus"),
    "hexagon": ("hexagon", "hexagons", "hex"),
}
APPEARANCE_WORDS: dict[str, tuple[str, str]] = {
    "red": ("red", "crimson"),
    "striped": ("striped", "stripy"),
    "checkered": ("checkered", "plaid"),
}
DISTRACTOR_TAGS = ("#love", "#instagood", "#photooftheday", "#nofilter", "#tbt", "#art")

MIN_OBJECTS, MAX_OBJECTS = 1, 8
MIN_SIDE, MAX_SIDE = 0.05, 0.60  # object side as a fraction of the image side
MIN_VISIBLE = 0.30  # an object never gets occluded below this fraction of its area
JPEG_QUALITY = 90

# scikit-image sample images shipped with the wheel (no download): photographs and textures.
_BACKGROUND_SOURCES = (
    "astronaut", "camera", "coffee", "chelsea", "rocket", "hubble_deep_field",
    "immunohistochemistry", "moon", "coins", "brick", "grass", "gravel",
)
_BACKGROUND_CACHE: list[np.ndarray] = []


# --------------------------------------------------------------------------------------------
# Classes, synonyms and tag noise (cheap: no rendering)
# --------------------------------------------------------------------------------------------
def class_names(preset: str = "tiny") -> list[str]:
    """``appearance_shape`` names of a preset, appearance-major (``red_circle``, ``red_square``...)."""
    spec = _preset(preset)
    shapes = list(SHAPE_WORDS)[: spec["shapes"]]
    appearances = list(APPEARANCE_WORDS)[: spec["appearances"]]
    return [f"{a}_{s}" for a in appearances for s in shapes]


def synonyms_for(classes: Sequence[str]) -> dict[str, list[str]]:
    """Three hashtags per class, e.g. ``red_circle -> [#redcircle, #redcircles, #crimsonround]``."""
    out = {}
    for name in classes:
        app, shape = name.split("_")
        (a0, a1), (s0, s1, s2) = APPEARANCE_WORDS[app], SHAPE_WORDS[shape]
        out[name] = [f"#{a0}{s0}", f"#{a0}{s1}", f"#{a1}{s2}"]
    return out


def sample_tags(
    labels: Sequence[str],
    *,
    synonyms: Mapping[str, Sequence[str]],
    rng: np.random.Generator,
    drop: float,
    add: float,
) -> list[str]:
    """Noisy hashtags of an image whose true classes are ``labels``.

    Each present class is dropped with probability ``drop`` (else 1-2 of its tags appear); each
    absent class is added with probability ``add`` (one of its tags); 0-2 distractor tags.
    """
    present = set(labels)
    tags: list[str] = []
    for name in synonyms:  # fixed class order: one draw per class, whatever the labels
        words = list(synonyms[name])
        keep = rng.random() >= drop if name in present else rng.random() < add
        n = int(rng.integers(1, 3)) if name in present else 1
        chosen = rng.choice(len(words), size=n, replace=False)
        if keep:
            tags.extend(words[j] for j in sorted(chosen))
    n_distract = int(rng.choice(3, p=[0.5, 0.35, 0.15]))
    tags.extend(DISTRACTOR_TAGS[j] for j in rng.choice(len(DISTRACTOR_TAGS), n_distract, replace=False))
    return [tags[j] for j in rng.permutation(len(tags))]


def measure_tag_noise(
    labels: Sequence[Sequence[str]], tags: Sequence[Sequence[str]], synonyms: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """Measured drop rate (present classes without a tag) and add rate (absent classes with one)."""
    tag_to_class = {t: c for c, ts in synonyms.items() for t in ts}
    present_n = dropped = absent_n = added = 0
    for true, image_tags in zip(labels, tags):
        tagged = {tag_to_class[t] for t in image_tags if t in tag_to_class}
        true = set(true)
        present_n += len(true)
        dropped += len(true - tagged)
        absent_n += len(synonyms) - len(true)
        added += len(tagged - true)
    return {
        "drop": dropped / max(present_n, 1),
        "add": added / max(absent_n, 1),
        "present_pairs": present_n,
        "absent_pairs": absent_n,
    }


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
@dataclass
class SceneObject:
    """One painted object: class index, visible mask (H, W) bool, and its whole area in px."""

    label: int
    mask: np.ndarray
    full_area: int


def _load_backgrounds() -> list[np.ndarray]:
    """Sample images as float32 RGB in [0, 1]; loaded once per process."""
    if not _BACKGROUND_CACHE:
        import skimage.data

        for name in _BACKGROUND_SOURCES:
            img = np.asarray(getattr(skimage.data, name)())
            if img.ndim == 2:
                img = np.repeat(img[..., None], 3, axis=2)
            _BACKGROUND_CACHE.append(img[..., :3].astype(np.float32) / 255.0)
    return _BACKGROUND_CACHE


def _photo_crop(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random square crop of a random sample image, resized to (size, size, 3), tinted, maybe flipped."""
    sources = _load_backgrounds()
    src = sources[int(rng.integers(len(sources)))]
    h, w = src.shape[:2]
    side = int(min(h, w) * rng.uniform(0.25, 1.0))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = cv2.resize(src[y : y + side, x : x + side], (size, size), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return crop * rng.uniform(0.6, 1.2, size=3).astype(np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float32: one or two photo/texture crops blended with low-frequency colour noise."""
    photo = _photo_crop(rng, size)
    if rng.random() < 0.3:
        photo = 0.5 * (photo + _photo_crop(rng, size))
    grid = int(rng.integers(2, 9))
    blobs = cv2.resize(rng.random((grid, grid, 3), dtype=np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    alpha = np.float32(rng.uniform(0.45, 0.9))
    return alpha * photo + (1 - alpha) * blobs


def _polygon(shape: str) -> np.ndarray:
    """Unit-radius outline of a polygonal shape, (V, 2) xy."""
    def regular(n: int, phase: float) -> np.ndarray:
        t = phase + 2 * np.pi * np.arange(n) / n
        return np.stack([np.cos(t), np.sin(t)], 1)

    if shape == "square":
        return regular(4, np.pi / 4)
    if shape == "triangle":
        return regular(3, -np.pi / 2)
    if shape == "hexagon":
        return regular(6, 0.0)
    if shape == "diamond":
        return regular(4, 0.0) * np.array([0.6, 1.0])
    if shape == "star":
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)[:, None]
        return regular(10, -np.pi / 2) * radii
    if shape == "cross":
        a = 0.33
        arms = np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a],
                         [a, 1], [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a]], dtype=np.float64)
        return arms / math.hypot(1.0, a)  # arm corners on the unit circle
    raise ValueError(f"no polygon for shape {shape!r}")


def _shape_mask(shape: str, rng: np.random.Generator, size: int, radius: float, center: np.ndarray) -> np.ndarray:
    """Binary (size, size) uint8 mask of one randomly rotated, slightly squashed shape.

    The shape lies inside the disc of ``radius`` around ``center``, so its side is at most ``2 * radius``.
    """
    mask = np.zeros((size, size), np.uint8)
    shift = 4  # cv2 sub-pixel bits
    stretch = rng.permutation([1.0, rng.uniform(0.75, 1.0)])  # squash one axis, never grow
    angle = rng.uniform(0, 2 * np.pi)
    if shape in ("circle", "ring"):
        axes = tuple(int(round(radius * s * 2**shift)) for s in stretch)
        c = tuple(int(round(v * 2**shift)) for v in center)
        cv2.ellipse(mask, c, axes, float(np.degrees(angle)), 0, 360, 1, -1, cv2.LINE_8, shift)
        if shape == "ring":
            inner = tuple(max(1, int(a * 0.55)) for a in axes)
            cv2.ellipse(mask, c, inner, float(np.degrees(angle)), 0, 360, 0, -1, cv2.LINE_8, shift)
        return mask
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = (_polygon(shape) * stretch) @ rot.T * radius + center  # (V, 2) in px
    cv2.fillPoly(mask, [np.round(pts * 2**shift).astype(np.int32)], 1, cv2.LINE_8, shift)
    return mask


def _texture(appearance: str, rng: np.random.Generator, h: int, w: int, side: float) -> np.ndarray:
    """(h, w, 3) float32 RGB fill of an appearance; pattern scale follows the object's side."""
    if appearance == "red":
        colour = np.array([0.82, 0.12, 0.12]) + rng.uniform(-0.08, 0.08, 3)
        return np.broadcast_to(colour.astype(np.float32), (h, w, 3)).copy()
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = rng.uniform(0, np.pi)
    u, v = xx * np.cos(t) + yy * np.sin(t), -xx * np.sin(t) + yy * np.cos(t)
    if appearance == "striped":
        period = max(3.0, side / rng.uniform(3.0, 5.0))
        on = np.floor(u / (period / 2)) % 2 == 0
        a, b = np.array([0.95, 0.82, 0.1]), np.array([0.08, 0.08, 0.1])
    elif appearance == "checkered":
        cell = max(2.0, side / rng.uniform(3.0, 5.0))
        on = (np.floor(u / cell) + np.floor(v / cell)) % 2 == 0
        a, b = np.array([0.95, 0.95, 0.95]), np.array([0.1, 0.25, 0.85])
    else:
        raise ValueError(f"unknown appearance {appearance!r}")
    jitter = rng.uniform(-0.06, 0.06, 3)
    return np.where(on[..., None], a + jitter, b + jitter).astype(np.float32)


def render_scene(
    rng: np.random.Generator, *, size: int, classes: Sequence[str]
) -> tuple[np.ndarray, list[SceneObject]]:
    """Draw one scene: returns the (size, size, 3) uint8 RGB image and its objects, bottom to top.

    Objects are placed one at a time; a candidate that would leave an earlier object less than
    ``MIN_VISIBLE`` of its area visible is re-drawn (up to 10 tries, then skipped).
    """
    image = _background(rng, size)
    full: list[np.ndarray] = []  # each object's whole mask
    visible: list[np.ndarray] = []  # each object's visible mask
    labels: list[int] = []
    n_objects = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    for _ in range(n_objects):
        label = int(rng.integers(len(classes)))
        appearance, shape = classes[label].split("_")
        for _try in range(10):
            side = size * math.exp(rng.uniform(math.log(MIN_SIDE), math.log(MAX_SIDE)))
            radius = side / 2
            center = rng.uniform(radius, size - radius, size=2)
            mask = _shape_mask(shape, rng, size, radius, center).astype(bool)
            if mask.sum() < 4:
                continue
            if all((v & ~mask).sum() >= MIN_VISIBLE * f.sum() for v, f in zip(visible, full)):
                break
        else:
            continue
        visible = [v & ~mask for v in visible]
        full.append(mask)
        visible.append(mask.copy())
        labels.append(label)
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        tex = _texture(appearance, rng, y1 - y0, x1 - x0, side)
        # shading: a linear light gradient across the object's box, so fills are not flat colours
        gy, gx = np.mgrid[0 : y1 - y0, 0 : x1 - x0].astype(np.float32) / max(side, 1.0)
        g = rng.uniform(-0.35, 0.35, 2).astype(np.float32)
        tex *= (np.float32(rng.uniform(0.8, 1.1)) + g[0] * (gy - 0.5) + g[1] * (gx - 0.5))[..., None]
        region = mask[y0:y1, x0:x1]
        image[y0:y1, x0:x1][region] = tex[region]
    image += rng.normal(0, rng.uniform(0.01, 0.05), size=image.shape).astype(np.float32)
    image = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    return image, [
        SceneObject(label=l, mask=v, full_area=int(f.sum())) for l, v, f in zip(labels, visible, full)
    ]


def _encode_jpeg(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def _box_xyxy(mask: np.ndarray) -> list[int]:
    """Tight box of a non-empty mask, XYXY with exclusive max (pixel edges)."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


# --------------------------------------------------------------------------------------------
# One image per job (runs in worker processes)
# --------------------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(state: dict[str, Any]) -> None:
    _WORKER.clear()
    _WORKER.update(state)
    _load_backgrounds()


def _image_name(split: str, index: int) -> str:
    if split == "pretrain":
        return f"images/{index:06d}.jpg"
    return f"{split.removeprefix('det_')}_{index:06d}.jpg"


def _make_image(job: tuple[str, int]) -> dict[str, Any]:
    """Render, write and annotate image ``index`` of ``split``; returns its JSON-ready record."""
    from pycocotools import mask as mask_utils

    split, index = job
    s = _WORKER
    rng = np.random.default_rng([s["seed"], _SPLIT_ID[split], index])
    image, objects = render_scene(rng, size=s["size"], classes=s["classes"])
    name = _image_name(split, index)
    folder = Path(s["out"]) / ("pretrain" if split == "pretrain" else "det/images")
    (folder / name).write_bytes(_encode_jpeg(image))
    boxes = [_box_xyxy(o.mask) for o in objects]
    if split == "pretrain":
        box_labels = [s["classes"][o.label] for o in objects]
        labels = sorted(set(box_labels))
        tag_rng = np.random.default_rng([s["seed"], _SPLIT_ID[split], index, 1])  # own stream
        tags = sample_tags(labels, synonyms=s["synonyms"], rng=tag_rng, drop=s["drop"], add=s["add"])
        return {"image": name, "tags": tags, "labels": labels, "boxes": boxes, "box_labels": box_labels}
    anns = []
    for o, (x1, y1, x2, y2) in zip(objects, boxes):
        rle = mask_utils.encode(np.asfortranarray(o.mask.astype(np.uint8)))
        anns.append({
            "category_id": o.label + 1,
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "area": int(o.mask.sum()),
            "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "iscrowd": 0,
        })
    return {"file_name": name, "height": s["size"], "width": s["size"], "annotations": anns}


# --------------------------------------------------------------------------------------------
# The world
# --------------------------------------------------------------------------------------------
def _preset(preset: str) -> dict[str, Any]:
    if preset not in PRESETS:
        raise UserError(f"--preset {preset!r} is not one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def _dump(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _coco(records: list[dict], classes: Sequence[str], info: dict) -> dict:
    images, annotations = [], []
    for image_id, rec in enumerate(records, start=1):
        images.append({"id": image_id, "file_name": rec["file_name"], "height": rec["height"], "width": rec["width"]})
        for ann in rec["annotations"]:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    categories = [
        {"id": k, "name": name, "supercategory": name.split("_")[1]} for k, name in enumerate(classes, start=1)
    ]
    return {"info": info, "images": images, "annotations": annotations, "categories": categories}


def _check_args(out: Path, preset: str, seed: int, size: Optional[int], drop: float, add: float,
                workers: Optional[int], counts: Optional[Mapping[str, int]]) -> None:
    _preset(preset)
    if seed < 0:
        raise UserError(f"--seed {seed} must be >= 0")
    if size is not None and not 32 <= size <= 4096:
        raise UserError(f"--size {size} must be between 32 and 4096 px")
    for flag, p in (("--drop", drop), ("--add", add)):
        if not 0.0 <= p <= 1.0:
            raise UserError(f"{flag} {p} must be a probability in [0, 1]")
    if workers is not None and workers < 1:
        raise UserError(f"--workers {workers} must be >= 1")
    for key, n in (counts or {}).items():
        if key not in SPLITS or int(n) < 0:
            raise UserError(f"counts[{key!r}]={n}: keys are {', '.join(SPLITS)} with counts >= 0")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")


def generate_world(
    out: str | Path,
    preset: str = "tiny",
    seed: int = 0,
    *,
    size: Optional[int] = None,
    drop: float = 0.3,
    add: float = 0.1,
    workers: Optional[int] = None,
    overwrite: bool = False,
    progress: bool = True,
    counts: Optional[Mapping[str, int]] = None,
) -> dict[str, Any]:
    """Generate the synthetic world into ``out`` (layout in the module docstring).

    Args:
        out: world folder; an existing non-empty one needs ``overwrite`` (which replaces only
            ``out/pretrain`` and ``out/det``).
        preset: ``tiny`` | ``small`` | ``base`` (image side, counts, number of classes).
        seed: the whole world is a function of (preset, seed, size, drop, add, counts).
        size: image side in px (default: the preset's).
        drop, add: tag-noise probabilities of the pre-training set.
        workers: processes (default: cores, at most one per 500 images).
        counts: override images per split, e.g. ``{"pretrain": 1000, "det_train": 0, "det_val": 0}``.

    Returns:
        summary dict: ``out``, ``paths``, ``counts``, ``classes``, ``measured`` noise rates, ``seconds``.
    """
    out = Path(out)
    _check_args(out, preset, seed, size, drop, add, workers, counts)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--out {out} exists and is not empty; pass --overwrite to replace the world")
        for sub in ("pretrain", "det"):
            shutil.rmtree(out / sub, ignore_errors=True)
    start = time.perf_counter()
    spec = _preset(preset)
    size = int(size or spec["size"])
    n = {split: int(spec[split]) for split in SPLITS} | {k: int(v) for k, v in (counts or {}).items()}
    classes = class_names(preset)
    synonyms = synonyms_for(classes)
    (out / "pretrain" / "images").mkdir(parents=True, exist_ok=True)
    (out / "det" / "images").mkdir(parents=True, exist_ok=True)

    state = {"out": str(out), "seed": seed, "size": size, "classes": classes, "synonyms": synonyms,
             "drop": drop, "add": add}
    jobs = [(split, i) for split in SPLITS for i in range(n[split])]
    records = _run_jobs(jobs, state, workers, progress)
    by_split = {split: [r for (s, _), r in zip(jobs, records) if s == split] for split in SPLITS}

    pre = by_split["pretrain"]
    measured = measure_tag_noise([r["labels"] for r in pre], [r["tags"] for r in pre], synonyms)
    p = out / "pretrain"
    _write_text(p / "manifest.jsonl", "".join(_dump({"image": r["image"], "tags": r["tags"]}) + "\n" for r in pre))
    _write_text(p / "truth.jsonl", "".join(
        _dump({k: r[k] for k in ("image", "labels", "boxes", "box_labels")}) + "\n" for r in pre))
    _write_text(p / "synonyms.json", json.dumps(synonyms, indent=2, sort_keys=True) + "\n")
    meta = {"preset": preset, "seed": seed, "size": size, "drop": drop, "add": add, "counts": n,
            "classes": classes, "distractor_tags": list(DISTRACTOR_TAGS), "measured": measured}
    _write_text(p / "meta.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
    info = {"description": "predet synthetic world", "preset": preset, "seed": seed, "size": size}
    for split, fname in (("det_train", "train.json"), ("det_val", "val.json")):
        _write_text(out / "det" / fname, _dump(_coco(by_split[split], classes, info)) + "\n")

    return {
        "out": str(out),
        "paths": {
            "manifest": str(p / "manifest.jsonl"), "synonyms": str(p / "synonyms.json"),
            "truth": str(p / "truth.jsonl"), "meta": str(p / "meta.json"),
            "det_train": str(out / "det" / "train.json"), "det_val": str(out / "det" / "val.json"),
            "det_images": str(out / "det" / "images"),
        },
        "counts": n,
        "classes": classes,
        "measured": measured,
        "seconds": time.perf_counter() - start,
    }


def _run_jobs(jobs: list[tuple[str, int]], state: dict[str, Any], workers: Optional[int],
              progress: bool) -> list[dict[str, Any]]:
    """Records of all jobs, in job order, from ``workers`` processes (inline when 1)."""
    if workers is None:
        workers = max(1, min(os.cpu_count() or 1, len(jobs) // 500))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="synth", unit="img", file=sys.stderr, leave=False)
    records = []
    if workers == 1:
        _init_worker(state)
        results = map(_make_image, jobs)
        pool = None
    else:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(state,))
        results = pool.imap(_make_image, jobs, chunksize=32)
    try:
        for rec in results:
            records.append(rec)
            if bar is not None:
                bar.update(1)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if bar is not None:
            bar.close()
    return records


def run(args: argparse.Namespace) -> int:
    """``predet data synth``: generate the world, print one summary line."""
    summary = generate_world(
        args.out, args.preset, args.seed, size=args.size, drop=args.drop, add=args.add,
        workers=args.workers, overwrite=args.overwrite, progress=sys.stderr.isatty(),
    )
    c, m = summary["counts"], summary["measured"]
    print(
        f"wrote {summary['out']}: {len(summary['classes'])} classes, {c['pretrain']} pre-training images "
        f"(tags: measured drop {m['drop']:.3f}, add {m['add']:.3f}), detection {c['det_train']} train / "
        f"{c['det_val']} val, in {summary['seconds']:.1f} s"
    )
    return 0
