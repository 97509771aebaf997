"""Query boxes: EdgeBoxes finds flat objects, filters hold, the cache round-trips, caching is
rank-split and resumable, unreadable images are named in failed.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from predet.cli import main
from predet.data.images import load_image
from predet.data.manifest import read_manifest
from predet.data.queries import (
    QueryCache,
    QueryParams,
    cache_queries,
    compute_queries,
    gradient_edges,
    query_recall,
    write_query_file,
)
from predet.errors import UserError

RECTS = torch.tensor([[15, 10, 70, 60], [90, 50, 150, 110], [20, 70, 60, 100]], dtype=torch.float32)


def _scene(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(110, 130, (120, 160, 3), dtype=np.uint8)
    for (x1, y1, x2, y2), c in zip(RECTS.int().tolist(), [(220, 30, 30), (30, 30, 220), (30, 200, 40)]):
        img[y1:y2, x1:x2] = c
    return img


def test_edges_are_thin_and_oriented() -> None:
    img = np.zeros((64, 64, 3), np.uint8)
    img[:, 32:] = 255  # one vertical step edge at x = 32
    edges, orient = gradient_edges(img)
    strong = edges > 0.1
    assert strong[10:54].sum(axis=1).max() <= 2  # NMS: at most 2 px wide across the edge
    assert strong[10:54, 30:34].any(axis=1).all()  # and present on every row
    o = orient[10:54, 31:33][strong[10:54, 31:33]]
    assert np.all(np.minimum(o, np.pi - o) < 0.2)  # edge normal along x (angle 0 mod pi)


def test_edgeboxes_find_flat_objects_and_filters_hold() -> None:
    params = QueryParams(max_boxes=50)
    boxes, scores = compute_queries(_scene(), params)
    assert boxes.dtype == np.float32 and scores.dtype == np.float32
    assert 3 <= len(boxes) <= 50
    assert np.all(np.diff(scores) <= 0)  # best first
    b = torch.from_numpy(boxes)
    best = box_iou(RECTS, b).max(dim=1).values
    assert (best >= 0.7).all(), best  # each rectangle has a tight query
    iou = box_iou(b, b) - torch.eye(len(b))
    assert iou.max() <= 0.5 + 1e-5  # NMS 0.5
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    assert (w >= 0.02 * 160).all() and (h >= 0.02 * 160).all()
    assert (torch.maximum(w / h, h / w) <= 4.0 + 1e-4).all()
    assert (b[:, 0] >= 0).all() and (b[:, 2] <= 160).all() and (b[:, 3] <= 120).all()


def test_queries_of_an_image_do_not_depend_on_the_images_before() -> None:
    """OpenCV's EdgeBoxes object keeps state between calls; each image gets a fresh one, so an
    image's queries are the same whichever images a worker processed before (and on a rerun)."""
    textured = [np.random.default_rng(s).integers(0, 256, (96, 128, 3), dtype=np.uint8) for s in (1, 2)]
    first = compute_queries(_scene(3))
    for other in textured:
        compute_queries(other)
    again = compute_queries(_scene(3))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    busy = [compute_queries(textured[0])[0] for _ in range(3)]  # many boxes: the state showed here
    assert all(np.array_equal(busy[0], b) for b in busy[1:])


def test_boxes_are_in_original_pixels_whatever_the_computation_scale() -> None:
    img = _scene()
    big = np.asarray(Image.fromarray(img).resize((640, 480), Image.NEAREST))  # 4x, computed at 500
    boxes, _ = compute_queries(big, QueryParams(max_boxes=50))
    best = box_iou(RECTS * 4, torch.from_numpy(boxes)).max(dim=1).values
    assert (best >= 0.7).all(), best


def test_selective_search_method() -> None:
    boxes, scores = compute_queries(_scene(), QueryParams(method="selective_search", max_boxes=30))
    assert 1 <= len(boxes) <= 30 and np.all(np.diff(scores) <= 0)
    assert (box_iou(RECTS, torch.from_numpy(boxes)).max(dim=1).values >= 0.5).all()


