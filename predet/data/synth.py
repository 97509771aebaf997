"""The built-in synthetic world (DESIGN §3): cluttered scenes of K classes, shape x appearance.

``predet data synth --out W`` writes (DESIGN §6)::

    W/pretrain/manifest.jsonl   {"image": "images/000000.jpg", "tags": ["#redcircle", ...]}
    W/pretrain/synonyms.json    {class: [tag, ...]}
    W/pretrain/truth.jsonl      {"image", "labels", "boxes" (XYXY px), "box_labels"} (analysis)
    W/pretrain/meta.json        preset, seed, size, drop, add, counts, classes, measured noise rates
    W/pretrain/images/          JPEG, quality 90
    W/det/train.json, val.json  COCO: bbox (XYWH), RLE segmentation, area, iscrowd, categories 1..K
    W/det/images/               train_000000.jpg, val_000000.jpg, ...

A class is a shape crossed with an appearance (``striped_triangle``): every shape comes in every
appearance and vice versa, so recognising a class needs both. Each image holds a preset's range
of objects (tiny: 1-8, sides 5%-60% of the image side; small/base: 1-3, sides 20%-60%); later
objects occlude earlier ones, but never below ``MIN_VISIBLE`` of an object's area, so every painted object is annotated. A box is the tight box
of the object's *visible* mask. Backgrounds mix crops of scikit-image's shipped photographs and
textures with colour noise. Rendering lives in :mod:`predet.data.synth_render`.

Pre-training images carry noisy tags only: each present class's tags are dropped with probability
``drop``; each absent class's tags are added with probability ``add``; a few distractor tags
(``#love``) map to no class. Tag noise has its own RNG stream, separate from rendering.

Determinism: image ``i`` of split ``s`` is drawn from ``default_rng([seed, s, i])`` alone, so any
number of worker processes writes identical bytes; JSON is written with sorted keys.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from predet.data.synth_render import box_xyxy, encode_jpeg, load_backgrounds, render_scene
from predet.errors import UserError

__all__ = [
    "PRESETS",
    "class_names",
    "synonyms_for",
    "sample_tags",
    "measure_tag_noise",
    "render_scene",
    "generate_world",
]

# Preset: image side, image counts per split, and how many shapes/appearances make the classes.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "size": 96,
        "pretrain": 200,
        "det_train": 64,
        "det_val": 32,
        "shapes": 3,
        "appearances": 2,
        "objects": (1, 8),
        "sides": (0.05, 0.60),
        "add": 0.1,
    },
    "small": {
        "size": 128,
        "pretrain": 4000,
        "det_train": 800,
        "det_val": 200,
        "shapes": 3,
        "appearances": 4,
        # few, large objects: an image-level tag then names a good part of the image, so the
        # classification signal survives the tag noise and the crops (issue 9)
        "objects": (1, 3),
        "sides": (0.20, 0.60),
        # about 0.5 wrong classes per image against 1.4 tagged true ones (12 classes)
        "add": 0.05,
    },
    "base": {
        "size": 256,
        "pretrain": 50000,
        "det_train": 5000,
        "det_val": 1000,
        "shapes": 3,
        "appearances": 4,
        "objects": (1, 3),
        "sides": (0.20, 0.60),
        "add": 0.05,
    },
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
    "green": ("green", "emerald"),
}
DISTRACTOR_TAGS = ("#love", "#instagood", "#photooftheday", "#nofilter", "#tbt", "#art")


# --------------------------------------------------------------------------------------------
# Classes, synonyms and tag noise (cheap: no rendering)
# --------------------------------------------------------------------------------------------
def class_names(preset: str = "tiny") -> list[str]:
    """``appearance_shape`` class names of a preset, appearance-major (``red_circle``, ...)."""
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
    tags.extend(
        DISTRACTOR_TAGS[j] for j in rng.choice(len(DISTRACTOR_TAGS), n_distract, replace=False)
    )
    return [tags[j] for j in rng.permutation(len(tags))]


def measure_tag_noise(
    labels: Sequence[Sequence[str]],
    tags: Sequence[Sequence[str]],
    synonyms: Mapping[str, Sequence[str]],
) -> dict[str, float | int]:
    """Measured drop rate (present classes without a tag) and add rate (absent classes with one).

    Returns ``{"drop", "add", "present_pairs", "absent_pairs"}``; a pair is (image, class).
    """
    tag_to_class = {t: c for c, ts in synonyms.items() for t in ts}
    present_n = dropped = absent_n = added = 0
    for true, image_tags in zip(labels, tags, strict=True):
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
# One image per job (runs in worker processes)
# --------------------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(state: dict[str, Any]) -> None:
    """Per-process state of ``_make_image``: the world's settings and the cached backgrounds."""
    _WORKER.clear()
    _WORKER.update(state)
    load_backgrounds()


