"""Detection data for fine-tuning: COCO JSON, LVIS-style JSON and Pascal VOC XML folders.

Every format is read into one in-memory COCO-format dict (``gt``: ``images``, ``annotations``,
``categories``), so training and evaluation (pycocotools) see the same boxes. A
:class:`DetectionDataset` item is what torchvision's detectors take::

    image:  float Tensor[3, H, W] in [0, 1]
    target: boxes    float Tensor[M, 4]  XYXY in pixels
            labels   int64 Tensor[M]     1..K (0 is the background)
            masks    uint8 Tensor[M, H, W] (only with ``with_masks``)
            image_id int

``data.*.ann: builtin:tiny`` (or ``builtin:small[:seed]``) is the built-in world's detection set
(:func:`resolve_split`), the default of the CPU configs.

Format notes:

- LVIS-style JSON: images carry ``neg_category_ids`` / ``not_exhaustive_category_ids`` (kept for
  the LVIS evaluation rules); a missing ``file_name`` is taken from ``coco_url`` (as in LVIS v1).
- VOC: ``ann`` is a folder of XML files or an ``ImageSets/Main/<split>.txt`` list (XMLs read from
  ``<VOC root>/Annotations``); ``images`` is ``JPEGImages``. Boxes are converted from VOC's 1-based
  inclusive pixels to XYXY as detectron2 does (``xmin - 1``, ``ymin - 1``, ``xmax``, ``ymax``).
  ``difficult`` objects become ``iscrowd=1``: never trained on, and ignored by COCO-style
  evaluation (a detection on them is neither a true nor a false positive).
- Crowd annotations are not trained on. For training, images with no usable box are left out, as
  torchvision's reference scripts do (``_coco_remove_images_without_annotations``).
"""

from __future__ import annotations

import json
import math
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from predet.data.images import BadImage, load_image
from predet.data.transforms import sample_seed
from predet.errors import UserError

MAX_NAMED = 10  # unreadable images named on stderr per process; the rest are only counted

__all__ = [
    "VOC_CLASSES",
    "DetectionDataset",
    "load_gt",
    "resolve_split",
    "load_coco_json",
    "load_lvis_json",
    "load_voc",
    "is_lvis",
    "infer_format",
    "segm_to_mask",
    "has_segmentation",
    "missing_segmentation",
    "collate_detection",
]

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Reading annotations into a COCO-format dict
# --------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"annotation file not found: {path}")
    try:
        gt = json.loads(path.read_text(encoding="utf-8-sig"))  # a BOM is allowed
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON: {e}") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt, dict) or key not in gt:
            raise UserError(f"{path}: not a COCO-format file (no '{key}' list)")
    # classes are matched by name (model <-> data, train <-> val): two categories of one name
    # would silently become one class, and the AP of one of them zero
    ids_of: dict[str, list] = defaultdict(list)
    for c in gt["categories"]:
        if not isinstance(c, dict) or "id" not in c:
            raise UserError(f"{path}: category {json.dumps(c)[:60]} has no 'id'")
        if not isinstance(c.get("name"), str):
            raise UserError(f"{path}: category {c['id']} has no 'name' string")
        ids_of[c["name"]].append(c["id"])
    dup = {n: ids for n, ids in ids_of.items() if len(ids) > 1}
    if dup:
        name, ids = next(iter(dup.items()))
        more = f" (and {len(dup) - 1} more names)" if len(dup) > 1 else ""
        raise UserError(f"{path}: categories {ids} share the name {name!r}{more}; category names must be unique")
    return gt


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_annotations(gt: dict, path: Path) -> None:
    """UserError naming the file and the annotation of a field the dataset needs that is missing
    or malformed (``image_id``, ``category_id``, ``bbox`` = 4 numbers)."""
    for a in gt["annotations"]:
        if not isinstance(a, dict):
            raise UserError(f"{path}: annotation {json.dumps(a)[:60]} is not a JSON object")
        where = f"{path}: annotation {a.get('id')} (image {a.get('image_id')})"
        for key in ("image_id", "category_id", "bbox"):
            if key not in a:
                raise UserError(f"{where} has no '{key}'")
        for key in ("image_id", "category_id"):  # ids are matched: numbers or strings, as COCO tools take
            if not _is_id(a[key]):
                raise UserError(f"{where}: '{key}' must be a number or a string, got {json.dumps(a[key])[:60]}")
        box = a["bbox"]
        if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
            raise UserError(f"{where}: 'bbox' must be [x, y, width, height], got {json.dumps(box)[:60]}")