def test_cache_file_round_trip(tmp_path: Path) -> None:
    b1 = np.array([[0, 0, 10, 10], [1, 2, 3, 4]], np.float32)
    write_query_file(
        tmp_path / "queries-000000.npz",
        images=["a.jpg", "b.jpg"],
        paths=[str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")],
        boxes=[b1, np.zeros((0, 4), np.float32)],
        scores=[np.array([0.9, 0.5], np.float32), np.zeros(0, np.float32)],
        failed=[("c.jpg", "file not found")],
    )
    with np.load(tmp_path / "queries-000000.npz") as z:
        assert z["offsets"].tolist() == [0, 2, 2] and z["boxes"].shape == (2, 4)
        assert z["offsets"].dtype == np.int64 and z["scores"].dtype == np.float32
    cache = QueryCache(tmp_path)
    boxes, scores = cache.get("a.jpg")
    assert np.array_equal(boxes, b1) and scores.tolist() == pytest.approx([0.9, 0.5])
    assert cache.get("b.jpg")[0].shape == (0, 4)
    assert np.array_equal(cache.get("other/string.jpg", tmp_path / "a.jpg")[0], b1)  # by resolved path
    assert cache.get("zzz.jpg") is None
    assert cache.failed == {"c.jpg": "file not found"}


def test_cache_missing_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="predet data queries"):
        QueryCache(tmp_path / "none")
    with pytest.raises(UserError, match="no queries"):
        QueryCache(tmp_path)


