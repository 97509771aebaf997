"""Rendering of the synthetic world's scenes: backgrounds, shapes, appearances, occlusion.

A scene is a (size, size, 3) uint8 RGB image and its objects, each a class index (into a list of
``appearance_shape`` names) and a visible mask. All randomness comes from the generator passed in,
so a scene is a pure function of that generator's state.

Shapes lie inside a disc of radius ``side / 2``; ``side`` is log-uniform in
[``MIN_SIDE``, ``MAX_SIDE``] x image side. Appearances: ``red`` and ``green`` (solid, shaded),
``striped`` (yellow/black), ``checkered`` (white/blue), with pattern scale following the object's
side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["SceneObject", "render_scene", "encode_jpeg", "box_xyxy", "load_backgrounds"]

MIN_OBJECTS, MAX_OBJECTS = 1, 8
MIN_SIDE, MAX_SIDE = 0.05, 0.60  # object side as a fraction of the image side
MIN_VISIBLE = 0.30  # an object never gets occluded below this fraction of its area
JPEG_QUALITY = 90

# scikit-image sample images shipped with the wheel (no download): photographs and textures.
_BACKGROUND_SOURCES = (
    "astronaut",
    "camera",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "coins",
    "brick",
    "grass",
    "gravel",
)
_BACKGROUND_CACHE: list[np.ndarray] = []


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
@dataclass
class SceneObject:
    """One painted object: class index, visible mask (H, W) bool, and its whole area in px."""

    label: int
    mask: np.ndarray
    full_area: int


def load_backgrounds() -> list[np.ndarray]:
    """Sample images as float32 RGB in [0, 1]; loaded once per process."""
    if not _BACKGROUND_CACHE:
        import skimage.data

        for name in _BACKGROUND_SOURCES:
            img = np.asarray(getattr(skimage.data, name)())
            if img.ndim == 2:
                img = np.repeat(img[..., None], 3, axis=2)
            _BACKGROUND_CACHE.append(img[..., :3].astype(np.float32) / 255.0)
    return _BACKGROUND_CACHE


def _photo_crop(rng: np.random.Generator, size: int) -> np.ndarray:
    """Random square crop of a sample image, resized to (size, size, 3), tinted, maybe flipped."""
    sources = load_backgrounds()
    src = sources[int(rng.integers(len(sources)))]
    h, w = src.shape[:2]
    side = int(min(h, w) * rng.uniform(0.25, 1.0))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = cv2.resize(src[y : y + side, x : x + side], (size, size), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return crop * rng.uniform(0.6, 1.2, size=3).astype(np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float32: one or two photo/texture crops blended with smooth colour noise."""
    photo = _photo_crop(rng, size)
    if rng.random() < 0.3:
        photo = 0.5 * (photo + _photo_crop(rng, size))
    grid = int(rng.integers(2, 9))
    blobs = cv2.resize(
        rng.random((grid, grid, 3), dtype=np.float32), (size, size), interpolation=cv2.INTER_CUBIC
    )
    alpha = np.float32(rng.uniform(0.45, 0.9))
    return alpha * photo + (1 - alpha) * blobs


def _polygon(shape: str) -> np.ndarray:
    """Unit-radius outline of a polygonal shape, (V, 2) xy."""

    def regular(n: int, phase: float) -> np.ndarray:
        t = phase + 2 * np.pi * np.arange(n) / n
        return np.stack([np.cos(t), np.sin(t)], 1)

    if shape == "square":
        return regular(4, np.pi / 4)
    if shape == "triangle":
        return regular(3, -np.pi / 2)
    if shape == "hexagon":
        return regular(6, 0.0)
    if shape == "diamond":
        return regular(4, 0.0) * np.array([0.6, 1.0])
    if shape == "star":
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)[:, None]
        return regular(10, -np.pi / 2) * radii
    if shape == "cross":
        a = 0.33
        arms = np.array(
            [
                [-a, -1],
                [a, -1],
                [a, -a],
                [1, -a],
                [1, a],
                [a, a],
                [a, 1],
                [-a, 1],
                [-a, a],
                [-1, a],
                [-1, -a],
                [-a, -a],
            ],
            dtype=np.float64,
        )
        return arms / math.hypot(1.0, a)  # arm corners on the unit circle
    raise ValueError(f"no polygon for shape {shape!r}")


def _shape_mask(
    shape: str, rng: np.random.Generator, size: int, radius: float, center: np.ndarray
) -> np.ndarray:
    """Binary (size, size) uint8 mask of one randomly rotated, slightly squashed shape.

    The shape lies inside the disc of ``radius`` around ``center``: its side is <= ``2 * radius``.
    """
    mask = np.zeros((size, size), np.uint8)
    shift = 4  # cv2 sub-pixel bits
    stretch = rng.permutation([1.0, rng.uniform(0.75, 1.0)])  # squash one axis, never grow
    angle = rng.uniform(0, 2 * np.pi)
    if shape in ("circle", "ring"):
        axes = tuple(int(round(radius * s * 2**shift)) for s in stretch)
        c = tuple(int(round(v * 2**shift)) for v in center)
        cv2.ellipse(mask, c, axes, float(np.degrees(angle)), 0, 360, 1, -1, cv2.LINE_8, shift)
        if shape == "ring":
            inner = tuple(max(1, int(a * 0.55)) for a in axes)
            cv2.ellipse(mask, c, inner, float(np.degrees(angle)), 0, 360, 0, -1, cv2.LINE_8, shift)
        return mask
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = (_polygon(shape) * stretch) @ rot.T * radius + center  # (V, 2) in px
    cv2.fillPoly(mask, [np.round(pts * 2**shift).astype(np.int32)], 1, cv2.LINE_8, shift)
    return mask