def _init_pool_worker(state: dict[str, Any]) -> None:
    cv2.setNumThreads(1)  # parallel over processes, not inside OpenCV calls
    _init_worker(state)


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
    image, objects = render_scene(
        rng, size=s["size"], classes=s["classes"], objects=s["objects"], sides=s["sides"]
    )
    name = _image_name(split, index)
    folder = Path(s["out"]) / ("pretrain" if split == "pretrain" else "det/images")
    (folder / name).write_bytes(encode_jpeg(image))
    boxes = [box_xyxy(o.mask) for o in objects]
    if split == "pretrain":
        box_labels = [s["classes"][o.label] for o in objects]
        labels = sorted(set(box_labels))
        tag_rng = np.random.default_rng([s["seed"], _SPLIT_ID[split], index, 1])  # own stream
        tags = sample_tags(
            labels, synonyms=s["synonyms"], rng=tag_rng, drop=s["drop"], add=s["add"]
        )
        return {
            "image": name,
            "tags": tags,
            "labels": labels,
            "boxes": boxes,
            "box_labels": box_labels,
        }
    anns = []
    for o, (x1, y1, x2, y2) in zip(objects, boxes, strict=True):
        rle = mask_utils.encode(np.asfortranarray(o.mask.astype(np.uint8)))
        anns.append(
            {
                "category_id": o.label + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": int(o.mask.sum()),
                "segmentation": {
                    "size": [int(v) for v in rle["size"]],
                    "counts": rle["counts"].decode("ascii"),
                },
                "iscrowd": 0,
            }
        )
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
        images.append(
            {
                "id": image_id,
                "file_name": rec["file_name"],
                "height": rec["height"],
                "width": rec["width"],
            }
        )
        for ann in rec["annotations"]:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    categories = [
        {"id": k, "name": name, "supercategory": name.split("_")[1]}
        for k, name in enumerate(classes, start=1)
    ]
    return {"info": info, "images": images, "annotations": annotations, "categories": categories}