def _manifest(tmp_path: Path, n: int) -> Path:
    (tmp_path / "im").mkdir()
    lines = []
    for k in range(n):
        Image.fromarray(_scene(k)).save(tmp_path / "im" / f"{k}.png")
        lines.append(json.dumps({"image": f"im/{k}.png", "tags": ["#a"]}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "m.jsonl"


def test_cache_is_rank_split_and_resumable(tmp_path: Path) -> None:
    entries = read_manifest(_manifest(tmp_path, 5)).entries
    out = tmp_path / "q"
    p = QueryParams(max_boxes=10)
    c0 = cache_queries(entries, out, p, shard_size=2, rank=0, world_size=2, progress=False)
    assert sorted(f.name for f in out.glob("*.npz")) == ["queries-000000.npz", "queries-000002.npz"]
    assert c0["images"] == 3
    c1 = cache_queries(entries, out, p, shard_size=2, rank=1, world_size=2, progress=False)
    assert c1["images"] == 2 and len(list(out.glob("*.npz"))) == 3
    first = QueryCache(out).get("im/0.png")[0].copy()
    (out / "queries-000001.npz").unlink()
    again = cache_queries(entries, out, p, shard_size=2, progress=False)
    assert again["shards_skipped"] == 2 and again["images"] == 2  # only the lost shard recomputed
    cache = QueryCache(out)
    assert np.array_equal(cache.get("im/0.png")[0], first)
    assert all(cache.get(e.image) is not None for e in entries)


def test_queries_cli_names_bad_images_and_processes_good_ones(odd_images: Path, odd_names, tmp_path: Path, capsys) -> None:
    good, bad = odd_names
    out = tmp_path / "q"
    rc = main(["data", "queries", "--manifest", str(odd_images / "manifest.jsonl"), "--out", str(out), "--workers", "2", "--max-boxes", "20"])
    assert rc == 0
    failed = {json.loads(x)["image"]: json.loads(x)["reason"] for x in (out / "failed.jsonl").read_text().splitlines()}
    assert {Path(k).name for k in failed} == set(bad)
    for name, reason in bad.items():
        assert reason in failed[f"images/{name}"]
    cache = QueryCache(out)
    params = QueryParams(max_boxes=20)  # --max-boxes 20, the other settings the CLI's defaults
    for name in good:
        boxes, scores = cache.get(f"images/{name}")
        assert 3 <= len(boxes) <= 20, name
        # exactly the boxes the library computes for the decoded image, in original pixels
        want, want_scores = compute_queries(np.asarray(load_image(odd_images / "images" / name)[0]), params)
        np.testing.assert_allclose(boxes, want, atol=1e-4)
        np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    assert f"{len(good)} images" in capsys.readouterr().out


def test_query_recall_against_truth(tmp_path: Path) -> None:
    m = _manifest(tmp_path, 3)
    entries = read_manifest(m).entries
    cache_queries(entries, tmp_path / "q", QueryParams(max_boxes=100), progress=False)
    truth = tmp_path / "truth.jsonl"
    truth.write_text("".join(json.dumps({"image": e.image, "boxes": RECTS.tolist()}) + "\n" for e in entries))
    recall, n = query_recall(QueryCache(tmp_path / "q"), truth)
    assert n == 9 and recall == 1.0


@pytest.mark.slow
def test_recall_on_tiny_world(tiny_world: Path, tmp_path: Path) -> None:
    """EdgeBoxes on gradient edges recall the synthetic world's objects (measured 0.817 of
    279 true boxes on the tiny world's first 60 images at IoU 0.5, top 100; the `small` world's figure is in bench/)."""
    manifest = read_manifest(tiny_world / "pretrain/manifest.jsonl")
    cache_queries(manifest.entries[:60], tmp_path / "q", workers=1, progress=False)
    truth = tmp_path / "truth.jsonl"
    lines = (tiny_world / "pretrain/truth.jsonl").read_text().splitlines()[:60]
    truth.write_text("\n".join(lines) + "\n")
    recall, n = query_recall(QueryCache(tmp_path / "q"), truth)
    assert n > 150 and recall >= 0.6, recall


def test_one_opencv_with_contrib_modules() -> None:
    """The environment ends with the contrib build's cv2 (ximgproc), not shadowed by a plain one."""
    from importlib import metadata

    import cv2

    from predet.data.queries import _PLAIN_OPENCV, check_opencv

    check_opencv()
    assert hasattr(cv2.ximgproc, "createEdgeBoxes") and hasattr(cv2.ximgproc, "segmentation")
    for name in _PLAIN_OPENCV:
        with pytest.raises(metadata.PackageNotFoundError):
            metadata.version(name)


def test_queries_cli_splits_by_torchrun_env(tmp_path: Path, monkeypatch, capsys) -> None:
    m = _manifest(tmp_path, 5)
    out = tmp_path / "q"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["data", "queries", "--manifest", str(m), "--out", str(out), "--workers", "1", "--shard-size", "2"]) == 0
    assert [f.name for f in out.glob("*.npz")] == ["queries-000001.npz"]  # shards 1 (of 0, 1, 2)
    assert "rank 1/2: 2 images" in capsys.readouterr().out


def test_queries_cli_bad_flags_are_one_line_errors(tmp_path: Path, capsys) -> None:
    m = _manifest(tmp_path, 1)
    rc = main(["data", "queries", "--manifest", str(m), "--out", str(tmp_path / "q"), "--edge-model", "nope.yml.gz"])
    err = capsys.readouterr().err
    assert rc == 2 and "--edge-model file not found: nope.yml.gz" in err and len(err.strip().splitlines()) == 1


def test_large_jpeg_is_drafted_and_boxes_are_in_full_pixels(tmp_path: Path) -> None:
    from predet.data.queries import _process_one

    big = np.asarray(Image.fromarray(_scene()).resize((1280, 960), Image.NEAREST))  # 8x, drafted to 1/2
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=95)
    _, boxes, _, reason = _process_one(("big.jpg", str(tmp_path / "big.jpg"), QueryParams(max_boxes=50)))
    assert reason == ""
    best = box_iou(RECTS * 8, torch.from_numpy(boxes)).max(dim=1).values
    assert (best >= 0.7).all(), best
    assert boxes[:, 2].max() <= 1280 and boxes[:, 3].max() <= 960


def test_orientation_where_the_curvature_divides_by_zero(monkeypatch) -> None:
    """oxx = -1e-5 in float32 divides by zero: +-inf -> pi/2 (OpenCV's arithmetic), 0/0 -> 0;
    no RuntimeWarning reaches the user."""
    import warnings

    from predet.data import queries

    oxx = np.array([[-1e-5, -1e-5, 0.5]], np.float32)
    oxy = np.array([[-1.0, 0.0, -1.0]], np.float32)
    oyy = np.array([[2.0, 0.0, 0.5]], np.float32)
    outputs = iter([oxx, oxx, oxx, oxy, oyy])  # ox, oy (unused), oxx, oxy, oyy in call order
    monkeypatch.setattr(queries.cv2, "Sobel", lambda *a, **k: next(outputs))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        o = queries._orientation(np.zeros((1, 3), np.float32))
    assert o[0].tolist() == pytest.approx([np.pi / 2, 0.0, np.pi / 4], abs=1e-3)
