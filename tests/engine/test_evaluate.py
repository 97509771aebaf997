"""Evaluation: our AP equals an independent pycocotools COCOeval; LVIS rules on hand-made cases."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from predet.engine.evaluate import LVIS_MAX_DETS, _lvis_filter, evaluate_predictions

KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def reference_coco_eval(ann_file: Path, pred_file: Path, iou_type: str) -> dict:
    """pycocotools straight from the files, as a user would run it."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        dets = json.loads(pred_file.read_text())
        if iou_type == "segm":
            for d in dets:
                d.pop("bbox", None)
        E = COCOeval(gt, gt.loadRes(dets), iou_type)
        E.evaluate()
        E.accumulate()
        E.summarize()
    return {k: (None if s < 0 else 100 * s) for k, s in zip(KEYS, E.stats[:6])}


def random_detections(gt: dict, rng: np.random.Generator, per_image: int = 12) -> list[dict]:
    """Jittered copies of ground truth (some right, some wrong class) plus random boxes, with masks."""
    by_image: dict[int, list] = {}
    for a in gt["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    cats = [c["id"] for c in gt["categories"]]
    dets = []
    for img in gt["images"]:
        w, h = img["width"], img["height"]
        for a in by_image.get(img["id"], []):
            x, y, bw, bh = a["bbox"]
            jit = rng.normal(0, 0.15, 4) * [bw, bh, bw, bh]
            box = [x + jit[0], y + jit[1], max(bw + jit[2], 1.0), max(bh + jit[3], 1.0)]
            cat = a["category_id"] if rng.random() < 0.7 else int(rng.choice(cats))
            dets.append({"image_id": img["id"], "category_id": cat, "bbox": box, "score": float(rng.random())})
        for _ in range(per_image):
            x, y = rng.uniform(0, w - 4), rng.uniform(0, h - 4)
            bw, bh = rng.uniform(2, w - x), rng.uniform(2, h - y)
            dets.append({"image_id": img["id"], "category_id": int(rng.choice(cats)),
                         "bbox": [x, y, bw, bh], "score": float(rng.random())})  # fmt: skip
    for d in dets:  # a mask that is the (clipped) box, so segm differs from bbox only by rounding
        img = next(i for i in gt["images"] if i["id"] == d["image_id"])
        m = np.zeros((img["height"], img["width"]), dtype=np.uint8, order="F")
        x, y, bw, bh = d["bbox"]
        m[max(int(y), 0) : int(y + bh) + 1, max(int(x), 0) : int(x + bw) + 1] = 1
        rle = mask_utils.encode(m)
        d["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    return dets


@pytest.mark.parametrize("seed", [0, 1])
def test_ap_equals_independent_cocoeval_on_random_detections(tiny_world: Path, tmp_path: Path, seed: int) -> None:
    ann = tiny_world / "det" / "val.json"
    gt = json.loads(ann.read_text())
    dets = random_detections(gt, np.random.default_rng(seed))
    pred_file = tmp_path / "predictions.json"
    pred_file.write_text(json.dumps(dets))
    ours = evaluate_predictions(gt, json.loads(pred_file.read_text()), ("bbox", "segm"))
    for iou_type in ("bbox", "segm"):
        ref = reference_coco_eval(ann, pred_file, iou_type)
        assert set(ours[iou_type]) == set(KEYS)
        for k in KEYS:
            if ref[k] is None:
                assert ours[iou_type][k] is None
            else:
                assert ours[iou_type][k] == pytest.approx(ref[k], abs=1e-4), (iou_type, k)
        assert 0 < ref["AP50"] < 100  # the random detections are neither useless nor perfect


def test_perfect_and_empty_detections(tiny_world: Path) -> None:
    gt = json.loads((tiny_world / "det" / "val.json").read_text())
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt["annotations"] if not a["iscrowd"]]  # fmt: skip
    res = evaluate_predictions(gt, perfect, ("bbox",))["bbox"]
    assert res["AP"] == pytest.approx(100.0) and res["AP50"] == pytest.approx(100.0)
    empty = evaluate_predictions(gt, [], ("bbox",))["bbox"]
    assert empty["AP"] == 0.0 and empty["AP50"] == 0.0


def _lvis_gt(*, not_exhaustive_b: bool, neg_c: bool) -> dict:
    """Images A, B with one box of category 1 each; image C has none. Category 2 is never annotated."""
    images = [
        {"id": 1, "width": 100, "height": 100, "file_name": "a.jpg", "neg_category_ids": [2],
         "not_exhaustive_category_ids": []},
        {"id": 2, "width": 100, "height": 100, "file_name": "b.jpg", "neg_category_ids": [],
         "not_exhaustive_category_ids": [1] if not_exhaustive_b else []},
        {"id": 3, "width": 100, "height": 100, "file_name": "c.jpg", "neg_category_ids": [1] if neg_c else [],
         "not_exhaustive_category_ids": []},
    ]  # fmt: skip
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600.0},
        {"id": 2, "image_id": 2, "category_id": 1, "bbox": [30, 30, 40, 40], "area": 1600.0},
    ]
    cats = [{"id": 1, "name": "one", "frequency": "f"}, {"id": 2, "name": "two", "frequency": "r"}]
    return {"images": images, "annotations": anns, "categories": cats}


