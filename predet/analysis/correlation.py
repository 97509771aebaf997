"""IoU vs feature similarity of boxes around the ground truth (paper §4.4, Fig. 5b).

``predet analyze correlation --init FILE|scratch|RUN [--init ...] --data ANN.json --images DIR
--out DIR``

For each init the backbone + FPN is built and loaded exactly as fine-tuning builds it
(:func:`predet.modeling.detectors.build_detector` +
:func:`~predet.modeling.detectors.load_init`, here a Faster R-CNN whose heads are never run) and
run forward in eval mode on each image of a COCO-format set (also LVIS JSON or a VOC folder, as
fine-tuning reads them). For each ground-truth box (crowd and degenerate boxes are skipped)
``boxes_per_gt`` boxes are drawn around it whose IoU with it covers 0-1 evenly: candidates jitter
the centre and the log-size by a random magnitude, are clipped to the image, and are stratified
into ``bins`` equal IoU bins ([0, 0.1), ..., [0.9, 1)) with the same number per bin (a bin that no
box inside the image can reach, e.g. IoU < 0.1 for a box filling the image, keeps fewer). The
draw depends only on ``seed`` and the image id, so every init sees the same boxes.

Features: RoIAlign 7x7 through the detector's own ``box_roi_pool`` (torchvision
``MultiScaleRoIAlign`` on P2..P5, sampling ratio 2), so every box — the ground truth and each
jittered box — is pooled at its own FPN level by torchvision's ``LevelMapper`` rule (canonical 224
px at P4), as the detector pools proposals. A box's vector is its pooled ``[C, 7, 7]`` averaged
over the 7x7 bins (``pool="mean"``, the default: the box's content, as a classifier sees a crop) or
flattened (``pool="flat"``); the similarity of a pair is the cosine between the ground-truth box's
vector and the jittered box's. The mean is the default because it is what translation invariance
(the paper's hypothesis, §1) acts on: flattened, the 7x7 grid aligns the two boxes' contents
bin by bin, so any network that keeps spatial detail — a random init included — scores high (on
the demo's world a random init correlated 0.87-0.89 flattened, as high as the pre-trained ones;
averaged 0.68 on large boxes, against 0.73-0.79 pre-trained).

Input: RGB in 0-1 normalised with ImageNet's mean/std by the detector's
``GeneralizedRCNNTransform`` and padded to a multiple of 32, as fine-tuning does. By default the
images keep their size (``size=None``); ``size=S`` resizes the shorter side to ``S`` (long side at
most ``max_size``) as fine-tuning's ``model.test_size`` does. IoU and box sizes are measured in the
original image's pixels.

Buckets by the ground-truth box's area ``a`` in an image whose long side is ``L``: COCO's thresholds
scaled to the image, ``small: a < 32² (L/640)²``, ``medium: a < 96² (L/640)²``, else ``large``
(640 px: COCO's typical long side). Per init and bucket: the Pearson correlation of (IoU, cosine)
over all pairs, the Spearman correlation (Pearson of average ranks, so ties are handled), and the
number of pairs; a bucket with fewer than 3 pairs or a constant IoU / similarity gives null.

Inits: a torchvision-format backbone file (``predet export --format torchvision``; its
architecture and FPN width come from the ``F.json`` sidecar when there is one, else from the
tensors' shapes), ``scratch`` (a random init drawn with ``seed``: architecture / FPN width
``backbone`` / ``fpn_channels`` when given, else those of the first file init, else resnet50 / 256
as fine-tuning from scratch), or a pre-training run folder (its
``checkpoints/last.pt`` exported through :func:`predet.export.export_backbone`). Names: the file's
stem, ``scratch``, the run folder's name.

Writes ``OUT/correlation.json`` = ``{init: {"small"|"medium"|"large": {"pearson", "spearman",
"pairs"}}}`` and ``OUT/correlation.png`` (a bar group per init, a bar per bucket).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from predet.errors import UserError

__all__ = [
    "BUCKETS",
    "POOLS",
    "correlation",
    "pearson",
    "spearman",
    "average_ranks",
    "jitter_boxes",
    "pair_iou",
    "size_bucket",
    "bucket_stats",
    "pooled_similarity",
    "plot_correlation",
    "format_table",
    "init_name",
    "save_correlation",
]

BUCKETS = ("small", "medium", "large")
POOLS = ("mean", "flat")  # a box's vector: its RoIAlign 7x7 averaged, or flattened
COCO_SIDE = (
    640  # COCO's typical long side: its 32² / 96² area thresholds are for images of this size
)
MIN_PAIRS = 3


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------
def pearson(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Pearson's r of two equal-length samples; None for < 3 points, a constant sample or a value
    that is not finite (a NaN similarity: undefined, not a number to plot)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(
            f"pearson: expected two 1-D samples of one length, got {x.shape} and {y.shape}"
        )
    if len(x) < MIN_PAIRS or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return None
    dx, dy = x - x.mean(), y - y.mean()
    sxx, syy = float(dx @ dx), float(dy @ dy)
    scale = max(float(np.abs(x).max()), float(np.abs(y).max()), 1e-300)
    if sxx <= (1e-12 * scale) ** 2 * len(x) or syy <= (1e-12 * scale) ** 2 * len(y):
        return None  # constant (up to rounding): r undefined
    return float(np.clip(float(dx @ dy) / math.sqrt(sxx * syy), -1.0, 1.0))


def average_ranks(x: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank (``scipy.stats.rankdata(method='average')``)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)  # ranks first+1 .. first+count
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Spearman's rho: Pearson's r of the average ranks (ties handled); None as :func:`pearson`
    (a NaN would otherwise be ranked as the largest value)."""
    if len(x) != len(y):
        raise ValueError(f"spearman: samples of lengths {len(x)} and {len(y)}")
    if not (np.isfinite(np.asarray(x, dtype=np.float64)).all() and np.isfinite(np.asarray(y, dtype=np.float64)).all()):
        return None
    return pearson(average_ranks(x), average_ranks(y))