def _is_id(value: Any) -> bool:
    """An id COCO tools match by value: a number or a string (not a bool, list or object)."""
    return isinstance(value, (int, float, str)) and not isinstance(value, bool)


def _check_references(gt: dict, path: Path) -> None:
    """UserError naming the first annotation whose ``category_id`` is not among the file's
    categories or whose ``image_id`` is not among its images (dropping it silently would leave
    objects unannotated: false positives in training, missed ground truth in evaluation)."""
    image_ids = set()
    for img in gt["images"]:
        if not isinstance(img, dict) or "id" not in img:
            raise UserError(f"{path}: image {json.dumps(img)[:60]} has no 'id'")
        if not _is_id(img["id"]):
            raise UserError(f"{path}: image id {json.dumps(img['id'])[:60]} must be a number or a string")
        image_ids.add(img["id"])
    for c in gt["categories"]:
        if not _is_id(c["id"]):
            raise UserError(f"{path}: category id {json.dumps(c['id'])[:60]} must be a number or a string")
    cat_ids = {c["id"] for c in gt["categories"]}
    for a in gt["annotations"]:
        where = f"{path}: annotation {a.get('id')} (image {a['image_id']})"
        if a["category_id"] not in cat_ids:
            raise UserError(f"{where} has category_id {a['category_id']!r}, which is not in 'categories'")
        if a["image_id"] not in image_ids:
            raise UserError(f"{where} refers to an image_id that is not in 'images'")


def _check_file_names(gt: dict, path: Path) -> None:
    for img in gt["images"]:  # every image has an id: _check_references ran first
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise UserError(f"{path}: image {img['id']} has no 'file_name'")


def _load_annotations(path: Path) -> dict:
    """:func:`_read_json` with the fields checked, ``iscrowd`` and ``area`` filled in where absent."""
    gt = _read_json(path)
    _check_annotations(gt, path)
    _check_references(gt, path)
    for ann in gt["annotations"]:
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
    return gt


def load_coco_json(path: str | Path) -> dict:
    """A COCO JSON file as a dict (``iscrowd`` and ``area`` filled in where absent)."""
    gt = _load_annotations(Path(path))
    _check_file_names(gt, Path(path))
    return gt


def load_lvis_json(path: str | Path) -> dict:
    """An LVIS-style JSON as a COCO-format dict keeping the federated-annotation fields."""
    gt = _load_annotations(Path(path))
    for img in gt["images"]:
        if not isinstance(img, dict):
            raise UserError(f"{path}: image {json.dumps(img)[:60]} is not a JSON object")
        img.setdefault("neg_category_ids", [])
        img.setdefault("not_exhaustive_category_ids", [])
        if "file_name" not in img:
            if "coco_url" not in img:
                raise UserError(f"{path}: image {img.get('id')} has neither file_name nor coco_url")
            img["file_name"] = img["coco_url"].rsplit("/", 1)[-1]
    _check_file_names(gt, Path(path))
    return gt


def is_lvis(gt: dict) -> bool:
    """Whether a COCO-format dict carries LVIS's federated-annotation fields."""
    return any("neg_category_ids" in img for img in gt["images"])


def _voc_xml_files(ann: Path) -> list[Path]:
    if ann.is_dir():
        files = sorted(ann.glob("*.xml"))
        if not files:
            raise UserError(f"VOC annotation folder {ann} holds no .xml files")
        return files
    if ann.suffix == ".txt" and ann.is_file():
        parents = ann.resolve().parents
        if len(parents) < 3:
            raise UserError(f"{ann}: a VOC image list must be <VOC root>/ImageSets/Main/<split>.txt")
        root = parents[2]  # VOC2007/ImageSets/Main/<split>.txt -> VOC2007
        try:
            text = ann.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{ann}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        files = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            f = root / "Annotations" / f"{line.split()[0]}.xml"
            if not f.is_file():
                raise UserError(f"{ann}:{lineno}: listed image's annotation not found: {f}")
            files.append(f)
        if not files:
            raise UserError(f"{ann}: VOC image list holds no image ids")
        return files
    raise UserError(f"VOC annotations must be a folder of XML files or an ImageSets .txt: {ann}")


def _voc_text(node: ET.Element, tag: str, path: Path | str) -> str:
    child = node.find(tag)
    if child is None or child.text is None:
        raise UserError(f"{path}: missing <{tag}>")
    return child.text.strip()


