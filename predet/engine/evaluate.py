"""COCO-style evaluation of a fine-tuned detector: ``predet evaluate --run RUN [--data ANN --images DIR]``.

Writes ``RUN/predictions.json`` (COCO results format: ``image_id``, ``category_id``, ``bbox`` XYWH,
``score``, and for Mask R-CNN ``segmentation`` as compressed RLE) and ``RUN/results.json``::

    {"bbox": {"AP": .., "AP50": .., "AP75": .., "APs": .., "APm": .., "APl": ..}, "segm": {...}}

AP in 0-100, ``null`` where COCO's AP is undefined (-1, e.g. no small objects in the set).
Beside them ``RUN/scored.json`` says what was scored (``{"ann", "format", "images", "arch"}``: the
annotation file, absolute, its format, the number of images scored and the detector), so that
``predet compare`` never averages scores of different sets.

Metrics are pycocotools' ``COCOeval`` (bbox; segm with a Mask R-CNN). A segm evaluation drops the
detections' ``bbox`` so that their area comes from the mask (as detectron2 does). LVIS-style JSON is
scored with the LVIS rules on top of COCOeval (:class:`LVISStyleEval`): at most 300 detections per
image, detections of a category neither annotated in the image nor in its ``neg_category_ids`` are
dropped, unmatched detections of an image's ``not_exhaustive_category_ids`` are ignored, detections
and ground truth of zero area (a box of width or height 0, an empty mask) are dropped as the official
``lvis`` API does (``LVIS.get_ann_ids`` keeps ``0 < area``), and AP is also reported per frequency
group (``APr``, ``APc``, ``APf``). VOC XML is converted to COCO in memory.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DataLoader

from predet import distributed
from predet.config import FinetuneConfig, load_config
from predet.data.detection import (
    DetectionDataset,
    collate_detection,
    has_segmentation,
    infer_format,
    is_lvis,
    load_gt,
    missing_segmentation,
)
from predet.engine.common import check_state_fits
from predet.errors import UserError
from predet.modeling.detectors import build_detector
from predet.utils import absolute_path, load_checkpoint, write_json

__all__ = [
    "LVISStyleEval",
    "drop_images",
    "evaluate_predictions",
    "evaluate_run",
    "predict",
    "subset_images",
]

log = logging.getLogger("predet.evaluate")
_AREAS = {"all": 0, "small": 1, "medium": 2, "large": 3}
LVIS_MAX_DETS = 300


class LVISStyleEval(COCOeval):
    """COCOeval with LVIS's rule for not-exhaustively annotated categories.

    Unmatched detections of a category listed in the image's ``not_exhaustive_category_ids`` are
    ignored (not false positives). The other LVIS rules act on the detections before they get here
    (:func:`_lvis_filter`); ``params.maxDets`` is ``[300]``.
    """

    def __init__(self, coco_gt: COCO, coco_dt: COCO, iou_type: str) -> None:
        super().__init__(coco_gt, coco_dt, iou_type)
        self.params.maxDets = [LVIS_MAX_DETS]
        self.not_exhaustive = {
            img["id"]: set(img.get("not_exhaustive_category_ids", [])) for img in coco_gt.dataset["images"]
        }

    def evaluateImg(self, imgId: int, catId: int, aRng: list, maxDet: int) -> Optional[dict]:  # noqa: N803
        r = super().evaluateImg(imgId, catId, aRng, maxDet)
        if r is not None and catId in self.not_exhaustive.get(imgId, ()):
            r["dtIgnore"] = np.logical_or(r["dtIgnore"], r["dtMatches"] == 0)  # [T, D]
        return r


def _positive_area(gt: dict) -> dict:
    """``gt`` without its annotations of zero area, which the lvis API never sees (``0 < area``)."""
    return {**gt, "annotations": [a for a in gt["annotations"] if a.get("area", 1.0) > 0]}


def _drop_zero_area(coco_dt: COCO) -> COCO:
    """``coco_dt`` (from ``loadRes``: area = w*h for boxes, the mask's pixels for segm) without the
    detections of zero area, as ``LVISEval`` drops them (after the 300-per-image cut)."""
    anns = coco_dt.dataset["annotations"]
    if all(a["area"] > 0 for a in anns):
        return coco_dt
    coco_dt.dataset["annotations"] = [a for a in anns if a["area"] > 0]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt.createIndex()
    return coco_dt


def _lvis_filter(gt: dict, dets: list[dict]) -> list[dict]:
    """The top 300 detections per image, of categories annotated in it or in its negative list.

    ``gt`` is the evaluated ground truth (zero-area annotations already dropped: a category whose
    only box in an image has zero area is not annotated there for the lvis API either).
    """
    positive = defaultdict(set)
    for a in gt["annotations"]:
        positive[a["image_id"]].add(a["category_id"])
    evaluable = {img["id"]: positive[img["id"]] | set(img.get("neg_category_ids", [])) for img in gt["images"]}
    per_image = defaultdict(list)
    for d in dets:
        per_image[d["image_id"]].append(d)
    out = []
    for img_id, ds in per_image.items():
        ds = sorted(ds, key=lambda d: -d["score"])[:LVIS_MAX_DETS]
        out.extend(d for d in ds if d["category_id"] in evaluable.get(img_id, ()))
    return out


def _summarize(
    E: COCOeval, *, iou: Optional[float] = None, area: str = "all", cats: Optional[np.ndarray] = None
) -> float:
    """Mean precision over IoUs/recalls/categories as pycocotools' ``summarize`` (-1: undefined)."""
    s = E.eval["precision"]  # [T, R, K, A, M]
    if iou is not None:
        s = s[np.isclose(E.params.iouThrs, iou)]
    if cats is not None:
        s = s[:, :, cats]
    s = s[:, :, :, _AREAS[area], -1]  # the largest maxDets (100 for COCO, 300 for LVIS)
    valid = s[s > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def _coco_from_dict(gt: dict) -> COCO:
    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    for ann in coco.dataset["annotations"]:
        ann.setdefault("iscrowd", 0)  # LVIS has no crowd boxes; COCOeval needs the key
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _to_percent(x: float) -> Optional[float]:
    return None if x < 0 else 100.0 * x


def evaluate_predictions(gt: dict, predictions: Sequence[dict], iou_types: Sequence[str] = ("bbox",)) -> dict:
    """AP, AP50, AP75, APs, APm, APl (0-100; ``None`` if undefined) per IoU type.

    ``gt`` is a COCO-format dict (LVIS-style when :func:`~predet.data.detection.is_lvis`; then
    ``APr``, ``APc``, ``APf`` too). ``predictions`` are COCO results; with no prediction every AP
    is 0 (or ``None`` where the ground truth makes it undefined).
    """
    lvis = is_lvis(gt)
    if lvis:
        gt = _positive_area(gt)
    if "segm" in iou_types:
        gt = _crowd_boxes_as_masks(gt)
    coco_gt = _coco_from_dict(gt)
    results = {}
    for iou_type in iou_types:
        dets = [copy.deepcopy(d) for d in predictions]
        if iou_type == "segm":
            for d in dets:
                d.pop("bbox", None)  # areas from the masks
        if lvis:
            dets = _lvis_filter(gt, dets)
        with contextlib.redirect_stdout(io.StringIO()):
            if dets:
                coco_dt = coco_gt.loadRes(dets)
                if lvis:
                    coco_dt = _drop_zero_area(coco_dt)
            else:  # loadRes cannot take an empty list
                coco_dt = _coco_from_dict({"images": gt["images"], "categories": gt["categories"], "annotations": []})
            E = (LVISStyleEval if lvis else COCOeval)(coco_gt, coco_dt, iou_type)
            E.evaluate()
            E.accumulate()
        res = {
            "AP": _summarize(E), "AP50": _summarize(E, iou=0.5), "AP75": _summarize(E, iou=0.75),
            "APs": _summarize(E, area="small"), "APm": _summarize(E, area="medium"),
            "APl": _summarize(E, area="large"),
        }  # fmt: skip
        if lvis:
            freq = np.array([coco_gt.cats[c].get("frequency", "") for c in E.params.catIds])
            for group in ("r", "c", "f"):
                res[f"AP{group}"] = _summarize(E, cats=np.flatnonzero(freq == group))
        results[iou_type] = {k: _to_percent(v) for k, v in res.items()}
    return results


def _crowd_boxes_as_masks(gt: dict) -> dict:
    """``gt`` with each crowd annotation that has no mask given its box as one (a crowd region is
    an ignore region: models train without its mask, but COCOeval's segm pass reads one for every
    ground truth and failed on ``"segmentation": []`` or none)."""
    if all(has_segmentation(a) or not a.get("iscrowd", 0) for a in gt["annotations"]):
        return gt
    anns = []
    for a in gt["annotations"]:
        if a.get("iscrowd", 0) and not has_segmentation(a):
            x, y, w, h = a["bbox"]
            a = {**a, "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]}
        anns.append(a)
    return {**gt, "annotations": anns}


@torch.inference_mode()
def predict(
    model: torch.nn.Module,
    dataset: DetectionDataset,
    *,
    category_of_label: dict[int, int],
    device: torch.device,
    batch_size: int = 2,
    num_workers: int = 0,
    amp: bool = False,
    progress: bool = True,
    unreadable: Optional[list[int]] = None,
) -> list[dict]:
    """COCO results of ``model`` on ``dataset`` (labels mapped to category ids; others dropped).

    Images the dataset cannot read are left out; their ids are appended to ``unreadable``."""
    from tqdm import tqdm

    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_detection)
    out: list[dict] = []
    use_amp = amp and device.type == "cuda"
    for images, targets in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
        bad = [t["image_id"] for t in targets if "unreadable" in t]
        if bad:
            if unreadable is not None:
                unreadable.extend(bad)
            images = [im for im, t in zip(images, targets) if "unreadable" not in t]
            targets = [t for t in targets if "unreadable" not in t]
            if not images:
                continue
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            outputs = model([im.to(device) for im in images])
        for target, o in zip(targets, outputs):
            boxes = o["boxes"].float().cpu()
            boxes[:, 2:] -= boxes[:, :2]  # XYXY -> XYWH
            rles = None
            if "masks" in o:
                binary = (o["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)  # [D, 1, H, W] -> [D, H, W]
                rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))  # needs [H, W, D]
            for j, (box, score, label) in enumerate(zip(boxes.tolist(), o["scores"].tolist(), o["labels"].tolist())):
                if label not in category_of_label:
                    continue
                det = {"image_id": target["image_id"], "category_id": category_of_label[label],
                       "bbox": [round(v, 3) for v in box], "score": round(score, 5)}  # fmt: skip
                if rles is not None:
                    det["segmentation"] = {"size": rles[j]["size"], "counts": rles[j]["counts"].decode("ascii")}
                out.append(det)
    return out


def evaluate_run(
    run: str | Path,
    ann: Optional[str | Path] = None,
    images: Optional[str | Path] = None,
    *,
    ckpt: Optional[str | Path] = None,
    progress: bool = True,
) -> dict:
    """Evaluate ``run``'s checkpoint on its val split (or ``ann``/``images``); write the JSON files.

    Returns the results dict written to ``RUN/results.json``.
    """
    run = Path(run)
    cfg: FinetuneConfig = load_config(FinetuneConfig, run / "config.yaml")
    state = load_checkpoint(Path(ckpt) if ckpt else run / "checkpoints" / "last.pt")
    if "model" not in state or "classes" not in state:
        raise UserError(f"{ckpt or run / 'checkpoints' / 'last.pt'}: not a fine-tuning checkpoint")
    val_subset = None
    if ann is None:
        ann, images, fmt = cfg.data.val.ann, images or cfg.data.val.images, cfg.data.format
        val_subset = cfg.data.val_subset
        if not ann:
            raise UserError(f"{run}/config.yaml: data.val.ann is empty; pass --data ANN --images DIR")
    else:
        fmt = infer_format(ann)
        if images is None:
            raise UserError("--data given without --images")
    classes = list(state["classes"])
    gt = subset_images(load_gt(fmt, ann, classes=cfg.data.classes), val_subset)
    dataset = DetectionDataset(gt, images, train=False)
    cat_of_name = {c["name"]: c["id"] for c in gt["categories"]}
    category_of_label = {i: cat_of_name[n] for i, n in enumerate(classes, start=1) if n in cat_of_name}
    if not category_of_label:
        raise UserError(f"{ann}: none of the model's classes {classes[:5]}... are categories of this data")

    device = _device_of(cfg)
    model = build_detector(cfg, classes, for_test=True)
    check_state_fits(model, state["model"], ckpt or run / "checkpoints" / "last.pt",
                     hint=f"not a checkpoint of {run}/config.yaml's model.arch={cfg.model.arch} "
                     "(a pre-training checkpoint? export it and fine-tune first)")  # fmt: skip
    model.load_state_dict(state["model"])
    model.to(device)
    unreadable: list[int] = []
    preds = predict(model, dataset, category_of_label=category_of_label, device=device,
                    batch_size=cfg.data.eval_batch_size, amp=cfg.train.amp, progress=progress,
                    unreadable=unreadable)  # fmt: skip
    if unreadable and len(set(unreadable)) == len(dataset):
        raise UserError(
            f"{images}: none of the {len(dataset)} images of {ann} can be read (e.g. "
            f"{next(iter(dataset.unreadable), '?')}); check the images folder against the file_name"
        )
    if unreadable:  # scored on the images that were read: a file's damage is not the model's miss
        print(f"evaluate: {len(unreadable)} of {len(gt['images'])} images unreadable, left out of "
              f"the AP (ids {sorted(unreadable)[:10]}{' ...' if len(unreadable) > 10 else ''})",
              flush=True)  # fmt: skip
        gt = drop_images(gt, unreadable)
    iou_types = ("bbox", "segm") if cfg.model.arch == "mask_rcnn" else ("bbox",)
    if "segm" in iou_types and (missing := missing_segmentation(gt)):
        print(f"evaluate: {missing} annotations of {ann} have no segmentation: box AP only", flush=True)
        iou_types = ("bbox",)
    results = evaluate_predictions(gt, preds, iou_types)
    scored = {"ann": absolute_path(str(ann)), "format": fmt, "images": len(gt["images"]), "arch": cfg.model.arch}
    write_json(run / "predictions.json", preds, indent=None)
    write_json(run / "scored.json", scored)  # before results.json: a results.json is never beside an older record
    write_json(run / "results.json", results)
    return results


def drop_images(gt: dict, image_ids: Sequence[int]) -> dict:
    """``gt`` without the images ``image_ids`` and their annotations."""
    gone = set(image_ids)
    return {
        **gt,
        "images": [im for im in gt["images"] if im["id"] not in gone],
        "annotations": [a for a in gt["annotations"] if a["image_id"] not in gone],
    }


def subset_images(gt: dict, count: Optional[int], *, seed: int = 0) -> dict:
    """``gt`` restricted to ``count`` of its images (and their annotations), drawn with ``seed``
    alone (``data.val_subset``: every run is scored on the same images); ``None`` or a count of
    at least the number of images: ``gt`` itself."""
    if count is None:
        return gt
    if count < 1:
        raise UserError(f"data.val_subset={count}: must be >= 1 (or null for every val image)")
    ids = sorted(img["id"] for img in gt["images"])
    if count >= len(ids):
        return gt
    keep = {ids[i] for i in np.random.default_rng(seed).permutation(len(ids))[:count]}
    return {**gt, "images": [img for img in gt["images"] if img["id"] in keep],
            "annotations": [a for a in gt["annotations"] if a["image_id"] in keep]}  # fmt: skip


def _device_of(cfg: FinetuneConfig) -> torch.device:
    """The config's device, on the GPU :func:`predet.distributed.local_gpu` picks (a run trained
    on cuda:1 is evaluated on a one-GPU machine on the current GPU)."""
    name = cfg.train.device
    use_cuda = torch.cuda.is_available() if name == "auto" else name.startswith("cuda")
    if not use_cuda:
        return torch.device("cpu")
    gpu = distributed.local_gpu(name)
    return torch.device("cuda", gpu if gpu < torch.cuda.device_count() else torch.cuda.current_device())


def format_results(results: dict) -> str:
    """One line per IoU type: ``bbox AP 12.3 AP50 ...``."""
    lines = []
    for iou_type, res in results.items():
        vals = " ".join(f"{k} {'-' if v is None else f'{v:.1f}'}" for k, v in res.items())
        lines.append(f"{iou_type}: {vals}")
    return "\n".join(lines)