def bucket_stats(iou: Sequence[float], sim: Sequence[float]) -> dict[str, Any]:
    """``{"pearson": r, "spearman": rho, "pairs": n}`` (6 digits; None when undefined)."""
    r, rho = pearson(iou, sim), spearman(iou, sim)
    return {
        "pearson": None if r is None else round(r, 6),
        "spearman": None if rho is None else round(rho, 6),
        "pairs": int(len(iou)),
    }


# --------------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------------
def pair_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise IoU of XYXY boxes ``a[i]`` and ``b[i]`` (broadcasting) -> ``[...]``."""
    w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = w * h
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-12)


def size_bucket(area: float, long_side: float) -> str:
    """``small`` / ``medium`` / ``large`` for ``area`` px² in an image of long side ``long_side``:

    COCO's 32² / 96² thresholds scaled by ``(long_side / 640)²``.
    """
    scale = (long_side / COCO_SIDE) ** 2
    if area < 32**2 * scale:
        return "small"
    return "medium" if area < 96**2 * scale else "large"


def jitter_boxes(
    gt: np.ndarray,
    width: int,
    height: int,
    boxes_per_gt: int,
    rng: np.random.Generator,
    *,
    bins: int = 10,
    candidates: int = 64,
    min_side: float = 2.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes around one ground-truth box whose IoU with it covers [0, 1) evenly.

    Draws ``candidates * boxes_per_gt`` candidates: a magnitude ``t = u²`` (``u ~ U(0, 1)``, so
    small jitters are common enough for IoU near 1), the centre moved by ``t * U(-2, 2)`` box
    widths / heights and each side scaled by ``3^(t * U(-1, 1))``; clipped to the image; those
    with a side below ``min_side`` px dropped. Then takes, in draw order, ``boxes_per_gt / bins`` (the first
    ``boxes_per_gt % bins`` bins one more) from each IoU bin ``[k/bins, (k+1)/bins)``.

    Returns:
        boxes ``[K, 4]`` XYXY float64 and their IoU with ``gt`` ``[K]``, bin by bin
        (``K <= boxes_per_gt``).
    """
    m = candidates * boxes_per_gt
    x1, y1, x2, y2 = (float(v) for v in gt)
    w, h, cx, cy = x2 - x1, y2 - y1, (x1 + x2) / 2, (y1 + y2) / 2
    t = rng.random(m) ** 2
    ncx = cx + t * rng.uniform(-2, 2, m) * w
    ncy = cy + t * rng.uniform(-2, 2, m) * h
    nw = w * 3.0 ** (t * rng.uniform(-1, 1, m))
    nh = h * 3.0 ** (t * rng.uniform(-1, 1, m))
    boxes = np.stack([ncx - nw / 2, ncy - nh / 2, ncx + nw / 2, ncy + nh / 2], axis=1)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    boxes = boxes[(boxes[:, 2] - boxes[:, 0] >= min_side) & (boxes[:, 3] - boxes[:, 1] >= min_side)]
    iou = pair_iou(boxes, np.asarray(gt, dtype=np.float64)[None])
    which = np.minimum((iou * bins).astype(np.int64), bins - 1)
    quota = np.full(bins, boxes_per_gt // bins) + (np.arange(bins) < boxes_per_gt % bins)
    keep = np.concatenate([np.flatnonzero(which == k)[: quota[k]] for k in range(bins)])
    return boxes[keep], iou[keep]


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
def _infer_architecture(state: Mapping[str, torch.Tensor], where: str) -> str:
    """The ``BACKBONES`` name whose ResNet has exactly the ``body.*`` tensor shapes of ``state``."""
    from predet.modeling.backbone import BACKBONES, build_resnet

    want = {k[5:]: tuple(v.shape) for k, v in state.items() if k.startswith("body.")}
    norm = "bn" if "bn1.running_mean" in want else "gn"
    for name in BACKBONES:
        with torch.device("meta"):  # shapes only: no memory, no init cost
            ref = build_resnet(name, norm=norm).state_dict()
        ref = {k: tuple(v.shape) for k, v in ref.items() if not k.startswith("fc.")}
        counters = {k for k in ref if k.endswith("num_batches_tracked")}  # optional in a file
        if set(want) <= set(ref) and all(
            want.get(k) == s for k, s in ref.items() if k not in counters
        ):
            return name
    raise UserError(f"--init {where}: its body.* tensors match no known ResNet/ResNeXt")


def _describe_file(path: Path) -> dict[str, Any]:
    """``architecture`` / ``fpn_channels`` / ``norm`` of a torchvision-format backbone file: from its
    ``F.json`` (``predet export``) when there is one, else from the tensors' shapes. BN, SyncBN and
    FrozenBN compute the same in eval mode: all become fine-tuning's default ``frozenbn``."""
    from predet.export import read_sidecar, sidecar_path
    from predet.modeling.detectors import read_init

    meta = read_sidecar(path) if sidecar_path(path) != path else None
    if meta is not None:
        return {
            "architecture": meta["architecture"],
            "fpn_channels": int(meta["fpn_channels"]),
            "norm": "gn" if meta["norm"] == "gn" else "frozenbn",
        }
    state = read_init(path)
    if "body.conv1.weight" not in state:
        raise UserError(
            f"--init {path}: no backbone tensors (expected body.*/fpn.* from `predet export`)"
        )
    fpn = state.get("fpn.inner_blocks.0.0.weight")
    return {
        "architecture": _infer_architecture(state, str(path)),
        "fpn_channels": int(fpn.shape[0]) if fpn is not None else 256,
        "norm": "frozenbn" if "body.bn1.running_mean" in state else "gn",
    }


def _resolve_init(name: str, value: Any, tmp: Path) -> tuple[str, Optional[Path]]:
    """(init name, weights file or None for scratch); a run folder is exported into ``tmp``."""
    if value is None or str(value) == "scratch":
        return name, None
    path = Path(value)
    if path.is_dir():
        ckpt = path / "checkpoints" / "last.pt"
        if not ckpt.is_file():
            raise UserError(
                f"--init {path}: a folder without checkpoints/last.pt (not a pre-training run)"
            )
        from predet.export import export_backbone

        out = tmp / f"{len(list(tmp.iterdir()))}_{path.name}.pth"
        return name, Path(export_backbone(ckpt, "torchvision", out)[0])
    if not path.is_file():
        raise UserError(
            f"--init {value}: no such file or run folder (expected a torchvision-format backbone "
            "file, a pre-training run folder, or 'scratch')"
        )
    return name, path


def init_name(init: str | Path) -> str:
    """The row name of an ``--init``: ``scratch``, a run folder's name, or the file's stem."""
    if str(init) == "scratch":
        return "scratch"
    path = Path(init)
    return path.resolve().name if path.is_dir() else path.stem


def _build(
    spec: dict[str, Any],
    weights: Optional[Path],
    name: str,
    seed: int,
    size: Optional[int],
    max_size: int,
) -> nn.Module:
    """The fine-tuning detector (Faster R-CNN: backbone, transform, RoI pooler) with ``weights``."""
    from predet.config import FinetuneConfig
    from predet.modeling.detectors import build_detector, load_init

    cfg = FinetuneConfig()
    m = cfg.model
    m.arch, m.backbone, m.norm, m.fpn_channels = (
        "faster_rcnn",
        spec["architecture"],
        spec["norm"],
        spec["fpn_channels"],
    )
    m.test_size, m.max_size = size or 800, max_size
    m.box_head_dim = 16  # the heads are never run here; keep them small
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # scratch: the random init is a function of the seed
        model = build_detector(cfg, ["object"], for_test=True)
    if weights is not None:  # a body of another depth (resnet18 read as resnet34) is an error there
        load_init(model, str(weights), name=name)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------
def pooled_similarity(
    features: Mapping[str, torch.Tensor],
    pooler: nn.Module,
    gt_boxes: Sequence[torch.Tensor],
    jitter: Sequence[torch.Tensor],
    owner: Sequence[torch.Tensor],
    image_sizes: Sequence[tuple[int, int]],
    pool: str = "mean",
) -> list[torch.Tensor]:
    """Cosine similarity between each jittered box's pooled feature and its ground truth's.

    Args:
        features: FPN maps ``{name: [B, C, H', W']}`` of a batch of B images.
        pooler: ``MultiScaleRoIAlign`` (each box at its own level).
        gt_boxes: per image ``[G_i, 4]`` XYXY in the features' input pixels.
        jitter: per image ``[J_i, 4]`` boxes.
        owner: per image ``[J_i]`` index into that image's ground-truth boxes.
        image_sizes: per image ``(h, w)`` of the input before padding.
        pool: ``"mean"`` (each box's ``[C, 7, 7]`` averaged to ``[C]``) or ``"flat"`` (``[C*49]``).
    Returns:
        per image ``[J_i]`` cosine similarities.
    """
    if pool not in POOLS:
        raise UserError(f"pool={pool!r}: expected one of {', '.join(POOLS)}")
    boxes = [torch.cat([g, j]).float() for g, j in zip(gt_boxes, jitter)]
    pooled = pooler(features, boxes, list(image_sizes))  # [sum(G_i + J_i), C, 7, 7]
    pooled = pooled.mean(dim=(2, 3)) if pool == "mean" else pooled.flatten(1)
    out, start = [], 0
    for g, j, o in zip(gt_boxes, jitter, owner):
        f = pooled[start : start + len(g) + len(j)]
        start += len(g) + len(j)
        out.append(nn.functional.cosine_similarity(f[len(g) :], f[: len(g)][o], dim=1))
    return out


def _load_data(ann: Any, images: str | Path, max_images: Optional[int]):
    from predet.data.detection import DetectionDataset, infer_format, load_gt

    if isinstance(ann, Mapping):
        gt, where = ann, "annotations"
    else:
        if not Path(ann).exists():
            raise UserError(f"--data {ann}: annotation file not found")
        gt, where = load_gt(infer_format(ann), ann), str(ann)
    data = DetectionDataset(gt, images, train=False)
    usable = [
        i
        for i in range(len(data))
        if any(
            not a.get("iscrowd", 0) and a["bbox"][2] >= 1 and a["bbox"][3] >= 1
            for a in data.anns[data.ids[i]]
        )
    ]
    if max_images is not None:
        if max_images < 1:
            raise UserError(f"--max-images {max_images}: must be at least 1")
        usable = usable[:max_images]
    if not usable:
        raise UserError(
            f"--data {where}: no usable boxes (every annotation is crowd or degenerate, or none)"
        )
    return data, usable


def correlation(
    inits: Mapping[str, Any],
    ann: str | Path | Mapping[str, Any],
    images: str | Path,
    *,
    seed: int = 0,
    boxes_per_gt: int = 50,
    bins: int = 10,
    max_images: Optional[int] = None,
    size: Optional[int] = None,
    max_size: int = 1333,
    batch_size: int = 8,
    backbone: Optional[str] = None,
    fpn_channels: Optional[int] = None,
    device: str | torch.device = "cpu",
    threads: Optional[int] = None,
    pool: str = "mean",
) -> dict[str, dict[str, dict[str, Any]]]:
    """IoU-vs-cosine correlations ``{init name: {bucket: {"pearson", "spearman", "pairs"}}}``.

    Args:
        inits: name -> a torchvision-format backbone file, a pre-training run folder, or
            ``"scratch"``.
        ann: COCO-format annotation file (or LVIS JSON / VOC folder, or a loaded COCO dict).
        images: the folder the images' ``file_name`` are relative to.
        seed: the jittered boxes and the scratch init.
        boxes_per_gt: jittered boxes per ground-truth box, spread evenly over ``bins`` IoU bins.
        max_images: use the first N images that have a usable box (by image id).
        size: shorter side to resize to (fine-tuning's ``test_size``); None keeps the image size.
        backbone / fpn_channels: the scratch init's architecture (default: the first file init's,
            else resnet50 / 256 as fine-tuning from scratch).
        threads: torch CPU threads while it runs (None: torch's default; 1 is fastest on a busy
            CPU).
        pool: a box's vector, its RoIAlign 7x7 averaged (``"mean"``) or flattened (``"flat"``).
    """
    if not inits:
        raise UserError("no --init given")
    if boxes_per_gt < bins:
        raise UserError(f"--boxes-per-gt {boxes_per_gt}: at least {bins} (one per IoU bin)")
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size}: must be at least 1")
    if threads is not None and threads < 1:
        raise UserError(f"--threads {threads}: must be at least 1")
    if pool not in POOLS:
        raise UserError(f"--pool {pool}: expected one of {', '.join(POOLS)}")
    data, usable = _load_data(ann, images, max_images)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        return _correlation(
            inits,
            data,
            usable,
            seed=seed,
            boxes_per_gt=boxes_per_gt,
            bins=bins,
            size=size,
            max_size=max_size,
            batch_size=batch_size,
            backbone=backbone,
            fpn_channels=fpn_channels,
            device=torch.device(device),
            pool=pool,
        )
    finally:
        torch.set_num_threads(before)


