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
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from predet.data.compact import (
    NO_QUERIES,
    ImageQueries,
    Ragged,
    StringArray,
    StringArrayBuilder,
    offsets_of,
)
from predet.data.heldout import HeldOutSet, build_heldout_set, heldout_indices
from predet.data.images import BadImage, decode_image, draft_scale, load_image
from predet.data.manifest import (
    ManifestEntry,
    count_entries,
    is_coco,
    iter_manifest,
    read_coco_as_manifest,
    sample_indices,
)  # fmt: skip
from predet.data.queries import QueryCache
from predet.data.shard_stream import ShardReader
from predet.data.transforms import TwoViewTransform, sample_seed
from predet.data.vocab import (
    ClassCounter,
    LabelResolver,
    Vocab,
    build_vocab,
    file_key,
    load_synonyms,
)
from predet.errors import UserError

__all__ = [
    "PretrainData", "WeakLabelDataset", "ShardDataset", "build_pretrain_data", "collate_two_view",
    "draft_side", "manifest_vocab",
]  # fmt: skip

log = logging.getLogger(__name__)
INLINE = -2  # a scanned image's query source while building: the manifest line's own boxes


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
        # a shard stream's position once this batch is taken (popped by BatchStream)
        **({"stream_state": samples[-1]["stream_state"]} if "stream_state" in samples[-1] else {}),
    }


class WeakLabelDataset(Dataset):
    """Map-style dataset of images with class indices and query boxes (original-image pixels).

    Per image it holds flat arrays only (:mod:`predet.data.compact`): the path's bytes, its class
    indices and one ``(source, start, stop)`` row into the memory-mapped query cache.

    Args:
        paths: image files.
        labels: per image, class indices.
        queries: per image, the rows of its query boxes.
        num_classes: K, the width of the multi-hot label.
        transform: the two-view transform.
        seed: base seed of the per-item generators.
    """

    def __init__(
        self,
        *,
        paths: StringArray,
        labels: Ragged,
        queries: ImageQueries,
        num_classes: int,
        transform: TwoViewTransform,
        seed: int = 0,
    ) -> None:
        if not (len(paths) == len(labels) == len(queries)):
            raise ValueError("paths, labels and queries must have the same length")
        self.paths, self.labels, self.queries = paths, labels, queries
        self.num_classes = int(num_classes)
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self.num_skipped = 0  # unreadable images met by this process
        self.bad: dict[int, str] = {}  # index -> reason, this process
        self._draft = draft_side(transform)
        _init_cv2_threads()  # in the parent, before workers fork

    @classmethod
    def from_lists(
        cls, *, paths: Sequence[str | Path], labels: Sequence[Sequence[int]], queries: Sequence[np.ndarray], **kwargs: Any
    ) -> "WeakLabelDataset":
        """From per-image lists (small sets, tests): boxes ``queries[i]`` float32 ``(K_i, 4)``."""
        counts = np.array([len(q) for q in queries], np.int64)
        ends = np.cumsum(counts)
        rows = np.stack([np.zeros_like(counts), ends - counts, ends], axis=1).astype(np.int64)
        inline = np.concatenate([np.asarray(q, np.float32).reshape(-1, 4) for q in queries]) if len(queries) else np.zeros((0, 4), np.float32)
        return cls(paths=StringArray.from_strings(str(p) for p in paths), labels=Ragged.from_lists(labels),
                   queries=ImageQueries(rows, None, inline), **kwargs)  # fmt: skip

    @property
    def nbytes(self) -> int:
        """Bytes of per-image state this process holds (the mapped query cache is shared)."""
        return self.paths.nbytes + self.labels.nbytes + self.queries.nbytes

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def labels_of(self, index: int) -> torch.Tensor:
        """Multi-hot float ``(K,)`` of item ``index``."""
        y = torch.zeros(self.num_classes)
        y[torch.from_numpy(self.labels[index].astype(np.int64))] = 1.0
        return y

    def queries_of(self, index: int) -> np.ndarray:
        """Query boxes float32 ``(K, 4)`` XYXY of item ``index``, original-image pixels."""
        return self.queries[index]

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
    y2], ...]}``, boxes in the stored image's pixels). Every (rank, worker) is one stream of a
    :class:`~predet.data.shard_stream.ShardReader` (resampled: its own seeded shard draws; one
    pass: its share of the shards). Each sample carries ``stream_state`` (the stream's id and
    :class:`~predet.data.shard_stream.ReaderState` once it is taken): :meth:`resume` with the
    states of the last batches each stream gave continues every stream exactly there.
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
        self.states: dict[int, dict] = {}  # stream -> ReaderState dict to resume from
        self.rotate = 0
        _init_cv2_threads()  # in the parent, before workers fork

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume(self, states: dict[int, dict], rotate: int = 0) -> None:
        """Streams continue from ``states`` (by stream id; a stream absent starts afresh). Loader
        worker ``w`` plays stream ``(w + rotate) % workers`` of its rank: a loader hands out its
        workers' batches in turn starting at worker 0, so after ``b`` batches ``rotate = b %
        workers`` makes the worker that would have given batch ``b`` give it first."""
        self.states, self.rotate = {int(k): v for k, v in states.items()}, int(rotate)

    def _stream(self) -> tuple[int, int]:
        from predet.distributed import rank, world_size

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = (worker + self.rotate) % workers
        return rank() * workers + reader, world_size() * workers  # this (node, worker)'s place among all readers

    def _decode(self, sample: dict) -> Optional[tuple[Any, dict]]:
        """(image, meta) of a raw sample; None (warned, counted) when it cannot be read."""
        key = sample.get("__key__", "?")
        try:
            meta = json.loads(sample["json"])
            img, _ = decode_image(sample["jpg"], name=f"{sample.get('__url__', '?')}:{key}")
            return img, meta
        except (BadImage, KeyError, json.JSONDecodeError, UnicodeDecodeError) as e:
            log.warning("skipping unreadable shard sample %s:%s (%s)", sample.get("__url__", "?"), key, e)
            self.num_skipped += 1
            return None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        _init_cv2_threads()
        stream, streams = self._stream()
        stream_seed = sample_seed(self.seed, self.epoch, stream)
        reader = ShardReader(self.urls, seed=stream_seed, stream=stream, streams=streams, resampled=self.resampled,
                             shuffle=self.shuffle, state=self.states.get(stream))  # fmt: skip
        skipped = 0
        for sample, state in reader:
            decoded = self._decode(sample)
            if decoded is None:
                skipped += 1
                continue
            img, meta = decoded
            boxes = np.asarray(meta.get("queries", []), np.float32).reshape(-1, 4)
            seed = sample_seed(self.seed, self.epoch, (state["picks"] - 1) * streams + stream)
            out = self.transform(img, boxes, generator=torch.Generator().manual_seed(seed))
            y = torch.zeros(len(self.classes))
            idx = [self.class_index[c] for c in meta.get("labels", []) if c in self.class_index]
            y[idx] = 1.0
            out["labels"] = y
            out["seed"] = seed
            out["skipped"] = skipped
            out["stream_state"] = {"stream": stream, **state}
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


