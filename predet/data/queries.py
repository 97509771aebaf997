"""Unsupervised query boxes (EdgeBoxes / selective search), computed once and cached (DESIGN §2, §4).

Cache layout (``predet data queries --out DIR``): ``DIR/queries-<shard>.npz`` with ``images`` (the
manifest's ``image`` strings), ``paths`` (resolved files), ``offsets`` (int64, ``len(images)+1``),
``boxes`` (float32 ``[total, 4]`` XYXY in original-image pixels, i.e. after EXIF rotation),
``scores`` (float32 ``[total]``), ``failed_images``/``failed_reasons``/``failed_paths``, ``entries`` (the ``image``
strings of every entry the shard was computed for, in order), ``params`` (the
:class:`QueryParams` as JSON); plus ``DIR/failed.jsonl``.
Shard ``k`` holds manifest entries ``[k * shard_size, (k + 1) * shard_size)``; rank ``r`` of a
torchrun launch computes the shards with ``k % WORLD_SIZE == r``; a finished shard file is skipped
on re-runs (resumable) when it was computed for the same entries with the same parameters, else it
is recomputed (a manifest with lines added or removed, another ``--shard-size``, ``--method``,
``--max-boxes``...), and shards numbered beyond the manifest's last are removed (their boxes and
failure records would be read with the cache). A shard written before ``entries`` / ``params``
were recorded counts as finished when its ``images`` and ``failed_images`` are the shard's entries.

EdgeBoxes needs an edge map and an orientation map. The structured-edge model cannot be shipped,
so the default edge map is the colour gradient magnitude (Gaussian-smoothed Sobel, max over
channels) thinned by non-maximum suppression along the gradient (EdgeBoxes on unthinned maps is
~50x slower); the orientation map is computed from the edge map as OpenCV's
``StructuredEdgeDetection.computeOrientation`` does. ``--edge-model FILE`` uses the real
structured-edge detector.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import struct
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import cv2
import numpy as np
import torch
from torchvision.ops import box_iou, nms

from predet.data.images import BadImage, draft_scale, load_image
from predet.data.manifest import Manifest, ManifestEntry
from predet.distributed import env_rank
from predet.errors import UserError
from predet.utils import atomic_write_text, folder_lock, remove_numbered

__all__ = [
    "QueryParams",
    "QueryCache",
    "BoxFiles",
    "check_opencv",
    "gradient_edges",
    "compute_queries",
    "write_query_file",
    "shard_covers",
    "cache_queries",
    "read_truth_boxes",
    "query_recall",
    "query_manifest",
]


@dataclass(frozen=True)
class QueryParams:
    """How query boxes are computed; sizes are in original-image pixels."""

    method: str = "edgeboxes"  # edgeboxes | selective_search
    max_boxes: int = 100  # M: top boxes kept per image
    max_side: int = 500  # long side for the computation (larger images are downscaled)
    min_side: int = 320  # smaller images are upscaled: EdgeBoxes misses objects under ~10 px
    nms: float = 0.5
    min_size: float = 0.02  # both sides at least this fraction of the image's long side
    max_aspect: float = 4.0  # max(w/h, h/w)
    edge_model: Optional[str] = None  # structured-edge model (.yml.gz); None = gradient edges


# --------------------------------------------------------------------------------------------
# Edge maps
# --------------------------------------------------------------------------------------------
def _orientation(edges: np.ndarray) -> np.ndarray:
    """Edge-normal orientation in [0, pi) from second derivatives of the smoothed edge map
    (the formula of ``StructuredEdgeDetection.computeOrientation``)."""
    e = cv2.GaussianBlur(edges, (0, 0), 2.0)
    ox = cv2.Sobel(e, cv2.CV_32F, 1, 0, ksize=3, scale=0.125)
    oy = cv2.Sobel(e, cv2.CV_32F, 0, 1, ksize=3, scale=0.125)
    oxx = cv2.Sobel(ox, cv2.CV_32F, 1, 0, ksize=3, scale=0.125)
    oxy = cv2.Sobel(ox, cv2.CV_32F, 0, 1, ksize=3, scale=0.125)
    oyy = cv2.Sobel(oy, cv2.CV_32F, 0, 1, ksize=3, scale=0.125)
    # oxx = -1e-5 (float32) divides by zero: arctan(+-inf) = +-pi/2 as in OpenCV's C++; 0/0 (no
    # curvature at all) has no orientation: 0
    with np.errstate(divide="ignore", invalid="ignore"):
        o = np.arctan(oyy * np.sign(-oxy) / (oxx + 1e-5))
    return np.mod(np.nan_to_num(o, nan=0.0), np.pi).astype(np.float32)


def _edge_nms(edges: np.ndarray, orient: np.ndarray, *, r: float = 1.0, m: float = 1.01, border: int = 2) -> np.ndarray:
    """Keep pixels that are maxima along the edge normal (``StructuredEdgeDetection.edgesNms``)."""
    h, w = edges.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = r * np.cos(orient), r * np.sin(orient)
    e0 = cv2.remap(edges, xs + dx, ys + dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    e1 = cv2.remap(edges, xs - dx, ys - dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    out = np.where((edges * m < e0) | (edges * m < e1), 0.0, edges).astype(np.float32)
    if border > 0:  # image borders are not object boundaries
        out[:border], out[-border:], out[:, :border], out[:, -border:] = 0, 0, 0, 0
    return out


def gradient_edges(
    rgb: np.ndarray, *, sigma: float = 1.5, percentile: float = 99.5, gamma: float = 2.0
) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 RGB -> thinned edge map (H, W) float32 in [0, 1] and orientation (H, W).

    Gradient magnitude of the smoothed colour image (channel with the largest response), divided by
    its ``percentile`` (contrast-invariant, like structured-edge probabilities) and raised to
    ``gamma``: squaring pushes weak texture gradients under EdgeBoxes' ``edgeMinMag`` (0.1), which
    measured 3-5x faster for a 0.01-0.04 loss of recall on the synthetic world.
    """
    x = cv2.GaussianBlur(rgb.astype(np.float32) * (1.0 / 255.0), (0, 0), sigma)
    gx = cv2.Sobel(x, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(x, cv2.CV_32F, 0, 1, ksize=3)
    mag = np.sqrt(gx * gx + gy * gy).max(axis=2)  # (H, W, 3) -> (H, W)
    hi = float(np.percentile(mag, percentile))
    edges = np.clip(mag / max(hi, 1e-6), 0.0, 1.0).astype(np.float32) ** gamma
    orient = _orientation(edges)
    return _edge_nms(edges, orient), orient


# --------------------------------------------------------------------------------------------
# Query boxes of one image
# --------------------------------------------------------------------------------------------
_STATE: dict = {}  # per-process detectors (OpenCV objects are not picklable)

# pip distributions that install a `cv2` without the contrib modules and shadow the contrib build
_PLAIN_OPENCV = ("opencv-python", "opencv-python-headless")


def check_opencv() -> None:
    """UserError unless ``cv2.ximgproc`` (opencv-contrib) is importable, naming the package that
    shadows it (a plain ``opencv-python`` pulled in by another package) and the fix."""
    from importlib import metadata

    if hasattr(cv2, "ximgproc") and hasattr(cv2.ximgproc, "createEdgeBoxes"):
        return
    installed = []
    for name in _PLAIN_OPENCV:
        try:
            installed.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    raise UserError(
        f"cv2 at {cv2.__file__} has no ximgproc (EdgeBoxes needs opencv-contrib)"
        + (f"; shadowed by {', '.join(installed)}" if installed else "")
        + ": pip uninstall -y opencv-python opencv-python-headless && "
        "pip install --force-reinstall --no-deps opencv-contrib-python-headless"
    )


def _edge_boxes(params: QueryParams) -> "cv2.ximgproc.EdgeBoxes":
    """A new EdgeBoxes object per image: OpenCV's keeps state between ``getBoundingBoxes``
    calls (the same image twice on one object gave 253, 293 and 286 boxes), which made an
    image's queries depend on the images its worker had processed before."""
    # alpha (window step) and beta (EdgeBoxes' own NMS) lowered from (0.65, 0.75): queries
    # are judged at IoU 0.5, and the coarser search is ~2x faster; our NMS 0.5 follows
    return cv2.ximgproc.createEdgeBoxes(
        alpha=0.5, beta=0.55, minScore=0.01, maxBoxes=max(4 * params.max_boxes, 200),
        maxAspectRatio=params.max_aspect, minBoxArea=100,
    )


def _structured_edges(rgb: np.ndarray, model: str) -> tuple[np.ndarray, np.ndarray]:
    key = ("sed", model)
    if key not in _STATE:
        _STATE[key] = cv2.ximgproc.createStructuredEdgeDetection(model)
    sed = _STATE[key]
    edges = sed.detectEdges(rgb.astype(np.float32) * (1.0 / 255.0))
    orient = sed.computeOrientation(edges)
    return sed.edgesNms(edges, orient), orient


def _raw_boxes(rgb: np.ndarray, params: QueryParams) -> tuple[np.ndarray, np.ndarray]:
    """Boxes XYWH and scores at the computation scale, before filtering."""
    if params.method == "edgeboxes":
        if params.edge_model:
            edges, orient = _structured_edges(rgb, params.edge_model)
        else:
            edges, orient = gradient_edges(rgb)
        boxes, scores = _edge_boxes(params).getBoundingBoxes(edges, orient)
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        scores = np.asarray(scores, np.float32).reshape(-1)
        return boxes, scores
    if params.method == "selective_search":
        ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
        ss.setBaseImage(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        ss.switchToSelectiveSearchFast()
        boxes = np.asarray(ss.process(), np.float32).reshape(-1, 4)
        # selective search ranks its boxes; the rank becomes a score in (0, 1]
        scores = 1.0 / (1.0 + np.arange(len(boxes), dtype=np.float32))
        return boxes, scores
    raise UserError(f"unknown query method '{params.method}' (edgeboxes | selective_search)")


def compute_queries(rgb: np.ndarray, params: QueryParams = QueryParams()) -> tuple[np.ndarray, np.ndarray]:
    """Query boxes of one image.

    Args:
        rgb: (H, W, 3) uint8 image (original resolution).
    Returns:
        boxes float32 (K, 4) XYXY in the image's pixels, scores float32 (K,), best first, K <= M;
        after NMS ``params.nms``, min-size and aspect filters.
    """
    h, w = rgb.shape[:2]
    long_side = max(h, w)
    scale = min(params.max_side, max(params.min_side, long_side)) / long_side
    small = rgb if scale == 1.0 else cv2.resize(
        rgb,
        (max(1, round(w * scale)), max(1, round(h * scale))),
        interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR,
    )
    xywh, scores = _raw_boxes(np.ascontiguousarray(small), params)
    boxes = torch.from_numpy(xywh).reshape(-1, 4)
    # XYWH at the computation scale -> XYXY in original pixels (clipped)
    sx, sy = w / small.shape[1], h / small.shape[0]
    boxes = torch.stack(
        [boxes[:, 0] * sx, boxes[:, 1] * sy, (boxes[:, 0] + boxes[:, 2]) * sx, (boxes[:, 1] + boxes[:, 3]) * sy], dim=1
    )
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    s = torch.from_numpy(scores).reshape(-1)
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    min_size = params.min_size * long_side
    keep = (bw >= min_size) & (bh >= min_size)
    keep &= torch.maximum(bw / bh.clamp(min=1e-6), bh / bw.clamp(min=1e-6)) <= params.max_aspect
    boxes, s = boxes[keep], s[keep]
    order = nms(boxes, s, params.nms)[: params.max_boxes]  # sorted by decreasing score
    return boxes[order].numpy().astype(np.float32), s[order].numpy().astype(np.float32)


# --------------------------------------------------------------------------------------------
# Cache files
# --------------------------------------------------------------------------------------------
def _concat(arrays: Sequence[np.ndarray], width: Optional[int]) -> np.ndarray:
    """Ragged float32 arrays -> one array, ``(total, width)`` or ``(total,)``; empty input too."""
    shape = (-1, width) if width else (-1,)
    parts = [np.asarray(a, np.float32).reshape(shape) for a in arrays]
    return np.concatenate(parts) if parts else np.zeros((0, width) if width else (0,), np.float32)


def write_query_file(
    path: str | os.PathLike,
    *,
    images: Sequence[str],
    paths: Sequence[str],
    boxes: Sequence[np.ndarray],
    scores: Sequence[np.ndarray],
    failed: Sequence[tuple[str, str]] = (),
    failed_paths: Optional[Sequence[str]] = None,
    entries: Optional[Sequence[str]] = None,
    params: Optional[QueryParams] = None,
) -> None:
    """Write one cache shard atomically (temp file + rename). ``failed``: ``(image, reason)`` of
    the unreadable ones, ``failed_paths`` their resolved paths (so that a manifest naming the same
    files by other strings finds them, as ``paths`` does for the boxes); ``entries``: the manifest
    strings the shard was computed for, in order (default: ``images`` then the failed ones);
    ``params``: how its boxes were computed (recorded, when given, for :func:`shard_covers`)."""
    path = Path(path)
    if entries is None:
        entries = [*images, *(f[0] for f in failed)]
    counts = np.array([len(b) for b in boxes], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
    np.savez(
        tmp,
        images=np.array(images, dtype=np.str_),
        paths=np.array(paths, dtype=np.str_),
        offsets=offsets,
        boxes=_concat(boxes, 4),
        scores=_concat(scores, None),
        failed_images=np.array([f[0] for f in failed], dtype=np.str_),
        failed_reasons=np.array([f[1] for f in failed], dtype=np.str_),
        failed_paths=np.array(list(failed_paths or []), dtype=np.str_),
        entries=np.array(list(entries), dtype=np.str_),
        **({} if params is None else {"params": np.array(params_record(params), dtype=np.str_)}),
    )
    os.replace(tmp, path)


def params_record(params: QueryParams) -> str:
    """The parameters of a query computation as a canonical JSON string (stored in each shard)."""
    return json.dumps(asdict(params), sort_keys=True)


def shard_covers(path: str | os.PathLike, images: Sequence[str], params: Optional[QueryParams] = None) -> bool:
    """Whether the cache shard ``path`` exists and was computed for exactly ``images`` (manifest
    strings, in order; a shard without the ``entries`` record: as a multiset of its images and
    failed images) and, when ``params`` is given and the shard recorded its own, with those
    parameters. An unreadable file does not cover anything."""
    try:
        with np.load(path) as z:
            if params is not None and "params" in z.files and str(z["params"]) != params_record(params):
                return False
            if "entries" in z.files:
                return z["entries"].tolist() == list(images)
            return sorted(z["images"].tolist() + z["failed_images"].tolist()) == sorted(images)
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return False


def _stored_member(path: Path, zf: zipfile.ZipFile, name: str) -> Optional[tuple[int, tuple, np.dtype, bool]]:
    """``(byte offset, shape, dtype, fortran order)`` of the ``.npy`` member ``name`` of the npz
    file ``path`` when it is stored uncompressed (``np.savez``), so that it can be memory-mapped
    in place; None when it is compressed (``np.savez_compressed``)."""
    info = zf.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        head = f.read(30)  # the zip local file header: its name and extra field come next
        if head[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        return f.tell(), shape, dtype, fortran


class BoxFiles:
    """The boxes and scores of a query cache's files, memory-mapped in place (``np.savez``
    writes the npz members uncompressed): every loader worker and every rank on a node reads the
    same pages of the OS's file cache, none holds a copy. A compressed member (a cache written
    with ``np.savez_compressed``) is read into memory instead. Pickles as the file list: a
    ``spawn`` worker maps the files again."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = [Path(f) for f in files]
        self._arrays: Optional[list[tuple[np.ndarray, np.ndarray]]] = None

    def __getstate__(self) -> dict:
        return {"files": self.files, "_arrays": None}

    def _open(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        out = []
        with zipfile.ZipFile(path) as zf:
            for name, width in (("boxes", (4,)), ("scores", ())):
                spec = _stored_member(path, zf, name)
                if spec is None or spec[2] != np.float32 or spec[3]:
                    with np.load(path) as z:
                        out.append(np.ascontiguousarray(z[name], np.float32).reshape(-1, *width))
                elif int(np.prod(spec[1])) == 0:
                    out.append(np.zeros((0, *width), np.float32))
                else:
                    out.append(np.memmap(path, np.float32, "r", offset=spec[0], shape=spec[1]))
        return out[0], out[1]

    @property
    def arrays(self) -> list[tuple[np.ndarray, np.ndarray]]:
        if self._arrays is None:
            self._arrays = [self._open(f) for f in self.files]
        return self._arrays

    def get(self, k: int, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Boxes ``(b - a, 4)`` and scores ``(b - a,)`` of file ``k``, rows ``a:b`` (copies)."""
        boxes, scores = self.arrays[k]
        return np.array(boxes[a:b], np.float32), np.array(scores[a:b], np.float32)


class QueryCache:
    """Reader of a query cache folder; looks images up by manifest string or resolved path.

    ``cache.get(image, path)`` -> ``(boxes (K, 4) float32, scores (K,))`` or None when the cache
    does not hold the image; ``cache.failed`` maps unreadable images to the reason.
    Memory: the boxes are memory-mapped (:class:`BoxFiles`); the index holds 64-bit keys of the
    image strings and paths (:func:`~predet.data.vocab.file_key`) with each image's rows, about 64
    bytes per image; the failed images are a dict.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UserError(f"query cache folder not found: {self.folder} (run `predet data queries`)")
        files = sorted(self.folder.glob("queries-*.npz"))
        if not files:
            raise UserError(f"{self.folder}: no queries-*.npz files (run `predet data queries --out {self.folder}`)")
        self.box_files = BoxFiles(files)
        self.failed: dict[str, str] = {}
        parts = [self._read_index(k, f) for k, f in enumerate(files)]
        self._build_index(parts)
        try:
            self.box_files.arrays  # noqa: B018  (mapped now: a bad member is an error here, not in a worker)
        except (OSError, KeyError, ValueError) as e:
            raise UserError(f"{self.folder}: not a query cache ({type(e).__name__}: {e})") from None

    def _read_index(self, k: int, f: Path) -> tuple[np.ndarray, np.ndarray]:
        """Keys ``(2n,)`` (image, path of each row) and rows ``(2n, 3)`` (file, start, stop) of file
        ``k``; records its failed images."""
        from predet.data.vocab import file_key

        try:
            with np.load(f) as z:
                off = z["offsets"].astype(np.int64)
                images, paths = z["images"].tolist(), z["paths"].tolist()
                for im, reason in zip(z["failed_images"].tolist(), z["failed_reasons"].tolist()):
                    self.failed[im] = reason
                # by resolved path too (shards written before failed_paths existed have none)
                failed_paths = z["failed_paths"].tolist() if "failed_paths" in z.files else []
                for p, reason in zip(failed_paths, z["failed_reasons"].tolist()):
                    self.failed[p] = reason
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
            raise UserError(f"{f}: not a query cache file ({type(e).__name__}: {e})") from None
        if len(off) != len(images) + 1 or len(paths) != len(images):
            raise UserError(f"{f}: not a query cache file (offsets/images/paths lengths disagree)")
        keys = np.array([[file_key(im), file_key(p)] for im, p in zip(images, paths)], np.uint64).reshape(-1)
        rows = np.stack([np.full(len(images), k), off[:-1], off[1:]], axis=1).astype(np.int64)
        return keys, np.repeat(rows, 2, axis=0)

    def _build_index(self, parts: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Sorted unique keys; a key seen twice keeps its last rows (as a dict filled in order)."""
        keys = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.uint64)
        rows = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, 3), np.int64)
        order = np.argsort(keys, kind="stable")
        keys, rows = keys[order], rows[order]
        last = np.ones(len(keys), bool)
        last[:-1] = keys[1:] != keys[:-1]
        self._keys, self._rows = keys[last], rows[last]
        self._num_images = len(keys) // 2

    def __len__(self) -> int:
        return sum(len(s) for _, s in self.box_files.arrays)

    def _find(self, key: int) -> Optional[tuple[int, int, int]]:
        i = int(np.searchsorted(self._keys, np.uint64(key)))
        if i < len(self._keys) and int(self._keys[i]) == key:
            k, a, b = self._rows[i].tolist()
            return k, a, b
        return None

    def locate(self, image: str, path: Optional[str | os.PathLike] = None) -> Optional[tuple[int, int, int]]:
        """``(file, start, stop)`` of ``image``'s rows in :attr:`box_files`, or None."""
        from predet.data.vocab import file_key

        hit = self._find(file_key(image))
        if hit is None and path is not None:
            hit = self._find(file_key(str(Path(path).resolve())))
        return hit

    def get(self, image: str, path: Optional[str | os.PathLike] = None) -> Optional[tuple[np.ndarray, np.ndarray]]:
        hit = self.locate(image, path)
        return None if hit is None else self.box_files.get(*hit)

    def failed_reason(self, image: str, path: Optional[str | os.PathLike] = None) -> Optional[str]:
        """Why ``image`` (a manifest string; or the file at ``path``) could not be read when the
        cache was computed; None when it was not among the unreadable ones."""
        if not self.failed:  # the common case: no path to resolve
            return None
        reason = self.failed.get(image)
        if reason is None and path is not None:
            reason = self.failed.get(str(Path(path).resolve()))
        return reason

    def is_failed(self, image: str, path: Optional[str | os.PathLike] = None) -> bool:
        return self.failed_reason(image, path) is not None


# --------------------------------------------------------------------------------------------
# Caching a manifest
# --------------------------------------------------------------------------------------------
def _process_one(job: tuple[str, str, QueryParams]) -> tuple[str, Optional[np.ndarray], Optional[np.ndarray], str]:
    image, path, params = job
    try:
        # a large JPEG is decoded at 1/2..1/8 scale by libjpeg as long as its short side stays
        # >= max_side (so the long side does too): the computation never needs more pixels
        img, full = load_image(path, draft_short_side=params.max_side)
        boxes, scores = compute_queries(np.asarray(img), params)
        if img.size != full:  # back to the full-resolution pixel frame of the cache
            # (a draft image's last pixel column / row may reach past the full image's edge)
            boxes = np.minimum(boxes / np.float32(draft_scale(img.size, full)), np.array([*full, *full], np.float32))
        return image, boxes, scores, ""
    except BadImage as e:
        return image, None, None, e.reason
    except cv2.error as e:  # an OpenCV failure on one odd image is that image's problem
        return image, None, None, f"query computation failed: {str(e).strip().splitlines()[-1]}"


def _init_worker() -> None:
    # one process per core: no nested thread pools. OpenCV's pool is set to one thread in the
    # parent before the fork (calling cv2.setNumThreads in a forked child can deadlock on the
    # copied pool lock); torch's is set here.
    torch.set_num_threads(1)


def _shard_jobs(entries: Sequence[ManifestEntry], shard_size: int) -> list[tuple[int, list[ManifestEntry]]]:
    return [(k, list(entries[a : a + shard_size])) for k, a in enumerate(range(0, len(entries), shard_size))]


def _merge_failed(out: Path) -> int:
    """Rewrite ``failed.jsonl`` from every finished shard (any rank may finish last)."""
    lines = []
    for f in sorted(out.glob("queries-*.npz")):
        with np.load(f) as z:
            for im, reason in zip(z["failed_images"].tolist(), z["failed_reasons"].tolist()):
                lines.append(json.dumps({"image": im, "reason": reason}))
    atomic_write_text(out / "failed.jsonl", "".join(line + "\n" for line in lines))
    return len(lines)


def cache_queries(
    entries: Sequence[ManifestEntry],
    out: str | os.PathLike,
    params: QueryParams = QueryParams(),
    *,
    workers: int = 1,
    shard_size: int = 1000,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> dict[str, int]:
    """Compute and write this rank's missing or stale shards (:func:`shard_covers`). Returns
    counts (images done, failed, boxes, shards skipped and recomputed, and on rank 0 shards
    removed beyond the manifest's last)."""
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards = [(k, es) for k, es in _shard_jobs(entries, shard_size) if k % world_size == rank]
    todo, stale = [], 0
    for k, es in shards:
        path = out / f"queries-{k:06d}.npz"
        if path.exists() and shard_covers(path, [e.image for e in es], params):
            continue
        if path.exists():
            stale += 1
            print(f"{path}: computed for other images than the manifest's entries {k * shard_size}.."
                  f"{k * shard_size + len(es) - 1} or with other parameters (the manifest, --shard-size or "
                  "a query option changed): recomputing it", flush=True)  # fmt: skip
        todo.append((k, es))
    counts = {"images": 0, "failed": 0, "boxes": 0, "shards_skipped": len(shards) - len(todo),
              "shards_recomputed": stale}  # fmt: skip
    total = sum(len(es) for _, es in todo)
    bar = tqdm(total=total, desc=f"queries (rank {rank})", unit="img", disable=None if progress and total else True, mininterval=2.0)
    cv2.setNumThreads(1)  # before any fork, see _init_worker
    pool = mp.get_context("fork" if hasattr(os, "fork") else "spawn").Pool(workers, _init_worker) if workers > 1 else None
    try:
        for k, es in todo:
            jobs = [(e.image, str(e.path), params) for e in es]
            results: Iterable = pool.imap(_process_one, jobs, chunksize=4) if pool else map(_process_one, jobs)
            images, paths, boxes, scores, failed, failed_paths = [], [], [], [], [], []
            for e, (image, b, s, reason) in zip(es, results):
                bar.update(1)
                if b is None:
                    failed.append((image, reason))
                    failed_paths.append(str(e.path.resolve()))
                    continue
                images.append(image)
                paths.append(str(e.path.resolve()))
                boxes.append(b)
                scores.append(s)
            write_query_file(out / f"queries-{k:06d}.npz", images=images, paths=paths, boxes=boxes, scores=scores,
                             failed=failed, failed_paths=failed_paths, entries=[e.image for e in es],
                             params=params)  # fmt: skip
            counts["images"] += len(images)
            counts["failed"] += len(failed)
            counts["boxes"] += sum(len(b) for b in boxes)
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    with folder_lock(out, ".merge.lock"):  # ranks take turns: the last to finish reads every shard
        if rank == 0:
            n_shards = -(-len(entries) // shard_size)
            counts["shards_removed"] = remove_numbered(out, "queries-", keep=n_shards, what="query shards")
        _merge_failed(out)
    return counts


def read_truth_boxes(truth: str | os.PathLike) -> list[tuple[str, np.ndarray]]:
    """``(image, boxes float32 [K, 4])`` of each line of a ``truth.jsonl`` (``{"image", "boxes"}``);
    UserError naming ``file:line`` for a line that is not UTF-8 JSON, lacks ``image`` or has a box
    that is not 4 numbers."""
    out = []
    with open(truth, "rb") as f:
        for lineno, data in enumerate(f, start=1):
            where = f"{truth}:{lineno}"
            try:
                rec = json.loads(data.decode("utf-8")) if data.strip() else None
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise UserError(f"{where}: not a UTF-8 JSON line ({type(e).__name__}: {e})") from None
            if rec is None:
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
                raise UserError(f"{where}: expected a JSON object with an 'image' string")
            bad = UserError(f"{where}: 'boxes' must be a list of [x1, y1, x2, y2] boxes, got "
                            f"{json.dumps(rec.get('boxes'))[:60]}")  # fmt: skip
            try:
                boxes = np.asarray(rec.get("boxes", []), dtype=np.float32)
            except (TypeError, ValueError):
                raise bad from None
            if boxes.size == 0:
                boxes = boxes.reshape(0, 4)
            if boxes.ndim != 2 or boxes.shape[1] != 4 or not np.isfinite(boxes).all():
                raise bad
            out.append((rec["image"], boxes))
    return out


def query_recall(cache: QueryCache, truth: str | os.PathLike, *, iou: float = 0.5, top: int = 100) -> tuple[float, int]:
    """Fraction of true boxes (``truth.jsonl``: ``{"image", "boxes"}``) that have a cached query
    with IoU >= ``iou`` among the first ``top``; returns (recall, number of true boxes)."""
    hit = n = 0
    for image, boxes in read_truth_boxes(truth):
        gt = torch.from_numpy(boxes)
        got = cache.get(image)
        if gt.numel() == 0 or got is None:
            n += len(gt)
            continue
        q = torch.from_numpy(got[0][:top]).reshape(-1, 4)
        n += len(gt)
        if len(q):
            hit += int((box_iou(gt, q).max(dim=1).values >= iou).sum())
    return (hit / n if n else math.nan), n


def query_manifest(
    manifest: Manifest,
    out: str | os.PathLike,
    params: QueryParams,
    *,
    workers: Optional[int] = None,
    shard_size: int = 1000,
) -> dict:
    """:func:`cache_queries` of a manifest's images into ``out``, this process's share under
    torchrun (``RANK``/``WORLD_SIZE``), with ``workers`` processes (default: the node's cores shared
    by its torchrun processes). Prints one summary line per rank, the first failed images and, where
    ``truth.jsonl`` lies beside the manifest (one process only), the query recall. Returns the counts."""
    rank, world = env_rank()
    truth = manifest.path.parent / "truth.jsonl"
    if truth.is_file() and world == 1:
        read_truth_boxes(truth)  # a malformed line is an error now, not after the long work
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # the node's cores shared by its torchrun processes
    workers = max(1, workers or cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    t0 = time.perf_counter()
    counts = cache_queries(
        manifest.entries, out, params, workers=workers, shard_size=shard_size,
        rank=rank, world_size=world, progress=True,
    )  # fmt: skip
    dt = time.perf_counter() - t0
    out = Path(out)
    rate = counts["images"] / dt if counts["images"] else 0.0
    print(
        f"rank {rank}/{world}: {counts['images']} images, {counts['boxes']} boxes "
        f"({counts['boxes'] / max(counts['images'], 1):.1f}/image), {counts['failed']} failed, "
        f"{counts['shards_skipped']} finished shards skipped"
        + (f", {counts['shards_recomputed']} stale ones recomputed" if counts["shards_recomputed"] else "")
        + f"; {rate:.2f} images/s with {workers} workers"
    )
    failed_path = out / "failed.jsonl"
    if failed_path.exists() and failed_path.stat().st_size:
        for line in failed_path.read_text().splitlines()[:10]:
            rec = json.loads(line)
            print(f"  failed: {rec['image']}: {rec['reason']}")
    if truth.is_file() and world == 1:
        recall, n = query_recall(QueryCache(out), truth, iou=0.5, top=params.max_boxes)
        print(f"query recall vs {truth.name}: {recall:.3f} of {n} true boxes have a query with IoU >= 0.5 (top {params.max_boxes})")
    return counts
