"""Pre-training datasets: (image, multi-hot labels, query boxes) -> two-view samples.

Three sources, one sample format (see :class:`~predet.data.transforms.TwoViewTransform`):

- ``manifest``: a JSONL manifest (labels, or tags mapped through a synonyms file exactly as
  ``predet data vocab``) with queries from a ``predet data queries`` cache or the lines' ``queries``;
- ``coco``: a COCO JSON used as weak labels (image-level classes of its annotations; its boxes are
  NOT used as queries: queries come from the cache), the paper's "PreDet-ImageNet"-style run;
- ``shards``: WebDataset tar shards from ``predet data shards``, split by node and worker, as an
  endless resampled stream.

Randomness: item ``i`` at epoch ``e`` draws from ``torch.Generator().manual_seed(sample_seed(seed, e,
i))``, whatever worker loads it. An unreadable image is skipped (the next readable item takes its
place) and counted: the sample's ``skipped`` and the batch's ``num_skipped`` carry the count out of
worker processes.
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from predet.data.heldout import HeldOutSet, build_heldout_set, heldout_indices
from predet.data.images import BadImage, decode_image, draft_scale, load_image
from predet.data.manifest import ManifestEntry, read_manifest, sample_indices
from predet.data.queries import QueryCache
from predet.data.transforms import TwoViewTransform, sample_seed
from predet.data.vocab import Vocab, build_vocab, load_synonyms
from predet.errors import UserError

__all__ = [
    "PretrainData", "WeakLabelDataset", "ShardDataset", "build_pretrain_data", "collate_two_view",
    "draft_side", "manifest_vocab",
]  # fmt: skip

log = logging.getLogger(__name__)


def _ragged(arrays: Sequence[np.ndarray], dtype: Any, width: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """List of arrays -> (concatenated values, int64 offsets ``len+1``): compact and cheap to
    pickle into worker processes, unlike a list of small arrays."""
    counts = np.array([len(a) for a in arrays], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    shape = (-1, width) if width else (-1,)
    parts = [np.asarray(a, dtype).reshape(shape) for a in arrays]
    values = np.concatenate(parts) if parts else np.zeros((0, width) if width else (0,), dtype)
    return values.astype(dtype, copy=False), offsets


def draft_side(transform: TwoViewTransform) -> int:
    """Short side a JPEG may be decoded at (libjpeg draft) without losing view resolution: the
    smallest crop (``crop_scale[0]`` of the area, at the most elongated ``crop_ratio``) must still
    hold ``size`` pixels on its short side. For a square image of side s that side is
    ``s * sqrt(scale / max_ratio)``; a longer image only has more."""
    if not transform.crop:
        return int(transform.size)
    min_scale = max(transform.crop_scale[0], 1e-3)
    r0, r1 = transform.crop_ratio
    elongation = max(r1, 1.0 / r0, 1.0)
    return int(math.ceil(transform.size * math.sqrt(elongation / min_scale)))


def _init_cv2_threads() -> None:
    """One OpenCV and one torch thread per process: the loader workers are the parallelism.

    OpenCV's thread pool is not fork-safe: calling ``cv2.setNumThreads`` in a forked worker whose
    parent had already run a multi-threaded OpenCV op can deadlock on the pool's copied lock. So
    it is called in the parent (the dataset's constructor, before any worker forks), where it
    also leaves the children without a pool; inside workers only torch's threads are set.
    """
    if get_worker_info() is not None:
        torch.set_num_threads(1)
    else:
        import cv2

        cv2.setNumThreads(1)


# --------------------------------------------------------------------------------------------
# Batches: up to Q of each image's valid queries
# --------------------------------------------------------------------------------------------
def collate_two_view(samples: Sequence[dict], num_queries: int = 16) -> dict[str, torch.Tensor]:
    """Stack two-view samples and sample up to Q valid queries per image.

    Each sample's queries are drawn with ``torch.Generator().manual_seed(sample["seed"])``, so a
    batch does not depend on worker processes. Returns ``view1``, ``view2`` (N, 3, S, S);
    ``boxes1``, ``boxes2`` (N, Q, 4) zero-padded; ``query_mask`` (N, Q) bool; ``labels`` (N, K);
    ``num_skipped`` () long: unreadable images the dataset passed over to fill this batch.
    """
    N, Q = len(samples), int(num_queries)
    boxes1 = torch.zeros(N, Q, 4)
    boxes2 = torch.zeros(N, Q, 4)
    mask = torch.zeros(N, Q, dtype=torch.bool)
    # per-image loop: each image has its own number of valid queries (N is the batch, not a hot path)
    for n, s in enumerate(samples):
        idx = s["valid"].nonzero().squeeze(1)
        if idx.numel() > Q:
            g = torch.Generator().manual_seed(int(s["seed"]))
            idx = idx[torch.randperm(idx.numel(), generator=g)[:Q]]
        k = idx.numel()
        boxes1[n, :k] = s["boxes1"][idx]
        boxes2[n, :k] = s["boxes2"][idx]
        mask[n, :k] = True
    return {
        "view1": torch.stack([s["view1"] for s in samples]),
        "view2": torch.stack([s["view2"] for s in samples]),
        "boxes1": boxes1,
        "boxes2": boxes2,
        "query_mask": mask,
        "labels": torch.stack([s["labels"] for s in samples]).float(),
        "num_skipped": torch.tensor(sum(int(s.get("skipped", 0)) for s in samples)),
    }


class WeakLabelDataset(Dataset):
    """Map-style dataset of images with class indices and query boxes (original-image pixels).

    Args:
        paths: image files.
        labels: per image, class indices (``len(paths)`` arrays).
        queries: per image, float32 ``(K_i, 4)`` XYXY boxes (``K_i`` may be 0).
        num_classes: K, the width of the multi-hot label.
        transform: the two-view transform.
        seed: base seed of the per-item generators.
    """

    def __init__(
        self,
        *,
        paths: Sequence[str | Path],
        labels: Sequence[Sequence[int]],
        queries: Sequence[np.ndarray],
        num_classes: int,
        transform: TwoViewTransform,
        seed: int = 0,
    ) -> None:
        if not (len(paths) == len(labels) == len(queries)):
            raise ValueError("paths, labels and queries must have the same length")
        self.paths = [str(p) for p in paths]
        self.label_values, self.label_offsets = _ragged([np.asarray(v, np.int64) for v in labels], np.int64)
        self.query_values, self.query_offsets = _ragged(queries, np.float32, width=4)
        self.num_classes = int(num_classes)
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self.num_skipped = 0  # unreadable images met by this process
        self.bad: dict[int, str] = {}  # index -> reason, this process
        self._draft = draft_side(transform)
        _init_cv2_threads()  # in the parent, before workers fork

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def labels_of(self, index: int) -> torch.Tensor:
        """Multi-hot float ``(K,)`` of item ``index``."""
        y = torch.zeros(self.num_classes)
        y[torch.from_numpy(self.label_values[self.label_offsets[index] : self.label_offsets[index + 1]])] = 1.0
        return y

    def queries_of(self, index: int) -> np.ndarray:
        return self.query_values[self.query_offsets[index] : self.query_offsets[index + 1]]

    def _load(self, index: int) -> dict[str, Any]:
        img, full = load_image(self.paths[index], draft_short_side=self._draft)
        boxes = self.queries_of(index)
        if img.size != full:  # decoded at a libjpeg draft scale: boxes follow
            boxes = boxes * np.float32(draft_scale(img.size, full))
        return {"img": img, "boxes": boxes}

    def __getitem__(self, index: int) -> dict[str, Any]:
        _init_cv2_threads()
        n = len(self)
        for attempt in range(n):
            j = (index + attempt) % n
            if j in self.bad:
                continue
            try:
                item = self._load(j)
            except BadImage as e:
                self.bad[j] = e.reason
                self.num_skipped += 1
                log.warning("skipping unreadable image %s", e)  # once per image and process
                continue
            seed = sample_seed(self.seed, self.epoch, index)
            out = self.transform(item["img"], item["boxes"], generator=torch.Generator().manual_seed(seed))
            out["labels"] = self.labels_of(j)
            out["seed"] = seed
            out["skipped"] = attempt
            return out
        raise UserError(f"no readable image among the {n} images of the dataset")


class ShardDataset(IterableDataset):
    """Endless (``resampled=True``) or one-pass stream of two-view samples from WebDataset shards.

    Each sample is ``KEY.jpg`` + ``KEY.json`` (``{"labels": [class, ...], "queries": [[x1, y1, x2,
    y2], ...]}``, boxes in the stored image's pixels). Resampled: every (rank, worker) draws shards
    at random with its own seed; one pass: shards are split by node, then by worker.
    """

    def __init__(
        self,
        *,
        urls: Sequence[str],
        classes: Sequence[str],
        transform: TwoViewTransform,
        seed: int = 0,
        resampled: bool = True,
        shuffle: int = 256,
    ) -> None:
        self.urls = list(urls)
        self.classes = list(classes)
        self.class_index = {c: k for k, c in enumerate(self.classes)}
        self.transform = transform
        self.seed = int(seed)
        self.resampled = resampled
        self.shuffle = shuffle
        self.epoch = 0
        self.num_skipped = 0
        _init_cv2_threads()  # in the parent, before workers fork

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _pipeline(self, stream_seed: int) -> Any:
        import webdataset as wds

        if self.resampled:
            stages = [wds.ResampledShards(self.urls, seed=stream_seed, deterministic=True)]
        else:
            stages = [wds.SimpleShardList(self.urls), wds.split_by_node, wds.split_by_worker]
        stages.append(wds.tarfile_to_samples(handler=wds.warn_and_continue))
        if self.shuffle > 1:
            stages.append(wds.shuffle(self.shuffle, seed=stream_seed))
        return wds.DataPipeline(*stages)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        _init_cv2_threads()
        from predet.distributed import rank, world_size

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stream = rank() * workers + worker  # this (node, worker)'s place among all readers
        streams = world_size() * workers
        stream_seed = sample_seed(self.seed, self.epoch, stream)
        skipped = 0
        for count, sample in enumerate(self._pipeline(stream_seed)):
            key = sample.get("__key__", "?")
            try:
                meta = json.loads(sample["json"])
                img, full = decode_image(sample["jpg"], name=f"{sample.get('__url__', '?')}:{key}")
            except (BadImage, KeyError, json.JSONDecodeError, UnicodeDecodeError) as e:
                log.warning("skipping unreadable shard sample %s:%s (%s)", sample.get("__url__", "?"), key, e)
                self.num_skipped += 1
                skipped += 1
                continue
            boxes = np.asarray(meta.get("queries", []), np.float32).reshape(-1, 4)
            seed = sample_seed(self.seed, self.epoch, count * streams + stream)
            out = self.transform(img, boxes, generator=torch.Generator().manual_seed(seed))
            y = torch.zeros(len(self.classes))
            idx = [self.class_index[c] for c in meta.get("labels", []) if c in self.class_index]
            y[idx] = 1.0
            out["labels"] = y
            out["seed"] = seed
            out["skipped"] = skipped
            skipped = 0
            yield out


@dataclass
class PretrainData:
    """What the pre-training engine needs: a dataset, its classes, the collate and counts."""

    dataset: Dataset
    classes: list[str]
    collate_fn: Callable[[Sequence[dict]], dict[str, torch.Tensor]]
    counts: dict[str, int] = field(default_factory=dict)
    heldout: Optional[HeldOutSet] = None  # images left out of training, for cls_map

    @property
    def num_skipped(self) -> int:
        """Images left out: excluded when building plus skipped at load time in this process."""
        return int(self.counts.get("excluded_unreadable", 0)) + int(getattr(self.dataset, "num_skipped", 0))


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------
def _synonyms_for(cfg: Any, manifest_path: Path, entries: Sequence[ManifestEntry]) -> Optional[dict]:
    if all(e.labels is not None for e in entries):
        return None
    path = Path(cfg.data.synonyms) if cfg.data.synonyms else manifest_path.parent / "synonyms.json"
    if not path.is_file():
        raise UserError(
            f"{manifest_path}: lines carry tags but no labels, and no synonyms file was found at {path} "
            "(set data.synonyms or run `predet data vocab`)"
        )
    return load_synonyms(path)


def manifest_vocab(cfg: Any, manifest_path: Path, entries: Sequence[ManifestEntry]) -> Vocab:
    """The classes a pre-training on a manifest's ``entries`` learns: their labels, or their tags
    through the synonyms file ``cfg`` or the manifest's folder names; the same errors as
    :func:`build_pretrain_data` (tags without a synonyms file, no class of ``data.min_images``
    images), for a caller that checks before the long work."""
    return _checked_vocab(cfg, manifest_path, entries, _synonyms_for(cfg, manifest_path, entries))


def _checked_vocab(cfg: Any, manifest_path: Path, entries: Sequence[ManifestEntry], synonyms: Optional[dict]) -> Vocab:
    vocab = build_vocab(entries, synonyms, cfg.data.min_images)
    if not vocab.classes:
        raise UserError(f"{manifest_path}: no class has >= {cfg.data.min_images} images (data.min_images)")
    return vocab


def _from_entries(
    cfg: Any,
    manifest_path: Path,
    entries: list[ManifestEntry],
    synonyms: Optional[dict],
    sampled: Optional[dict[str, int]] = None,
) -> PretrainData:
    """``sampled``: ``{"manifest_images": n}`` when ``entries`` are a ``data.max_images`` sample
    of the manifest's n (reported in the counts)."""
    vocab = _checked_vocab(cfg, manifest_path, entries, synonyms)
    has_inline = any(e.queries is not None for e in entries)
    cache = QueryCache(cfg.data.queries) if cfg.data.queries else None
    if cache is None and not has_inline:
        raise UserError(
            f"{manifest_path}: no query boxes: set data.queries to a cache made by "
            f"`predet data queries --manifest {manifest_path} --out DIR`, or add 'queries' to the manifest lines"
        )
    index = {c: k for k, c in enumerate(vocab.classes)}
    counts = {**(sampled or {}), "images": len(entries), "no_class": 0, "excluded_unreadable": 0,
              "without_queries": 0}  # fmt: skip
    held = set(heldout_indices(len(entries), cfg.data.heldout).tolist())
    held_entries: list[tuple[ManifestEntry, list[str]]] = []
    paths, labels, queries = [], [], []
    for i, (e, classes) in enumerate(zip(entries, vocab.labels)):
        if i in held:
            held_entries.append((e, classes))  # scored by cls_map, never trained on
            continue
        if not classes:
            counts["no_class"] += 1
            continue
        if e.queries is not None:
            q = e.queries
        else:
            if cache is not None and cache.is_failed(e.image, e.path):
                counts["excluded_unreadable"] += 1
                continue
            hit = cache.get(e.image, e.path) if cache is not None else None
            q = hit[0] if hit is not None else np.zeros((0, 4), np.float32)
        if len(q) == 0:
            counts["without_queries"] += 1  # kept: classification loss only
        paths.append(e.path)
        labels.append([index[c] for c in classes])
        queries.append(q)
    if not paths:
        raise UserError(f"{manifest_path}: no usable image (counts: {counts})")
    counts["used"] = len(paths)
    counts["heldout"] = len(held_entries)
    transform = TwoViewTransform.from_config(cfg.data.aug, cfg.model.input_size)
    dataset = WeakLabelDataset(
        paths=paths, labels=labels, queries=queries, num_classes=len(vocab.classes), transform=transform, seed=cfg.seed
    )
    collate = functools.partial(collate_two_view, num_queries=cfg.data.queries_per_image)
    return PretrainData(
        dataset=dataset, classes=vocab.classes, collate_fn=collate, counts=counts,
        heldout=build_heldout_set(
            manifest_path, [e.image for e, _ in held_entries], [e.path for e, _ in held_entries],
            [names for _, names in held_entries], vocab.classes,
        ),
    )  # fmt: skip


def _shard_urls(spec: str) -> list[str]:
    """A folder (all ``*.tar`` in it), a brace pattern ``shard-{000000..000009}.tar`` or a glob."""
    import braceexpand

    p = Path(spec)
    if p.is_dir():
        urls = sorted(str(f) for f in p.glob("*.tar"))
    elif any(ch in spec for ch in "*?["):
        urls = sorted(glob.glob(spec))
    else:
        urls = list(braceexpand.braceexpand(spec))
    missing = [u for u in urls if "://" not in u and not Path(u).is_file()]
    if not urls or missing:
        raise UserError(f"data.shards: no shard files at '{spec}'" + (f" (missing {missing[0]})" if missing else ""))
    return urls


def _build_shards(cfg: Any) -> PretrainData:
    urls = _shard_urls(cfg.data.shards)
    vocab_path = Path(urls[0]).parent / "vocab.json"
    if not vocab_path.is_file():
        raise UserError(f"data.shards: {vocab_path} not found (written by `predet data shards`)")
    classes = json.loads(vocab_path.read_text())["classes"]
    transform = TwoViewTransform.from_config(cfg.data.aug, cfg.model.input_size)
    dataset = ShardDataset(urls=urls, classes=classes, transform=transform, seed=cfg.seed, resampled=True)
    collate = functools.partial(collate_two_view, num_queries=cfg.data.queries_per_image)
    return PretrainData(dataset=dataset, classes=classes, collate_fn=collate, counts={"shards": len(urls)})


def build_pretrain_data(cfg: Any) -> PretrainData:
    """The pre-training data of a :class:`predet.config.PretrainConfig` (``data.format``:
    ``manifest`` | ``shards`` | ``coco``)."""
    fmt = cfg.data.format
    if fmt == "manifest" and cfg.data.shards and cfg.data.manifest:  # which one? never guess
        raise UserError(
            f"data.shards={cfg.data.shards!r} and data.manifest={cfg.data.manifest!r} are both set: "
            "add data.format=shards to stream the shards, or data.shards=null to read the manifest"
        )
    if fmt == "shards" or (fmt == "manifest" and cfg.data.shards and not cfg.data.manifest):
        if not cfg.data.shards:
            raise UserError("data.format=shards needs data.shards (a folder or shard pattern)")
        if cfg.data.max_images is not None:
            raise UserError("data.max_images samples a manifest or COCO JSON; shards stream whole (unset it)")
        if cfg.data.min_images != 1:
            raise UserError(
                f"data.min_images={cfg.data.min_images} filters a manifest's classes; shards carry the classes "
                "`predet data shards` wrote (unset it, or run `predet data vocab --min-images N` before writing them)"
            )
        from predet.config import PretrainDataConfig

        if cfg.data.heldout not in (0, PretrainDataConfig.heldout):  # the default (a manifest's) is no ask
            raise UserError(
                f"data.heldout={cfg.data.heldout} holds out a slice of a manifest or COCO JSON; shards "
                "stream whole, with no held-out slice (unset it)"
            )
        return _build_shards(cfg)
    if not cfg.data.manifest:
        raise UserError("data.manifest is empty: give a manifest (or a COCO JSON with data.format=coco)")
    path = Path(cfg.data.manifest)
    # one reader: JSON Lines, or a COCO JSON as weak labels (read_coco_as_manifest, detected);
    # data.images is the image root of either, whatever data.format says (as `predet data queries --images`)
    manifest = read_manifest(path, cfg.data.images)
    entries = [manifest.entries[i] for i in sample_indices(len(manifest.entries), cfg.data.max_images)]
    sampled = {} if len(entries) == len(manifest.entries) else {"manifest_images": len(manifest.entries)}
    if manifest.header.get("format") == "coco":
        return _from_entries(cfg, path, entries, None, sampled)
    if fmt == "coco":
        raise UserError(f"data.format=coco but data.manifest {path} is not a COCO JSON")
    return _from_entries(cfg, path, entries, _synonyms_for(cfg, path, entries), sampled)