def _voc_number(node: ET.Element, tag: str, path: Path | str) -> float:
    text = _voc_text(node, tag, path)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise UserError(f"{path}: <{tag}> must be a number, got {text[:30]!r}")
    return value


def load_voc(ann: str | Path, classes: Optional[Sequence[str]] = None) -> dict:
    """Pascal VOC XML annotations as a COCO-format dict (no masks).

    Categories get ids 1..K in the order of ``classes``; by default VOC's 20 classes when every name
    is one of them, else the names found, sorted.
    """
    files = _voc_xml_files(Path(ann))
    images, objects = [], []  # objects: (image id, name, [x, y, w, h], difficult)
    for img_id, path in enumerate(files, start=1):
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as e:
            raise UserError(f"{path}: not valid XML: {e}") from None
        size = root.find("size")
        if size is None:
            raise UserError(f"{path}: missing <size>")
        w, h = int(_voc_number(size, "width", path)), int(_voc_number(size, "height", path))
        images.append({"id": img_id, "file_name": _voc_text(root, "filename", path), "width": w, "height": h})
        for k, obj in enumerate(root.iter("object"), start=1):
            bb = obj.find("bndbox")
            if bb is None:
                raise UserError(f"{path}: <object> without <bndbox>")
            where = f"{path}: object {k}"
            x1, y1, x2, y2 = (_voc_number(bb, tag, where) for tag in ("xmin", "ymin", "xmax", "ymax"))
            difficult = obj.find("difficult")
            is_difficult = difficult is not None and (difficult.text or "0").strip() == "1"
            box = [x1 - 1.0, y1 - 1.0, x2 - x1 + 1.0, y2 - y1 + 1.0]
            objects.append((img_id, _voc_text(obj, "name", path), box, is_difficult, path))
    names = sorted({o[1] for o in objects})
    if classes is None:
        classes = VOC_CLASSES if set(names) <= set(VOC_CLASSES) else names
    cat_id = {name: i for i, name in enumerate(classes, start=1)}
    annotations = []
    for ann_id, (img_id, name, box, difficult, path) in enumerate(objects, start=1):
        if name not in cat_id:
            raise UserError(f"{path}: object class '{name}' is not in data.classes")
        annotations.append({
            "id": ann_id, "image_id": img_id, "category_id": cat_id[name], "bbox": box,
            "area": box[2] * box[3], "iscrowd": int(difficult),
        })  # fmt: skip
    categories = [{"id": i, "name": n} for n, i in cat_id.items()]
    return {"images": images, "annotations": annotations, "categories": categories}


def _is_voc_layout(ann: str | Path) -> bool:
    """A folder (of VOC XML files) or a ``.txt`` image-set list."""
    return Path(ann).is_dir() or Path(ann).suffix == ".txt"


def infer_format(ann: str | Path) -> str:
    """``voc`` for a folder or ``.txt`` list, ``lvis`` for a JSON with LVIS's fields, else ``coco``."""
    if _is_voc_layout(ann):
        return "voc"
    return "lvis" if is_lvis(_read_json(Path(ann))) else "coco"


def resolve_split(ann: str, images: str, split: str) -> tuple[str, str]:
    """``builtin:<preset>[:<seed>]`` -> the built-in world's ``det/{train,val}.json`` and ``det/images``.

    Other paths come back unchanged. The world is generated (once, cached) on first use.
    """
    if not str(ann).startswith("builtin:"):
        return ann, images
    from predet.data.builtin import resolve_builtin

    world = resolve_builtin(str(ann))
    return str(world.det_train if split == "train" else world.det_val), images or str(world.det_images)


