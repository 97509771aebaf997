"""The built-in synthetic world: files, COCO, mask/box agreement, tag noise, determinism."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from predet.cli import main
from predet.data import synth_render
from predet.data.synth import (
    DISTRACTOR_TAGS,
    class_names,
    generate_world,
    measure_tag_noise,
    sample_tags,
    synonyms_for,
)
from predet.data.synth_render import render_scene


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# Classes and synonyms
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset,min_classes", [("tiny", 6), ("small", 12), ("base", 12)])
def test_classes_need_shape_and_appearance(preset: str, min_classes: int) -> None:
    classes = class_names(preset)
    assert len(classes) >= min_classes and len(set(classes)) == len(classes)
    shapes = {c.split("_")[1] for c in classes}
    appearances = {c.split("_")[0] for c in classes}
    # a full product: every shape in >= 2 appearances and every appearance in >= 3 shapes, so
    # neither the shape nor the appearance alone names the class
    assert len(classes) == len(shapes) * len(appearances)
    assert len(appearances) >= 2 and len(shapes) >= 3


def test_synonyms_map_each_tag_to_one_class() -> None:
    syn = synonyms_for(class_names("small"))
    tags = [t for ts in syn.values() for t in ts]
    assert len(tags) == 3 * 12 == len(set(tags))  # 3 tags per class, none shared
    assert syn["red_circle"] == ["#redcircle", "#redcircles", "#crimsonround"]
    assert not set(DISTRACTOR_TAGS) & set(tags)


# --------------------------------------------------------------------------------------------
# Tag noise (sampled without rendering)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("drop,add", [(0.3, 0.1), (0.5, 0.02), (0.0, 0.0)])
def test_tag_noise_rates_match_configured(drop: float, add: float) -> None:
    classes = class_names("small")
    syn = synonyms_for(classes)
    rng = np.random.default_rng(0)
    labels = [
        sorted(rng.choice(classes, size=rng.integers(1, 6), replace=False)) for _ in range(3000)
    ]
    tags = [sample_tags(lab, synonyms=syn, rng=rng, drop=drop, add=add) for lab in labels]
    m = measure_tag_noise(labels, tags, syn)
    assert m["present_pairs"] > 8000 and m["absent_pairs"] > 25000
    assert abs(m["drop"] - drop) < 0.015
    assert abs(m["add"] - add) < 0.005
    if drop == add == 0.0:  # no noise: the tags name exactly the true classes
        t2c = {t: c for c, ts in syn.items() for t in ts}
        assert all(
            {t2c[t] for t in ts if t in t2c} == set(lab)
            for lab, ts in zip(labels, tags, strict=True)
        )


def test_measure_tag_noise_counts_pairs() -> None:
    syn = {"a_x": ["#a"], "b_x": ["#b"], "c_x": ["#c"]}
    m = measure_tag_noise([["a_x", "b_x"], ["c_x"]], [["#a", "#c", "#love"], ["#c"]], syn)
    # present pairs: (0,a) kept, (0,b) dropped, (1,c) kept; absent: (0,c) added, (1,a), (1,b) not
    assert m == {"drop": 1 / 3, "add": 1 / 3, "present_pairs": 3, "absent_pairs": 3}


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def test_render_scene_occlusion_and_sizes() -> None:
    classes = class_names("small")
    size = 128
    n_objects, sides = [], []
    for i in range(40):
        image, objects = render_scene(np.random.default_rng([7, i]), size=size, classes=classes)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        n_objects.append(len(objects))
        cover = np.zeros((size, size), np.int32)
        for o in objects:
            cover += o.mask
            assert o.mask.sum() >= synth_render.MIN_VISIBLE * o.full_area > 0
            ys, xs = np.nonzero(o.mask)
            sides.append(max(np.ptp(xs), np.ptp(ys)) + 1)
        assert cover.max() <= 1  # visible masks are disjoint
    assert 1 <= min(n_objects) and max(n_objects) <= 8 and np.mean(n_objects) > 3
    sides = np.array(sides) / size
    assert sides.max() <= synth_render.MAX_SIDE + 1 / size
    assert (
        np.quantile(sides, 0.1) < 0.1 and np.quantile(sides, 0.9) > 0.3
    )  # small and large objects


def test_backgrounds_are_not_flat() -> None:
    # mean per-channel std of the background (object-free pixels) well above the sensor noise
    stds = []
    for i in range(20):
        image, objects = render_scene(
            np.random.default_rng([3, i]), size=96, classes=class_names("tiny")
        )
        bg = ~np.any([o.mask for o in objects], axis=0)
        stds.append(image[bg].astype(np.float32).std(axis=0).mean() / 255)
    assert np.median(stds) > 0.08


# --------------------------------------------------------------------------------------------
# The tiny world on disk (session fixture)
# --------------------------------------------------------------------------------------------
def test_tiny_world_layout(tiny_world: Path) -> None:
    p = tiny_world / "pretrain"
    meta = json.loads((p / "meta.json").read_text())
    assert meta["counts"] == {"pretrain": 200, "det_train": 64, "det_val": 32}
    assert (meta["preset"], meta["seed"], meta["size"], meta["drop"], meta["add"]) == (
        "tiny",
        0,
        96,
        0.3,
        0.1,
    )
    assert meta["classes"] == class_names("tiny")
    manifest, truth = _jsonl(p / "manifest.jsonl"), _jsonl(p / "truth.jsonl")
    assert len(manifest) == len(truth) == 200
    assert all(
        set(line) == {"image", "tags"} for line in manifest
    )  # tags only: no labels, no boxes
    assert (
        [m["image"] for m in manifest]
        == [t["image"] for t in truth]
        == [f"images/{i:06d}.jpg" for i in range(200)]
    )
    assert all((p / m["image"]).is_file() for m in manifest)
    assert len(list((tiny_world / "det" / "images").iterdir())) == 96


def test_tiny_world_tags(tiny_world: Path) -> None:
    p = tiny_world / "pretrain"
    syn = json.loads((p / "synonyms.json").read_text())
    assert sorted(syn) == sorted(class_names("tiny"))
    manifest, truth = _jsonl(p / "manifest.jsonl"), _jsonl(p / "truth.jsonl")
    known = {t for ts in syn.values() for t in ts} | set(DISTRACTOR_TAGS)
    all_tags = [t for m in manifest for t in m["tags"]]
    assert set(all_tags) <= known
    assert sum(t in DISTRACTOR_TAGS for t in all_tags) > 50  # tags mapping to no class do appear
    # meta's measured rates are the ones the manifest and truth give
    measured = measure_tag_noise([t["labels"] for t in truth], [m["tags"] for m in manifest], syn)
    assert json.loads((p / "meta.json").read_text())["measured"] == measured
    assert abs(measured["drop"] - 0.3) < 0.06 and abs(measured["add"] - 0.1) < 0.04


def test_tiny_world_truth_boxes(tiny_world: Path) -> None:
    for t in _jsonl(tiny_world / "pretrain" / "truth.jsonl"):
        assert 1 <= len(t["boxes"]) == len(t["box_labels"]) <= 8
        assert t["labels"] == sorted(set(t["box_labels"]))
        b = np.array(t["boxes"])
        assert (b[:, :2] >= 0).all() and (b[:, 2:] <= 96).all() and (b[:, 2:] > b[:, :2]).all()


@pytest.mark.parametrize("split,n_images", [("train", 64), ("val", 32)])
def test_tiny_world_coco(tiny_world: Path, split: str, n_images: int) -> None:
    coco = COCO(str(tiny_world / "det" / f"{split}.json"))
    classes = class_names("tiny")
    assert [coco.cats[k]["name"] for k in sorted(coco.cats)] == classes and sorted(
        coco.cats
    ) == list(range(1, 7))
    assert len(coco.imgs) == n_images
    assert all(
        (tiny_world / "det" / "images" / im["file_name"]).is_file() for im in coco.imgs.values()
    )
    per_image = [len(coco.getAnnIds(imgIds=i)) for i in coco.imgs]
    assert min(per_image) >= 1 and max(per_image) <= 8
    for ann in coco.anns.values():
        img = coco.imgs[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert (
            w > 0
            and h > 0
            and x >= 0
            and y >= 0
            and x + w <= img["width"]
            and y + h <= img["height"]
        )
        assert ann["iscrowd"] == 0 and 1 <= ann["category_id"] <= 6
        m = coco.annToMask(ann)
        assert m.shape == (img["height"], img["width"])
        assert m.sum() == ann["area"] > 0
        inside = np.zeros_like(m)
        inside[y : y + h, x : x + w] = 1
        assert (m & ~inside.astype(bool)).sum() == 0  # mask inside the box
        ys, xs = np.nonzero(m)
        tight = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert np.abs(np.array(tight) - ann["bbox"]).max() <= 1
        np.testing.assert_allclose(mask_utils.toBbox(ann["segmentation"]), ann["bbox"], atol=1)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_tiny_world_ground_truth_scores_full_ap(tiny_world: Path, iou_type: str) -> None:
    # the evaluator reads the files as intended: ground truth submitted as detections gives AP 1
    gt = COCO(str(tiny_world / "det" / "val.json"))
    dets = [
        {k: a[k] for k in ("image_id", "category_id", "bbox", "segmentation")} | {"score": 1.0}
        for a in gt.anns.values()
    ]
    ev = COCOeval(gt, gt.loadRes(dets), iou_type)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0) and ev.stats[1] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# Determinism, noise on a bigger world, CLI
# --------------------------------------------------------------------------------------------
def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()
    }


@pytest.mark.slow
def test_same_seed_same_bytes_any_workers(tiny_world: Path, tmp_path: Path) -> None:
    # the fixture ran in-process; this run uses two worker processes
    generate_world(tmp_path / "w", "tiny", seed=0, workers=2, progress=False)
    a, b = _files(tiny_world), _files(tmp_path / "w")
    assert len(a) == 200 + 96 + 6
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


# sha256 of the tiny world's text files as main be209f7 wrote them (before generate_world was
# split): a change to any RNG draw, its order or the writing changes one. The JPEG bytes are left
# out (they also depend on the encoder's library build); test_same_seed_same_bytes_any_workers
# covers them within one build.
TINY_WORLD_SHA256 = {
    "pretrain/manifest.jsonl": "789edf5d90dc8040f88e09f2271187b24a52c0b0028bcb8762208154adf4d19c",
    "pretrain/truth.jsonl": "320e924604f49647b2ccd36d47221b0e54e1425ef5460ff864e3e29793d408fd",
    "pretrain/meta.json": "81446c36756427d9bbaff915103bacc94e9d446b801ca553975489de799ede49",
    "pretrain/synonyms.json": "2ab3266b60f44fffe0e88f1d137af9b3da498e1362ef6154250c9938db6cfda9",
    "det/train.json": "91d14424ff64586260b0cd082dddabc0a811d9ee8897daea0d2c4956c389779e",
    "det/val.json": "321accf49441c70920730ca42fbe055a857a9122a722973e0749bdfa16d40cf6",
}


def test_tiny_world_golden_digests(tiny_world: Path) -> None:
    got = {
        name: hashlib.sha256((tiny_world / name).read_bytes()).hexdigest()
        for name in TINY_WORLD_SHA256
    }
    assert got == TINY_WORLD_SHA256


def test_other_seed_differs(tiny_world: Path, tmp_path: Path) -> None:
    counts = {"pretrain": 4, "det_train": 4, "det_val": 0}
    generate_world(tmp_path / "w", "tiny", seed=1, counts=counts, progress=False)
    ref = (tiny_world / "pretrain" / "images" / "000000.jpg").read_bytes()
    assert (tmp_path / "w" / "pretrain" / "images" / "000000.jpg").read_bytes() != ref
    anns = json.loads((tmp_path / "w" / "det" / "train.json").read_text())["annotations"]
    ref_anns = json.loads((tiny_world / "det" / "train.json").read_text())["annotations"]
    assert [a["bbox"] for a in anns] != [a["bbox"] for a in ref_anns[: len(anns)]]
    # per-image RNG: a world with fewer images holds the same first images, byte for byte
    generate_world(tmp_path / "w0", "tiny", seed=0, counts=counts, progress=False)
    assert (tmp_path / "w0" / "pretrain" / "images" / "000000.jpg").read_bytes() == ref


@pytest.mark.slow
def test_small_like_world_noise_rates(tmp_path: Path) -> None:
    counts = {"pretrain": 600, "det_train": 0, "det_val": 0}
    s = generate_world(
        tmp_path / "w", "small", seed=0, drop=0.3, add=0.1, counts=counts, workers=1, progress=False
    )
    assert len(s["classes"]) == 12
    m = s["measured"]
    assert m["present_pairs"] > 1000
    assert abs(m["drop"] - 0.3) < 0.04 and abs(m["add"] - 0.1) < 0.03
    truth = _jsonl(tmp_path / "w" / "pretrain" / "truth.jsonl")
    # the small preset's scenes: 1-3 objects (mean 2 minus the few re-draws that fail)
    n_boxes = [len(t["boxes"]) for t in truth]
    assert 1.8 < np.mean(n_boxes) <= 2.05 and max(n_boxes) <= 3 and min(n_boxes) >= 1
    # sides >= 20% of the 128-px image, before occlusion trims the visible box
    sides = [max(b[2] - b[0], b[3] - b[1]) for t in truth for b in t["boxes"]]
    assert np.median(sides) > 0.27 * 128


def test_cli_refuses_existing_world_and_bad_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "w"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    assert main(["data", "synth", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err and str(out) in err
    assert main(["data", "synth", "--out", str(tmp_path / "x"), "--drop", "1.5"]) == 2
    assert "--drop 1.5" in capsys.readouterr().err
    assert main(["data", "synth", "--out", str(tmp_path / "x"), "--size", "8"]) == 2
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_cli_overwrite_with_size(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "w"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    (out / "queries").mkdir()  # an old world's query cache: boxes of other images, same names
    (out / "queries" / "queries-000000.npz").write_bytes(b"old")
    assert (
        main(["data", "synth", "--out", str(out), "--size", "64", "--seed", "3", "--overwrite"])
        == 0
    )
    assert "6 classes" in capsys.readouterr().out
    assert (
        out / "keep.txt"
    ).read_text() == "user file"  # --overwrite replaces only pretrain/ and det/ ...
    assert not (out / "queries").exists()  # ... and removes the old world's query cache
    coco = COCO(str(out / "det" / "val.json"))
    assert {(im["width"], im["height"]) for im in coco.imgs.values()} == {(64, 64)}
    assert json.loads((out / "pretrain" / "meta.json").read_text())["size"] == 64
