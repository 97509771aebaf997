"""``predet bench data``: query-box throughput and two-view loading throughput, per stage.

Everything runs in this one process with one thread (OpenCV and torch), so the figures are *per
core* (queries) and *per data-loader worker* (two-view samples). Images: scikit-image's sample
photographs resized to 640x480 JPEGs (or ``--manifest``'s images), views of ``--size`` px.
The baseline is a plain ``torchvision.transforms.v2`` MoCo-v2 pipeline on uint8 tensors
(kernel-23 blur) run on the same images side by side. The last line is machine-readable::

    query_img_s=<float> two_view_s=<float> tv2_two_view_s=<float> speedup=<float> valid_frac=<float>
"""

from __future__ import annotations

import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import cv2
import numpy as np
import torch
from PIL import Image

from predet.data.color import _jitter_uint8, blur_radius
from predet.data.datasets import draft_side
from predet.data.images import BadImage, draft_scale, load_image
from predet.data.manifest import read_manifest
from predet.data.queries import QueryParams, _edge_boxes, compute_queries, gradient_edges
from predet.data.transforms import TwoViewTransform, sample_seed
from predet.errors import UserError

__all__ = ["bench_data"]

_SAMPLES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


class _Timer:
    def __init__(self) -> None:
        self.total: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.total[name] = self.total.get(name, 0.0) + time.perf_counter() - t0

    def report(self, n: int, title: str) -> float:
        """Print ms per item per stage; returns the total ms per item."""
        total = sum(self.total.values())
        print(f"{title}: {1000 * total / n:.1f} ms/item")
        for name, t in self.total.items():
            print(f"  {name:<22} {1000 * t / n:7.2f} ms  {100 * t / max(total, 1e-12):5.1f}%")
        return 1000 * total / n


def _sample_images(folder: Path, n: int) -> list[Path]:
    from skimage import data

    paths = []
    for k, name in enumerate(_SAMPLES):
        img = Image.fromarray(getattr(data, name)()).convert("RGB").resize((640, 480), Image.BICUBIC)
        p = folder / f"{k:02d}_{name}.jpg"
        img.save(p, quality=90)
        paths.append(p)
    return [paths[i % len(paths)] for i in range(n)]


