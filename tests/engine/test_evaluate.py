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