def _correlation(
    inits: Mapping[str, Any],
    data,
    usable: list[int],
    *,
    seed: int,
    boxes_per_gt: int,
    bins: int,
    size: Optional[int],
    max_size: int,
    batch_size: int,
    backbone: Optional[str],
    fpn_channels: Optional[int],
    device: torch.device,
    pool: str,
) -> dict[str, dict[str, dict[str, Any]]]:
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="predet-corr-") as tmp:
        resolved = [_resolve_init(str(n), v, Path(tmp)) for n, v in inits.items()]
        specs = {n: _describe_file(w) for n, w in resolved if w is not None}
        first = next(iter(specs.values()), None)
        scratch = {
            "architecture": backbone or (first["architecture"] if first else "resnet50"),
            "fpn_channels": fpn_channels or (first["fpn_channels"] if first else 256),
            "norm": first["norm"] if first else "frozenbn",
        }
        models = {
            name: _build(specs.get(name, scratch), weights, name, seed, size, max_size).to(device)
            for name, weights in resolved
        }
        pairs = {name: {b: ([], []) for b in BUCKETS} for name in models}
        read = 0  # images that could be read
        with torch.no_grad():
            for start in range(0, len(usable), batch_size):  # each image read once, for every init
                # the same boxes for every init: drawn from (seed, image id)
                items = [
                    _image_boxes(data, i, seed, boxes_per_gt, bins)
                    for i in usable[start : start + batch_size]
                ]
                items = [it for it in items if it is not None]  # unreadable: named, left out
                read += len(items)
                if not items:
                    continue
                for name, model in models.items():
                    for it, sim in zip(items, _forward(model, items, size, device, pool)):
                        for b in BUCKETS:
                            sel = it["bucket"] == b
                            pairs[name][b][0].append(it["iou"][sel])
                            pairs[name][b][1].append(sim[sel])
        if not read:
            raise UserError(
                f"none of the {len(usable)} images with a usable box could be read (e.g. "
                f"{next(iter(data.unreadable), '?')}); check --images against the file_name"
            )
        for name, buckets in pairs.items():
            results[name] = {
                b: bucket_stats(np.concatenate(x), np.concatenate(y))
                for b, (x, y) in buckets.items()
            }
    return results