def load_gt(fmt: str, ann: str | Path, classes: Optional[Sequence[str]] = None) -> dict:
    """Annotations of any supported format (``coco`` | ``lvis`` | ``voc``) as a COCO-format dict."""
    if not ann:
        raise UserError(f"no annotation path given for data.format={fmt}")
    if fmt in ("coco", "lvis") and _is_voc_layout(ann):
        what = "a folder" if Path(ann).is_dir() else "an image-set list"
        raise UserError(f"{ann}: {what}, not a {fmt.upper()} JSON: Pascal VOC data needs data.format=voc")
    if fmt == "coco":
        return load_coco_json(ann)
    if fmt == "lvis":
        return load_lvis_json(ann)
    if fmt == "voc":
        return load_voc(ann, classes)
    raise UserError(f"data.format: unknown format '{fmt}' (choose coco, lvis or voc)")


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------
def segm_to_mask(segm: Any, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as a uint8 [H, W] mask."""
    if isinstance(segm, list):
        polygons = [p for p in segm if len(p) >= 6]  # pycocotools needs >= 3 points
        if not polygons:
            return np.zeros((height, width), dtype=np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segm.get("counts"), list):
        rle = mask_utils.frPyObjects(segm, height, width)
    else:
        rle = segm
    return mask_utils.decode(rle)


def has_segmentation(ann: dict) -> bool:
    """Whether a COCO annotation carries a mask: an RLE, or a polygon of at least 3 points
    (box-only exports often write ``"segmentation": []``)."""
    segm = ann.get("segmentation")
    if isinstance(segm, dict):
        return "counts" in segm
    return isinstance(segm, list) and any(isinstance(p, list) and len(p) >= 6 for p in segm)


def missing_segmentation(gt: dict) -> int:
    """How many non-crowd annotations of ``gt`` have no mask (:func:`has_segmentation`)."""
    return sum(1 for a in gt["annotations"] if not a.get("iscrowd", 0) and not has_segmentation(a))


class WrongSize(BadImage):
    """An image whose size (EXIF orientation applied) is not its annotations' ``width`` x
    ``height``: skipped and counted like an unreadable one."""


def _has_usable_box(anns: list[dict]) -> bool:
    return any(not a.get("iscrowd", 0) and a["bbox"][2] > 1 and a["bbox"][3] > 1 for a in anns)


class DetectionDataset(Dataset):
    """Images and torchvision targets from a COCO-format ``gt`` dict.

    Args:
        gt: COCO-format dict (:func:`load_gt`).
        images: folder the images' ``file_name`` are relative to.
        train: training mode: images without a usable box are left out, flip augmentation is on.
        with_masks: add ``masks`` to targets (every non-crowd annotation needs a segmentation).
        flip_p: horizontal-flip probability (training).
        seed: seed of the flips (item ``i`` at epoch ``e`` flips with a generator seeded by
            ``sample_seed(seed, e, i)``, as pre-training's items) and of the subset draw.
        subset: keep this many training images, drawn with ``subset_seed`` (paper Table 7).
        subset_seed: the draw's seed; ``None``: ``seed`` (each run seed its own subset).
        classes: class names in label order (label ``l`` is ``classes[l - 1]``); default: the gt's
            categories sorted by id. Annotations of other categories are left out.

    Items are indexed by ``i`` or ``(epoch, i)``.
    """

    def __init__(
        self,
        gt: dict,
        images: str | Path,
        *,
        train: bool,
        with_masks: bool = False,
        flip_p: float = 0.5,
        seed: int = 0,
        subset: Optional[int] = None,
        subset_seed: Optional[int] = None,
        classes: Optional[Sequence[str]] = None,
    ) -> None:
        self.root = Path(images)
        if not self.root.is_dir():
            raise UserError(f"image folder not found: {self.root}")
        self.train, self.with_masks, self.flip_p, self.seed = train, with_masks, flip_p, seed
        cats = sorted(gt["categories"], key=lambda c: c["id"])
        self.classes = list(classes) if classes is not None else [c["name"] for c in cats]
        label_of_name = {n: i for i, n in enumerate(self.classes, start=1)}
        self.label_of_cat = {c["id"]: label_of_name[c["name"]] for c in cats if c["name"] in label_of_name}
        self.images = {img["id"]: img for img in gt["images"]}
        self.anns: dict[int, list[dict]] = defaultdict(list)
        for a in gt["annotations"]:
            if a["category_id"] in self.label_of_cat:
                self.anns[a["image_id"]].append(a)
        ids = sorted(self.images)
        if train:
            ids = [i for i in ids if _has_usable_box(self.anns[i])]
            self.num_without_boxes = len(self.images) - len(ids)
        if subset is not None:
            if not 0 < subset <= len(ids):
                raise UserError(f"data.subset={subset} but the training set has {len(ids)} usable images")
            draw = seed if subset_seed is None else subset_seed
            pick = np.random.default_rng(draw).permutation(len(ids))[:subset]
            ids = [ids[i] for i in sorted(pick)]
        if with_masks:
            for i in ids:
                for a in self.anns[i]:
                    if not a.get("iscrowd", 0) and not has_segmentation(a):
                        raise UserError(
                            f"annotation {a.get('id')} (image {i}) has no segmentation "
                            f"({a.get('segmentation', 'none')!r:.40}): masks are needed by "
                            "model.arch=mask_rcnn (use faster_rcnn or retinanet)"
                        )
        self.ids = ids
        self.unreadable: dict[str, str] = {}  # path -> reason, of the files this process skipped
        self._undecodable: set[str] = set()  # of those, the ones not worth decoding again

    def __len__(self) -> int:
        return len(self.ids)

    def _load_image(self, info: dict) -> torch.Tensor:
        """The image as float RGB ``[3, H, W]`` in 0-1, EXIF orientation applied (as detectron2
        reads images: annotations are in the frame the image is shown in), any PIL mode made RGB
        (greyscale, CMYK, palette, 16-bit, alpha on white). Raises :class:`BadImage` for a missing,
        truncated or corrupt file, :class:`WrongSize` for one whose size is not the annotations'
        (its boxes would be in another frame)."""
        path = self.root / info["file_name"]
        img, _ = load_image(path, min_side=1)
        arr = np.asarray(img)
        h, w = arr.shape[:2]
        if "height" in info and (info["height"], info.get("width")) != (h, w):
            raise WrongSize(
                path,
                f"image is {w}x{h} (EXIF orientation applied) but the annotations say "
                f"{info.get('width')}x{info['height']}",
            )
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)  # HWC -> CHW

    def _read(self, img_id: int) -> torch.Tensor:
        """:meth:`_load_image`, remembering unusable files (each named on stderr once, the first
        ``MAX_NAMED`` per process; a file already found unreadable is not decoded again, one of the
        wrong size is: another image may give the file its right size)."""
        info = self.images[img_id]
        path = str(self.root / info["file_name"])
        if path in self._undecodable:
            raise BadImage(path, self.unreadable[path])
        try:
            return self._load_image(info)
        except BadImage as e:
            if not isinstance(e, WrongSize):
                self._undecodable.add(e.path)
            if e.path in self.unreadable:
                raise
            self.unreadable[e.path] = e.reason
            if len(self.unreadable) <= MAX_NAMED:
                more = " (further ones are skipped without a line)" if len(self.unreadable) == MAX_NAMED else ""
                what = "image" if isinstance(e, WrongSize) else "unreadable image"
                print(f"warning: skipping {what} {e}{more}", file=sys.stderr, flush=True)
            raise

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict[str, Any]]:
        """``(image, target)``. An unusable image (unreadable, or not the annotations' size) is
        skipped: in training the next readable image takes its place (detectron2's rule; the flip
        still draws from item ``(epoch, i)``); in evaluation the item is ``([3, 0, 0] empty image,
        {"image_id": id, "unreadable": reason})``, which :func:`predict` leaves out and counts."""
        epoch, index = key if isinstance(key, tuple) else (0, key)
        for attempt in range(len(self.ids)):
            img_id = self.ids[(index + attempt) % len(self.ids)]
            try:
                image = self._read(img_id)
                break
            except BadImage as e:
                if not self.train:
                    return torch.zeros(3, 0, 0), {"image_id": img_id, "unreadable": e.reason}
        else:
            first = next(iter(self.unreadable.items()), ("", ""))
            raise UserError(
                f"{self.root}: none of the {len(self.ids)} images can be read (first: "
                f"{first[0]}: {first[1]}); check the images folder against the annotations' "
                "file_name, width and height"
            )
        _, h, w = image.shape
        anns = [a for a in self.anns[img_id] if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # XYWH -> XYXY
        boxes[:, 0::2].clamp_(0, w)
        boxes[:, 1::2].clamp_(0, h)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        labels = torch.tensor([self.label_of_cat[a["category_id"]] for a in anns], dtype=torch.int64)
        target: dict[str, Any] = {"boxes": boxes[keep], "labels": labels[keep], "image_id": img_id}
        if self.with_masks:
            masks = np.zeros((len(anns), h, w), dtype=np.uint8)
            for j, a in enumerate(anns):
                masks[j] = segm_to_mask(a["segmentation"], h, w)
            target["masks"] = torch.from_numpy(masks)[keep]
        if self.train and self.flip_p > 0:
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
            if torch.rand((), generator=g).item() < self.flip_p:
                image, target = _hflip(image, target)
        return image, target


def _hflip(image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    w = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = w - target["boxes"][:, [2, 0]]  # x1' = W - x2, x2' = W - x1
    target["boxes"] = boxes
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image.flip(-1), target


def collate_detection(batch: list) -> tuple[list[torch.Tensor], list[dict]]:
    """Lists of images and targets (torchvision detectors take lists of different sizes)."""
    images, targets = zip(*batch)
    return list(images), list(targets)