def _check_args(
    out: Path,
    preset: str,
    seed: int,
    size: int | None,
    drop: float,
    add: float,
    workers: int | None,
    counts: Mapping[str, int] | None,
) -> None:
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
    size: int | None = None,
    drop: float = 0.3,
    add: float | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    counts: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Generate the synthetic world into ``out`` (layout in the module docstring).

    Args:
        out: world folder; an existing non-empty one needs ``overwrite`` (which replaces only
            ``out/pretrain`` and ``out/det``, and removes the old world's query cache ``out/queries``).
        preset: ``tiny`` | ``small`` | ``base`` (image side, counts, number of classes).
        seed: the whole world is a function of (preset, seed, size, drop, add, counts).
        size: image side in px (default: the preset's).
        drop, add: tag-noise probabilities of the pre-training set (``add`` default: the
            preset's, 0.1 for tiny, 0.05 for small/base).
        workers: processes (default: cores, at most one per 500 images).
        counts: images per split over the preset's, e.g. ``{"pretrain": 1000, "det_val": 0}``.

    Returns:
        ``{"out", "paths", "counts", "classes", "measured" (tag-noise rates), "seconds"}``.
    """
    out = Path(out)
    add = float(_preset(preset)["add"] if add is None else add)
    _check_args(out, preset, seed, size, drop, add, workers, counts)
    _prepare_out(out, overwrite)
    start = time.perf_counter()
    spec = _preset(preset)
    size = int(size or spec["size"])
    n = {split: int(spec[split]) for split in SPLITS} | {
        k: int(v) for k, v in (counts or {}).items()
    }
    classes = class_names(preset)
    synonyms = synonyms_for(classes)
    state = {
        "out": str(out),
        "seed": seed,
        "size": size,
        "classes": classes,
        "objects": tuple(spec["objects"]),
        "sides": tuple(spec["sides"]),
        "synonyms": synonyms,
        "drop": drop,
        "add": add,
    }
    jobs = [(split, i) for split in SPLITS for i in range(n[split])]
    records = _run_jobs(jobs, state, workers, progress)
    by_split = {
        split: [r for (s, _), r in zip(jobs, records, strict=True) if s == split]
        for split in SPLITS
    }
    meta = {
        "preset": preset,
        "seed": seed,
        "size": size,
        "drop": drop,
        "add": add,
        "counts": n,
        "objects": list(spec["objects"]),
        "sides": list(spec["sides"]),
        "classes": classes,
        "distractor_tags": list(DISTRACTOR_TAGS),
    }
    measured = _write_pretrain(out / "pretrain", by_split["pretrain"], synonyms, meta)
    info = {"description": "predet synthetic world", "preset": preset, "seed": seed, "size": size}
    _write_det(out / "det", by_split, classes, info)
    return {
        "out": str(out),
        "paths": _world_paths(out),
        "counts": n,
        "objects": list(spec["objects"]),
        "sides": list(spec["sides"]),
        "classes": classes,
        "measured": measured,
        "seconds": time.perf_counter() - start,
    }


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Make ``out/pretrain/images`` and ``out/det/images``; an existing non-empty ``out`` needs
    ``overwrite``, which removes its ``pretrain``, ``det`` and ``queries`` folders first."""
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(
                f"--out {out} exists and is not empty; pass --overwrite to replace the world"
            )
        # a query cache beside the old world holds boxes of other images under the same names
        for sub in ("pretrain", "det", "queries"):
            shutil.rmtree(out / sub, ignore_errors=True)
    try:
        (out / "pretrain" / "images").mkdir(parents=True, exist_ok=True)
        (out / "det" / "images").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create the world folder ({e.strerror})") from None


def _write_pretrain(
    p: Path, pre: list[dict], synonyms: dict[str, list[str]], meta: dict[str, Any]
) -> dict[str, float | int]:
    """Write the pre-training set's manifest (tags only), truth, synonyms and ``meta.json``
    (``meta`` plus the measured tag noise) into ``p``; returns the measured tag noise."""
    measured = measure_tag_noise([r["labels"] for r in pre], [r["tags"] for r in pre], synonyms)
    _write_text(
        p / "manifest.jsonl",
        "".join(_dump({"image": r["image"], "tags": r["tags"]}) + "\n" for r in pre),
    )
    _write_text(
        p / "truth.jsonl",
        "".join(
            _dump({k: r[k] for k in ("image", "labels", "boxes", "box_labels")}) + "\n" for r in pre
        ),
    )
    _write_text(p / "synonyms.json", json.dumps(synonyms, indent=2, sort_keys=True) + "\n")
    meta = {**meta, "measured": measured}
    _write_text(p / "meta.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return measured


def _write_det(
    det: Path, by_split: Mapping[str, list[dict]], classes: Sequence[str], info: dict
) -> None:
    """Write ``det/train.json`` and ``det/val.json`` (COCO) from the detection splits' records."""
    for split, fname in (("det_train", "train.json"), ("det_val", "val.json")):
        _write_text(det / fname, _dump(_coco(by_split[split], classes, info)) + "\n")


def _world_paths(out: Path) -> dict[str, str]:
    """The DESIGN §6 files of the world at ``out``, by name."""
    p = out / "pretrain"
    return {
        "manifest": str(p / "manifest.jsonl"),
        "synonyms": str(p / "synonyms.json"),
        "truth": str(p / "truth.jsonl"),
        "meta": str(p / "meta.json"),
        "det_train": str(out / "det" / "train.json"),
        "det_val": str(out / "det" / "val.json"),
        "det_images": str(out / "det" / "images"),
    }


def _run_jobs(
    jobs: list[tuple[str, int]], state: dict[str, Any], workers: int | None, progress: bool
) -> list[dict[str, Any]]:
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

        # spawn: no fork of a parent that may hold torch/OpenCV threads; same on Linux and macOS
        pool = mp.get_context("spawn").Pool(
            workers, initializer=_init_pool_worker, initargs=(state,)
        )
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