class _ManifestScan:
    """One streamed pass over a manifest's entries into flat arrays (:mod:`predet.data.compact`):
    the ``data.max_images`` sample only, its held-out slice aside, each image's path, raw classes
    and query rows; the classes' distinct images counted as ``predet data vocab`` does. Memory:
    about 100 bytes per image plus the path, never a Python object per image."""

    def __init__(self, cfg: Any, path: Path, n: int, synonyms: Optional[dict]) -> None:
        self.cfg, self.path, self.synonyms = cfg, path, synonyms
        self.cache = QueryCache(cfg.data.queries) if cfg.data.queries else None
        self.selected = np.zeros(n, bool)
        self.selected[sample_indices(n, cfg.data.max_images)] = True
        self.num_selected = int(self.selected.sum())
        self.held = np.zeros(self.num_selected, bool)
        self.held[heldout_indices(self.num_selected, cfg.data.heldout)] = True
        self.resolver = LabelResolver(synonyms)
        self.counter, self.class_ids = ClassCounter(), {}
        self.paths = StringArrayBuilder()
        self.raw, self.raw_counts = array("i"), array("q")
        self.rows, self.failed, self.inline = array("q"), bytearray(), array("f")
        self.held_entries: list[tuple[str, str, list[str]]] = []
        self.seen = 0

    def _classes(self, e: ManifestEntry) -> list[str]:
        if e.labels is None and self.synonyms is None:  # the first line with tags only needs the file
            self.synonyms = _load_synonyms_for(self.cfg, self.path)
            self.resolver = LabelResolver(self.synonyms)
        return self.resolver(e)

    def add(self, i: int, e: ManifestEntry) -> None:
        if i >= len(self.selected):
            raise UserError(f"{self.path}: changed while being read (more lines than counted)")
        if not self.selected[i]:
            return
        j, self.seen = self.seen, self.seen + 1
        classes = self._classes(e)
        self.counter.add(classes, file_key(e.path))
        if self.held[j]:
            self.held_entries.append((e.image, str(e.path), classes))  # scored by cls_map, never trained on
            return
        self.paths.append(str(e.path))
        n = len(self.raw)
        self.raw.extend(self.class_ids.setdefault(c, len(self.class_ids)) for c in classes)
        self.raw_counts.append(len(self.raw) - n)
        self._add_queries(e)

    def _add_queries(self, e: ManifestEntry) -> None:
        failed, row = False, (NO_QUERIES, 0, 0)
        if e.queries is not None:
            a = len(self.inline) // 4
            self.inline.extend(e.queries.reshape(-1).astype(np.float32).tolist())
            row = (INLINE, a, a + len(e.queries))
        elif self.cache is not None and self.cache.is_failed(e.image, e.path):
            failed = True
        elif self.cache is not None:
            row = self.cache.locate(e.image, e.path) or row
        self.rows.extend(row)
        self.failed.append(failed)

    def finish(self) -> PretrainData:
        if self.seen != self.num_selected:
            raise UserError(f"{self.path}: changed while being read (fewer lines than counted)")
        cfg = self.cfg
        kept, counts_, dropped = self.counter.split(cfg.data.min_images)
        if not kept:
            raise UserError(f"{self.path}: no class has >= {cfg.data.min_images} images (data.min_images)")
        if self.cache is None and not len(self.inline) and not self._any_inline():
            raise UserError(
                f"{self.path}: no query boxes: set data.queries to a cache made by "
                f"`predet data queries --manifest {self.path} --out DIR`, or add 'queries' to the manifest lines"
            )
        labels, queries = self._arrays(kept)
        has_class = np.diff(labels.offsets) > 0
        failed = np.frombuffer(bytes(self.failed), np.uint8).astype(bool)
        used = has_class & ~failed
        counts = {"images": self.num_selected, "no_class": int((~has_class).sum()),
                  "excluded_unreadable": int((has_class & failed).sum()),
                  "without_queries": int((used & (queries.rows[:, 2] == queries.rows[:, 1])).sum())}  # fmt: skip
        if not used.any():
            raise UserError(f"{self.path}: no usable image (counts: {counts})")
        counts["used"], counts["heldout"] = int(used.sum()), len(self.held_entries)
        return self._data(kept, self.paths.build().select(used), labels.select(used), queries.select(used), counts)

    def _any_inline(self) -> bool:
        rows = np.frombuffer(self.rows, np.int64).reshape(-1, 3)
        return bool((rows[:, 0] == INLINE).any())

    def _arrays(self, kept: list[str]) -> tuple[Ragged, ImageQueries]:
        """Each image's kept class indices (ascending, as the sorted names) and query rows."""
        lut = np.full(max(len(self.class_ids), 1), -1, np.int32)
        index = {c: k for k, c in enumerate(kept)}
        for c, r in self.class_ids.items():
            lut[r] = index.get(c, -1)
        raw = lut[np.frombuffer(self.raw, np.int32)]
        raw_counts = np.frombuffer(self.raw_counts, np.int64)
        owner = np.repeat(np.arange(len(raw_counts)), raw_counts)
        keep = raw >= 0
        labels = Ragged(raw[keep].astype(np.int32), offsets_of(np.bincount(owner[keep], minlength=len(raw_counts))))
        rows = np.frombuffer(self.rows, np.int64).reshape(-1, 3).copy()
        files = self.cache.box_files if self.cache is not None else None
        rows[rows[:, 0] == INLINE, 0] = len(files.files) if files is not None else 0
        inline = np.frombuffer(self.inline, np.float32).reshape(-1, 4).copy()
        return labels, ImageQueries(rows, files, inline)

    def _data(self, kept: list[str], paths: StringArray, labels: Ragged, queries: ImageQueries,
              counts: dict[str, int]) -> PretrainData:  # fmt: skip
        cfg = self.cfg
        transform = TwoViewTransform.from_config(cfg.data.aug, cfg.model.input_size)
        dataset = WeakLabelDataset(paths=paths, labels=labels, queries=queries, num_classes=len(kept),
                                   transform=transform, seed=cfg.seed)  # fmt: skip
        collate = functools.partial(collate_two_view, num_queries=cfg.data.queries_per_image)
        held = self.held_entries
        if len(self.selected) != self.num_selected:
            counts = {"manifest_images": len(self.selected), **counts}
        return PretrainData(
            dataset=dataset, classes=kept, collate_fn=collate, counts=counts,
            heldout=build_heldout_set(self.path, [h[0] for h in held], [h[1] for h in held],
                                      [h[2] for h in held], kept),
        )  # fmt: skip