def _bench_queries(paths: list[Path], params: QueryParams) -> tuple[float, list[np.ndarray]]:
    """Decode + resize to 480 px long side + EdgeBoxes, per stage; returns (images/s, boxes)."""
    timer, boxes = _Timer(), []
    eb = _edge_boxes(params)
    for p in paths:
        with timer("decode"):
            rgb = np.asarray(load_image(p)[0])
        with timer("resize to 480"):
            h, w = rgb.shape[:2]
            s = 480 / max(h, w)
            rgb = cv2.resize(rgb, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
        with timer("edges + nms + orient"):
            edges, orient = gradient_edges(rgb)
        with timer("edgeboxes"):
            eb.getBoundingBoxes(edges, orient)
    ms = timer.report(len(paths), "query stages (one core, 480 px long side)")
    # the shipped function end to end (includes its own resize and filters)
    t0 = time.perf_counter()
    for p in paths:
        rgb = np.asarray(load_image(p)[0])
        h, w = rgb.shape[:2]
        s = 480 / max(h, w)
        rgb = cv2.resize(rgb, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
        b, _ = compute_queries(rgb, params)
        boxes.append(b / s)  # back to the file's pixels
    rate = len(paths) / (time.perf_counter() - t0)
    print(f"compute_queries end to end: {rate:.2f} images/s per core ({1000 / rate:.0f} ms; stages {ms:.0f} ms)")
    return rate, boxes


def _bench_two_view(
    paths: list[Path], boxes: list[np.ndarray], t: TwoViewTransform, repeats: int
) -> tuple[float, dict[str, float]]:
    """Per-stage profile of the shipped path, then its end-to-end rate (decode + two views)."""
    timer = _Timer()
    draft = draft_side(t)
    n = 0
    for r in range(repeats):
        for i, (p, b) in enumerate(zip(paths, boxes)):
            g = torch.Generator().manual_seed(sample_seed(0, r, i))
            with timer("decode (draft)"):
                img, full = load_image(p, draft_short_side=draft)
            with timer("params"):
                params = [t.sample_params(img.width, img.height, g) for _ in range(2)]
            with timer("crop+resize+flip"):
                arr = np.asarray(img)
                views = [t.render(arr, q) for q in params]
            with timer("colour jitter"):
                for k, q in enumerate(params):
                    if q.jitter:
                        for op in q.jitter_order:
                            views[k] = _jitter_uint8(views[k], op, q.jitter_factors[op])
            with timer("grayscale"):
                for k, q in enumerate(params):
                    if q.gray:
                        views[k] = cv2.cvtColor(cv2.cvtColor(views[k], cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
            with timer("gaussian blur"):
                for k, q in enumerate(params):
                    if q.blur_sigma > 0:
                        k2 = 2 * blur_radius(q.blur_sigma, t.size) + 1
                        views[k] = cv2.GaussianBlur(views[k], (k2, k2), q.blur_sigma, borderType=cv2.BORDER_REFLECT_101)
            with timer("to tensor + normalise"):
                t.normalize(t.to_chw(views))
            with timer("boxes"):
                t.map_queries(torch.from_numpy(b), params)
            n += 1
    timer.report(n, f"two-view stages (one worker, {t.size}x{t.size} views)")
    stages = {k: 1000 * v / n for k, v in timer.total.items()}
    t0 = time.perf_counter()
    for r in range(repeats):
        for i, (p, b) in enumerate(zip(paths, boxes)):
            img, full = load_image(p, draft_short_side=draft)
            scale = np.float32(draft_scale(img.size, full))
            t(img, b * scale, generator=torch.Generator().manual_seed(sample_seed(0, r, i)))
    rate = n / (time.perf_counter() - t0)
    print(f"two-view loading end to end: {rate:.1f} samples/s per worker")
    return rate, stages


def _bench_tv2(paths: list[Path], size: int) -> tuple[float, dict[str, float]]:
    """torchvision.transforms.v2 MoCo-v2 on uint8 tensors (what the issue measured at 3.1/s)."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms import v2

    crop = v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True)
    jitter = v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)
    gray = v2.RandomGrayscale(p=0.2)
    blur = v2.RandomApply([v2.GaussianBlur(23, sigma=(0.1, 2.0))], p=0.5)
    flip = v2.RandomHorizontalFlip()
    norm = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    timer = _Timer()
    torch.manual_seed(0)
    for p in paths:
        with timer("decode"):
            x = decode_image(torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8), mode=ImageReadMode.RGB)
        for _ in range(2):
            with timer("crop+resize"):
                y = crop(x)
            with timer("colour jitter"):
                y = jitter(y)
            with timer("grayscale"):
                y = gray(y)
            with timer("gaussian blur (k=23)"):
                y = blur(y)
            with timer("flip + normalise"):
                norm(flip(y))
    ms = timer.report(len(paths), "torchvision.transforms.v2 baseline stages")
    rate = 1000 / ms
    print(f"torchvision.transforms.v2 two views: {rate:.1f} samples/s per worker")
    return rate, {k: 1000 * v / len(paths) for k, v in timer.total.items()}


def _valid_fraction(paths: list[Path], boxes: list[np.ndarray], t: TwoViewTransform, q: int = 16) -> float:
    valid = total = enough = 0
    for r in range(4):
        for i, (p, b) in enumerate(zip(paths, boxes)):
            img, _ = load_image(p)
            g = torch.Generator().manual_seed(sample_seed(1, r, i))
            params = [t.sample_params(img.width, img.height, g) for _ in range(2)]
            ok = t.map_queries(torch.from_numpy(b), params)["valid"]
            valid += int(ok.sum())
            total += len(b)
            enough += int(ok.sum() >= q)
    n = 4 * len(paths)
    frac = valid / max(total, 1)
    print(
        f"queries valid in both views (default aug, min_visible {t.min_visible}): {frac:.3f} "
        f"({valid / n:.1f} of {total / n:.1f} per image; {enough / n:.2f} of images have >= {q})"
    )
    return frac


def bench_data(images: int = 32, size: int = 480, *, repeats: int = 2, manifest: Optional[str] = None) -> dict:
    """Time the query boxes and the two-view loader against ``torchvision.transforms.v2`` on
    ``images`` images (the first readable ones of ``manifest``, default: sample photographs),
    ``size`` px views, ``repeats`` passes, one thread. Prints the per-stage ratios and a summary
    line; returns its numbers."""
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if manifest:
            paths, bad = [], []
            for e in read_manifest(manifest).entries:
                try:
                    load_image(e.path)
                    paths.append(e.path)
                except BadImage as err:
                    bad.append(err)
                    continue
                if len(paths) == images:
                    break
            if not paths:
                raise UserError(f"{manifest}: none of its {len(bad)} images can be read (first: {bad[0]})")
        else:
            paths = _sample_images(Path(tmp), images)
        print(f"bench data: {len(paths)} images, views {size}x{size}, 1 thread")
        q_rate, boxes = _bench_queries(paths, QueryParams())
        t = TwoViewTransform(size)
        _two, ours = _bench_two_view(paths, boxes, t, repeats=repeats)
        tv_rate, theirs = _bench_tv2(paths, size)
        pairs = (  # (stage, our stages, torchvision's stages)
            ("decode", ("decode (draft)",), ("decode",)),
            ("crop+resize", ("crop+resize+flip",), ("crop+resize",)),
            ("jitter", ("colour jitter",), ("colour jitter",)),
            ("blur", ("gaussian blur",), ("gaussian blur (k=23)",)),
        )
        ratios = []
        for name, a, b in pairs:
            mine, base = sum(ours[k] for k in a), sum(theirs[k] for k in b)
            ratios.append(f"{name} {base:.1f}/{mine:.1f} ms = {base / max(mine, 1e-6):.1f}x")
        print("torchvision.transforms.v2 / ours per stage: " + ", ".join(ratios))
        frac = _valid_fraction(paths, boxes, t)
    print(f"speed-up of the two-view loader over torchvision.transforms.v2: {_two / tv_rate:.1f}x")
    print(
        f"query_img_s={q_rate:.2f} two_view_s={_two:.2f} tv2_two_view_s={tv_rate:.3f} "
        f"speedup={_two / tv_rate:.2f} valid_frac={frac:.3f}"
    )
    return {"query_img_s": q_rate, "two_view_s": _two, "tv2_two_view_s": tv_rate, "speedup": _two / tv_rate,
            "valid_frac": frac}  # fmt: skip