def _image_boxes(data, index: int, seed: int, boxes_per_gt: int, bins: int) -> Optional[dict[str, Any]]:
    """One image, its usable ground truth, jittered boxes, their IoU, owner and owner's bucket;
    None for an image that cannot be read."""
    image, target = data[index]
    if "unreadable" in target:
        return None
    _, h, w = image.shape
    gt = target["boxes"].double().numpy()
    gt = gt[(gt[:, 2] - gt[:, 0] >= 1) & (gt[:, 3] - gt[:, 1] >= 1)]
    rng = np.random.default_rng([seed, int(target["image_id"])])
    boxes, ious, owner, bucket = [], [], [], []
    for g, box in enumerate(gt):
        b, iou = jitter_boxes(box, w, h, boxes_per_gt, rng, bins=bins)
        boxes.append(b)
        ious.append(iou)
        owner.append(np.full(len(b), g))
        bucket += [size_bucket((box[2] - box[0]) * (box[3] - box[1]), max(h, w))] * len(b)
    cat = lambda parts, shape: np.concatenate(parts) if parts else np.zeros(shape)  # noqa: E731
    return {
        "image": image,
        "gt": gt,
        "jitter": cat(boxes, (0, 4)),
        "iou": cat(ious, (0,)),
        "owner": cat(owner, (0,)).astype(np.int64),
        "bucket": np.array(bucket, dtype="<U6"),
    }