LVIS_DETS = [
    {"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.5},  # TP
    {"image_id": 2, "category_id": 1, "bbox": [60, 60, 30, 30], "score": 0.9},  # unmatched on B
    {"image_id": 2, "category_id": 1, "bbox": [30, 30, 40, 40], "score": 0.3},  # TP
    {"image_id": 3, "category_id": 1, "bbox": [0, 0, 20, 20], "score": 0.95},  # on C (no box there)
    {"image_id": 2, "category_id": 2, "bbox": [0, 0, 20, 20], "score": 0.99},  # cat 2: not evaluable on B
]


@pytest.mark.parametrize(
    "not_exhaustive_b, neg_c, expected_ap",
    [
        # C's detection is dropped (category 1 neither annotated nor negative in C); B's unmatched
        # detection is ignored (not exhaustive) -> two TPs only
        (True, False, 100.0),
        # B's unmatched detection is a FP ranked first: precision 1/2 then 2/3 -> interpolated 2/3
        (False, False, 200 / 3),
        # C's detection is a FP (negative category) ranked first, B's is ignored -> 2/3 again
        (True, True, 200 / 3),
        # both FPs first: precision 1/3 then 1/2 -> 1/2 at every recall
        (False, True, 50.0),
    ],
)
def test_lvis_rules_golden(not_exhaustive_b: bool, neg_c: bool, expected_ap: float) -> None:
    gt = _lvis_gt(not_exhaustive_b=not_exhaustive_b, neg_c=neg_c)
    res = evaluate_predictions(gt, LVIS_DETS, ("bbox",))["bbox"]
    assert res["AP"] == pytest.approx(expected_ap, abs=1e-4)
    assert res["APf"] == pytest.approx(expected_ap, abs=1e-4)
    assert res["APr"] is None  # category 2 has no ground truth anywhere: undefined, not 0


def test_lvis_keeps_top_300_per_image() -> None:
    gt = _lvis_gt(not_exhaustive_b=False, neg_c=True)
    rng = np.random.default_rng(0)
    dets = [{"image_id": 3, "category_id": 1, "bbox": [0, 0, 10, 10], "score": float(s)} for s in rng.random(350)]
    kept = _lvis_filter(gt, dets)
    assert len(kept) == LVIS_MAX_DETS
    assert min(d["score"] for d in kept) == pytest.approx(np.sort([d["score"] for d in dets])[-LVIS_MAX_DETS])


# --------------------------------------------------------------------------------------------
# Zero-area detections and ground truth under the LVIS rules, against the official lvis API
# --------------------------------------------------------------------------------------------
LVIS_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


def _rect_rle(box: list[float], size: int = 64) -> dict:
    """Compressed RLE of the box's pixels (empty for a box of zero width or height)."""
    m = np.zeros((size, size), dtype=np.uint8, order="F")
    x, y, w, h = (int(round(v)) for v in box)
    if w > 0 and h > 0:
        m[y : y + h, x : x + w] = 1
    rle = mask_utils.encode(m)
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _zero_area_case() -> tuple[dict, list[dict]]:
    """Four 64x64 images, categories 1 (f), 2 (c), 3 (r); zero-area boxes in both gt and dets.

    Image 3's only box of category 1 has zero area, so for the lvis API category 1 is not annotated
    there and the detection of it on image 3 is dropped (neither positive nor negative).
    """
    def img(i: int, neg: list[int], nel: list[int]) -> dict:
        return {"id": i, "width": 64, "height": 64, "file_name": f"{i}.jpg", "neg_category_ids": neg,
                "not_exhaustive_category_ids": nel}  # fmt: skip

    images = [img(1, [3], []), img(2, [], [1]), img(3, [], []), img(4, [2], [])]
    gt_boxes = [  # image, category, box
        (1, 1, [4, 4, 20, 20]), (1, 1, [40, 40, 0, 8]), (2, 2, [10, 10, 30, 20]), (2, 2, [40, 40, 16, 16]),
        (3, 1, [5, 5, 12, 0]), (4, 3, [8, 8, 40, 40]), (4, 1, [30, 30, 20, 20]),
    ]  # fmt: skip
    anns = []
    for k, (i, c, (x, y, w, h)) in enumerate(gt_boxes, start=1):
        poly = [[x, y, x, y + h, x + w, y + h, x + w, y]]
        anns.append({"id": k, "image_id": i, "category_id": c, "bbox": [x, y, w, h], "area": float(w * h),
                     "segmentation": poly})  # fmt: skip
    cats = [{"id": 1, "name": "one", "frequency": "f"}, {"id": 2, "name": "two", "frequency": "c"},
            {"id": 3, "name": "three", "frequency": "r"}]  # fmt: skip
    det_boxes = [  # image, category, box, score, empty mask despite a box
        (1, 1, [5, 5, 20, 20], 0.6, False), (1, 1, [40, 40, 0, 8], 0.9, False), (1, 3, [30, 30, 10, 10], 0.5, False),
        (1, 3, [10, 10, 10, 0], 0.95, False), (2, 2, [10, 10, 30, 20], 0.8, False), (2, 2, [42, 40, 14, 16], 0.4, False),
        (2, 2, [0, 0, 0, 0], 0.99, False), (2, 1, [0, 0, 16, 16], 0.7, False), (3, 1, [5, 5, 12, 6], 0.85, False),
        (4, 3, [10, 10, 38, 38], 0.7, False), (4, 3, [40, 40, 10, 10], 0.75, True), (4, 1, [28, 30, 20, 22], 0.3, False),
        (4, 1, [50, 50, 0, 10], 0.88, False), (4, 1, [2, 2, 12, 12], 0.2, False),
    ]  # fmt: skip
    dets = [{"image_id": i, "category_id": c, "bbox": box, "score": s,
             "segmentation": _rect_rle([0, 0, 0, 0] if empty else box)}
            for i, c, box, s, empty in det_boxes]  # fmt: skip
    return {"images": images, "annotations": anns, "categories": cats}, dets


# The official lvis API (lvis 0.5.3: LVISEval(LVIS(gt file), LVISResults(gt, dets), iou_type).run(),
# segm detections without their `bbox`, as detectron2 passes them), in 0-100; None where it is -1.
# Before zero-area detections/gt were dropped, predet scored them as FPs: AP 33.72, APf 12.76 (both types).
LVIS_ZERO_AREA_GOLDEN = {
    "bbox": {"AP": 66.7161716171617, "AP50": 83.33333333333334, "AP75": 83.33333333333334, "APs": 77.57425742574257,
             "APm": 89.99999999999999, "APl": None, "APr": 45.0, "APc": 90.0990099009901, "APf": 65.04950495049505},
    # image 4's category-3 detection with an empty mask (and a box) is dropped here, scored as a FP in bbox
    "segm": {"AP": 81.71617161716172, "AP50": 100.0, "AP75": 100.0, "APs": 77.57425742574257,
             "APm": 89.99999999999999, "APl": None, "APr": 89.99999999999999, "APc": 90.0990099009901,
             "APf": 65.04950495049505},
}  # fmt: skip


def _official_lvis(gt: dict, dets: list[dict], iou_type: str, tmp_path: Path) -> dict:
    """The lvis API's 9 APs (0-100). lvis 0.5.3 still uses ``np.float`` (removed in numpy 1.24), which
    the caller sets to ``float`` (what it aliased) for the call."""
    from lvis import LVIS, LVISEval, LVISResults

    ann_file = tmp_path / "lvis_gt.json"
    ann_file.write_text(json.dumps(gt))
    dets = [dict(d) for d in dets]
    if iou_type == "segm":
        for d in dets:
            d.pop("bbox")
    lvis_gt = LVIS(str(ann_file))
    E = LVISEval(lvis_gt, LVISResults(lvis_gt, dets), iou_type)
    E.run()
    return {k: (None if v < 0 else 100 * float(v)) for k, v in E.get_results().items() if k in LVIS_KEYS}


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_lvis_zero_area_matches_official_api(iou_type: str, tmp_path: Path, monkeypatch) -> None:
    gt, dets = _zero_area_case()
    ours = evaluate_predictions(gt, dets, (iou_type,))[iou_type]
    golden = LVIS_ZERO_AREA_GOLDEN[iou_type]
    assert set(ours) == set(LVIS_KEYS) == set(golden)
    for k in LVIS_KEYS:
        assert (ours[k] is None) == (golden[k] is None), k
        if golden[k] is not None:
            assert ours[k] == pytest.approx(golden[k], abs=1e-9), (iou_type, k)
    try:
        import lvis  # noqa: F401
    except ImportError:
        return
    monkeypatch.setattr(np, "float", float, raising=False)
    official = _official_lvis(gt, dets, iou_type, tmp_path)
    for k in LVIS_KEYS:
        assert official[k] == pytest.approx(golden[k], abs=1e-9) if golden[k] is not None else official[k] is None, k


def test_lvis_zero_area_items_count_for_nothing() -> None:
    """Dropping every zero-area detection and gt box up front gives the same numbers."""
    gt, dets = _zero_area_case()
    positive_gt = {**gt, "annotations": [a for a in gt["annotations"] if a["area"] > 0]}
    for iou_type in ("bbox", "segm"):
        nonzero = [d for d in dets
                   if (d["bbox"][2] * d["bbox"][3] if iou_type == "bbox" else mask_utils.area(d["segmentation"])) > 0]
        assert len(nonzero) < len(dets)
        assert evaluate_predictions(gt, dets, (iou_type,)) == evaluate_predictions(positive_gt, nonzero, (iou_type,))


@pytest.mark.parametrize("crowd_segm", ["absent", [], "box polygon"])
def test_segm_ap_with_a_crowd_region_without_mask(crowd_segm) -> None:
    """A crowd annotation without a mask is scored in segm as its box (an ignore region): the
    prediction inside it is ignored, not a false positive, and nothing crashes."""
    def poly(x, y, w, h):
        return [[x, y, x + w, y, x + w, y + h, x, y + h]]

    def rle(x, y, w, h):
        r = mask_utils.merge(mask_utils.frPyObjects(poly(x, y, w, h), 50, 50))
        return {**r, "counts": r["counts"].decode()}

    crowd = {"id": 2, "image_id": 1, "category_id": 1, "bbox": [30, 30, 15, 15], "area": 225, "iscrowd": 1}
    if crowd_segm != "absent":
        crowd["segmentation"] = poly(30, 30, 15, 15) if crowd_segm == "box polygon" else crowd_segm
    gt = {"images": [{"id": 1, "width": 50, "height": 50, "file_name": "1.jpg"}], "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20], "area": 400,
                           "iscrowd": 0, "segmentation": poly(5, 5, 20, 20)}, crowd]}  # fmt: skip
    preds = [{"image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20], "score": 0.6, "segmentation": rle(5, 5, 20, 20)},
             {"image_id": 1, "category_id": 1, "bbox": [32, 32, 10, 10], "score": 0.9, "segmentation": rle(32, 32, 10, 10)}]  # fmt: skip
    res = evaluate_predictions(gt, preds, ("bbox", "segm"))
    assert res["segm"]["AP"] == pytest.approx(100.0) and res["bbox"]["AP"] == pytest.approx(100.0)
    assert "segmentation" not in crowd or crowd["segmentation"] in ([], poly(30, 30, 15, 15))  # gt not modified