def _load_synonyms_for(cfg: Any, manifest_path: Path) -> dict:
    path = Path(cfg.data.synonyms) if cfg.data.synonyms else manifest_path.parent / "synonyms.json"
    if not path.is_file():
        raise UserError(
            f"{manifest_path}: lines carry tags but no labels, and no synonyms file was found at {path} "
            "(set data.synonyms or run `predet data vocab`)"
        )
    return load_synonyms(path)


def _from_manifest(cfg: Any, path: Path) -> PretrainData:
    """The pre-training data of a JSONL manifest or COCO JSON (``data.images``: the image root of
    either, whatever data.format says, as `predet data queries --images`), streamed."""
    if not path.is_file():
        raise UserError(f"manifest not found: {path}")
    if is_coco(path):
        entries: Iterable[ManifestEntry] = read_coco_as_manifest(path, cfg.data.images).entries
        n, synonyms = len(entries), {}  # type: ignore[arg-type]
    elif cfg.data.format == "coco":
        raise UserError(f"data.format=coco but data.manifest {path} is not a COCO JSON")
    else:
        n, entries, synonyms = count_entries(path), iter_manifest(path, cfg.data.images), None
    if n == 0:
        raise UserError(f"{path}: manifest has no images")
    scan = _ManifestScan(cfg, path, n, synonyms)
    for i, e in enumerate(entries):
        scan.add(i, e)
    return scan.finish()


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
    return _from_manifest(cfg, Path(cfg.data.manifest))