SOLID_COLOURS = {"red": (0.82, 0.12, 0.12), "green": (0.12, 0.68, 0.22)}


def _texture(appearance: str, rng: np.random.Generator, h: int, w: int, side: float) -> np.ndarray:
    """(h, w, 3) float32 RGB fill of an appearance; pattern scale follows the object's side."""
    if appearance in SOLID_COLOURS:
        colour = np.array(SOLID_COLOURS[appearance]) + rng.uniform(-0.08, 0.08, 3)
        return np.broadcast_to(colour.astype(np.float32), (h, w, 3)).copy()
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = rng.uniform(0, np.pi)
    u, v = xx * np.cos(t) + yy * np.sin(t), -xx * np.sin(t) + yy * np.cos(t)
    if appearance == "striped":
        period = max(3.0, side / rng.uniform(3.0, 5.0))
        on = np.floor(u / (period / 2)) % 2 == 0
        a, b = np.array([0.95, 0.82, 0.1]), np.array([0.08, 0.08, 0.1])
    elif appearance == "checkered":
        cell = max(2.0, side / rng.uniform(3.0, 5.0))
        on = (np.floor(u / cell) + np.floor(v / cell)) % 2 == 0
        a, b = np.array([0.95, 0.95, 0.95]), np.array([0.1, 0.25, 0.85])
    else:
        raise ValueError(f"unknown appearance {appearance!r}")
    jitter = rng.uniform(-0.06, 0.06, 3)
    return np.where(on[..., None], a + jitter, b + jitter).astype(np.float32)


def render_scene(
    rng: np.random.Generator,
    *,
    size: int,
    classes: Sequence[str],
    objects: tuple[int, int] = (MIN_OBJECTS, MAX_OBJECTS),
    sides: tuple[float, float] = (MIN_SIDE, MAX_SIDE),
) -> tuple[np.ndarray, list[SceneObject]]:
    """Draw one scene: returns the (size, size, 3) uint8 RGB image and its objects, bottom to top.

    ``objects``: the range (inclusive) of the number of objects drawn; ``sides``: the range of an
    object's side as a fraction of the image side (log-uniform). Objects are placed one at a time;
    a candidate that would leave an earlier object less than ``MIN_VISIBLE`` of its area visible
    is re-drawn (up to 10 tries, then skipped).
    """
    image = _background(rng, size)
    full: list[np.ndarray] = []  # each object's whole mask
    visible: list[np.ndarray] = []  # each object's visible mask
    labels: list[int] = []
    n_objects = int(rng.integers(objects[0], objects[1] + 1))
    log_side = (math.log(sides[0]), math.log(sides[1]))
    for _ in range(n_objects):
        label = int(rng.integers(len(classes)))
        appearance, shape = classes[label].split("_")
        for _try in range(10):
            side = size * math.exp(rng.uniform(*log_side))
            radius = side / 2
            center = rng.uniform(radius, size - radius, size=2)
            mask = _shape_mask(shape, rng, size, radius, center).astype(bool)
            if mask.sum() < 4:
                continue
            if all(
                (v & ~mask).sum() >= MIN_VISIBLE * f.sum()
                for v, f in zip(visible, full, strict=True)
            ):
                break
        else:
            continue
        visible = [v & ~mask for v in visible]
        full.append(mask)
        visible.append(mask.copy())
        labels.append(label)
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        tex = _texture(appearance, rng, y1 - y0, x1 - x0, side)
        # shading: a linear light gradient across the object's box, so fills are not flat colours
        gy, gx = np.mgrid[0 : y1 - y0, 0 : x1 - x0].astype(np.float32) / max(side, 1.0)
        g = rng.uniform(-0.35, 0.35, 2).astype(np.float32)
        tex *= (np.float32(rng.uniform(0.8, 1.1)) + g[0] * (gy - 0.5) + g[1] * (gx - 0.5))[
            ..., None
        ]
        region = mask[y0:y1, x0:x1]
        image[y0:y1, x0:x1][region] = tex[region]
    image += rng.normal(0, rng.uniform(0.01, 0.05), size=image.shape).astype(np.float32)
    image = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    return image, [
        SceneObject(label=k, mask=v, full_area=int(f.sum()))
        for k, v, f in zip(labels, visible, full, strict=True)
    ]


def encode_jpeg(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def box_xyxy(mask: np.ndarray) -> list[int]:
    """Tight box of a non-empty mask, XYXY with exclusive max (pixel edges)."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