def _forward(
    model: nn.Module, items: list[dict], size: Optional[int], device: torch.device, pool: str
) -> list[np.ndarray]:
    """Similarities per image of a batch, the images of one size at a time: padded to a larger
    image's size, an image's features near its border change (BatchNorm's shift makes the padding
    nonzero), and the numbers would depend on ``batch_size``."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, it in enumerate(items):
        groups.setdefault(tuple(it["image"].shape[-2:]), []).append(k)
    out: list[Optional[np.ndarray]] = [None] * len(items)
    for idx in groups.values():
        for k, sim in zip(idx, _forward_same_size(model, [items[k] for k in idx], size, device, pool)):
            out[k] = sim
    return out  # type: ignore[return-value]


def _forward_same_size(
    model: nn.Module, items: list[dict], size: Optional[int], device: torch.device, pool: str
) -> list[np.ndarray]:
    """Similarities per image of images of one size: the detector's transform, backbone and RoI pooler."""
    t = model.transform
    images = [it["image"].to(device) for it in items]
    gts = [torch.from_numpy(it["gt"]).float().to(device) for it in items]
    jit = [torch.from_numpy(it["jitter"]).float().to(device) for it in items]
    if size is None:  # keep the size: ImageNet normalisation and padding to the stride only
        batch = t.batch_images([t.normalize(im) for im in images], size_divisible=t.size_divisible)
        sizes = [tuple(im.shape[-2:]) for im in images]
    else:
        targets = [{"boxes": torch.cat([g, j])} for g, j in zip(gts, jit)]
        image_list, targets = t(images, targets)
        batch, sizes = image_list.tensors, image_list.image_sizes
        gts = [tg["boxes"][: len(g)] for tg, g in zip(targets, gts)]
        jit = [tg["boxes"][len(g) :] for tg, g in zip(targets, gts)]
    features = model.backbone(batch)
    owners = [torch.from_numpy(it["owner"]).to(device) for it in items]
    sims = pooled_similarity(
        features, model.roi_heads.box_roi_pool, gts, jit, owners, sizes, pool=pool
    )
    return [s.double().cpu().numpy() for s in sims]


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------
def format_table(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """A plain-text table: init, bucket, pairs, Pearson, Spearman."""
    width = max([len("init"), *(len(n) for n in results)])
    lines = [f"{'init':<{width}}  {'bucket':<6}  {'pairs':>7}  {'pearson':>8}  {'spearman':>8}"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for name, buckets in results.items():
        for b in BUCKETS:
            s = buckets[b]
            r, rho = fmt(s["pearson"]), fmt(s["spearman"])
            lines.append(f"{name:<{width}}  {b:<6}  {s['pairs']:>7}  {r:>8}  {rho:>8}")
    return "\n".join(lines)


def plot_correlation(
    results: Mapping[str, Mapping[str, Mapping[str, Any]]], out: str | Path
) -> Path:
    """Bars as the paper's Fig. 5b: a group per init, a bar per box-size bucket; a panel for
    Pearson, one for Spearman."""
    from predet.analysis.plots import plt, save_figure  # matplotlib with the Agg backend

    names = list(results)
    x = np.arange(len(names))
    width = 0.8 / len(BUCKETS)
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.6 * len(names) + 2) * 2, 3.8), squeeze=False)
    for ax, stat in zip(axes[0], ("pearson", "spearman")):
        for k, b in enumerate(BUCKETS):
            vals = [results[n][b][stat] for n in names]
            pos = x + (k - (len(BUCKETS) - 1) / 2) * width
            bars = ax.bar(pos, [0.0 if v is None else v for v in vals], width, label=b)
            for bar, v, n in zip(bars, vals, names):
                label = "n/a" if v is None else f"{v:.2f}"
                ax.annotate(
                    f"{label}\n{results[n][b]['pairs']}",
                    (bar.get_x() + width / 2, max(bar.get_height(), 0)),
                    ha="center",
                    va="bottom",
                    fontsize=6,
                )
        ax.set_xticks(x, names)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_ylim(min(-0.1, ax.get_ylim()[0]), 1.3)  # headroom for the legend's row
        ax.set_ylabel(f"{stat.capitalize()} correlation (IoU, cosine)")
        ax.set_title(
            f"{stat.capitalize()}: IoU vs RoI-feature similarity (label: value / pairs)", fontsize=9
        )
        ax.grid(axis="y", alpha=0.3)
        ax.legend(
            title="GT box size", fontsize=8, title_fontsize=8, ncol=len(BUCKETS), loc="upper center"
        )
    return save_figure(fig, out, dpi=120)


def save_correlation(results: dict, out: str | Path) -> None:
    """``out/correlation.json`` and ``out/correlation.png`` (:func:`plot_correlation`) of
    :func:`correlation`'s ``results``; ``out`` is created."""
    from predet.utils import write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "correlation.json", results)
    plot_correlation(results, out / "correlation.png")
