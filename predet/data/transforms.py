"""Two box-aware views of an image (MoCo-v2 augmentations), their boxes mapped into each view.

Shapes: N images (each gives two views), S view side (480 in the paper), M query boxes of an image,
Q queries kept per image (config ``data.queries_per_image``), K classes.

Pipeline of one view (MoCo-v2 order; flip first because the colour ops commute with it)::

    random resized crop + resize to SxS   one ``cv2.resize`` of the crop (a view of the image)
    horizontal flip                        ``cv2.flip`` of the SxS result
    colour jitter (random order), grey,    ``predet.data.color``: OpenCV uint8 kernels per view
    Gaussian blur                          in the loader workers
    normalise                              one in-place multiply-add on both views

Boxes follow crop, flip and resize exactly (continuous pixel coordinates: the resize maps
``x -> (x - x0) * S / w``). With ``query_region="each"`` (the default: DESIGN §2, the paper's "q in
view-1's coordinate system") each view clips a box to its own crop, and the box is *valid* when at
least ``min_visible`` of its area lies inside the crop of both views; the two views may then hold
different parts of it. With ``"common"`` a query is the part of the box both crops hold (the same
region of the image in both views), valid when that part is at least ``min_visible`` of the box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import cv2
import numpy as np
import torch
from PIL import Image

from predet.config import MIN_INPUT_SIZE, QUERY_REGIONS
from predet.data.color import color_augment_uint8

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "sample_seed",
    "TwoViewTransform",
    "ViewParams",
    "sample_crop",
    "common_part",
    "map_boxes",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of item ``index`` at ``epoch``: independent of worker processes and batch order."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(1, np.uint64)[0] >> 1)


def _uniform(g: Optional[torch.Generator], lo: float, hi: float, n: int = 1) -> torch.Tensor:
    return torch.rand(n, generator=g, dtype=torch.float64) * (hi - lo) + lo


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------
def sample_crop(
    width: int,
    height: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    generator: Optional[torch.Generator] = None,
) -> tuple[int, int, int, int]:
    """``(x0, y0, w, h)`` of a random resized crop: torchvision's ``RandomResizedCrop.get_params``
    algorithm (10 tries, then the central crop of clamped aspect), drawing from ``generator``
    (torchvision's draws from the global RNG, which is not reproducible across workers)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * float(_uniform(generator, scale[0], scale[1]))
        aspect = math.exp(float(_uniform(generator, *log_ratio)))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y0 = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            x0 = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return x0, y0, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def common_part(boxes: torch.Tensor, crops: Sequence[tuple[int, int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes ``(M, 4)`` XYXY clipped to every crop ``(x0, y0, w, h)`` of ``crops``: the part of each
    box that all the views show, ``(M, 4)`` (empty where there is none), and its fraction of the
    box's area ``(M,)`` in [0, 1] (0 for empty boxes)."""
    lo, hi = boxes[:, :2], boxes[:, 2:]
    for x0, y0, w, h in crops:
        lo = torch.maximum(lo, boxes.new_tensor([x0, y0]))
        hi = torch.minimum(hi, boxes.new_tensor([x0 + w, y0 + h]))
    hi = torch.maximum(hi, lo)  # no overlap: an empty box at lo
    part = torch.cat([lo, hi], dim=1)
    inter = (hi - lo).prod(dim=1)
    area = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(dim=1)
    frac = torch.where(area > 0, inter / area.clamp(min=1e-12), torch.zeros_like(area))
    return part, frac


def map_boxes(boxes: torch.Tensor, crop: tuple[int, int, int, int], size: int, flip: bool) -> torch.Tensor:
    """Image-pixel boxes ``(M, 4)`` XYXY -> the view's pixels after crop, resize to ``size`` and flip,
    clipped to the view."""
    x0, y0, w, h = crop
    offset = boxes.new_tensor([x0, y0, x0, y0])
    scale = boxes.new_tensor([size / w, size / h, size / w, size / h])
    out = ((boxes - offset) * scale).clamp(0, size)
    if flip:  # x -> S - x swaps the left and right edges
        out = torch.stack([size - out[:, 2], out[:, 1], size - out[:, 0], out[:, 3]], dim=1)
    return out


# --------------------------------------------------------------------------------------------
# The two-view transform
# --------------------------------------------------------------------------------------------
@dataclass
class ViewParams:
    """Random parameters of one view (all drawn from the sample's generator)."""

    crop: tuple[int, int, int, int]  # (x0, y0, w, h) in image pixels
    flip: bool
    jitter: bool
    jitter_factors: tuple[float, float, float, float]  # brightness, contrast, saturation, hue
    jitter_order: tuple[int, int, int, int]
    gray: bool
    blur_sigma: float  # 0: no blur

    def color_kwargs(self) -> dict[str, Any]:
        """The colour parameters, as :func:`~predet.data.color.color_augment_uint8` takes them."""
        return {
            "jitter": self.jitter,
            "jitter_factors": self.jitter_factors,
            "jitter_order": self.jitter_order,
            "gray": self.gray,
            "blur_sigma": self.blur_sigma,
        }


class TwoViewTransform:
    """Two MoCo-v2 views of a PIL image with its query boxes mapped into each view.

    ``t(img, boxes, generator)`` -> dict with ``view1``, ``view2`` (``Tensor[3, S, S]``, normalised),
    ``boxes1``, ``boxes2`` (``Tensor[M, 4]`` XYXY in each view's pixels, clipped to the view; with
    ``query_region="common"`` the part of each box both crops hold) and ``valid`` (``BoolTensor[M]``:
    >= ``min_visible`` of the box's area visible in both views; with ``"common"``, in both at once).
    Every augmentation can be switched off (``crop=False`` resizes the whole image to SxS;
    probabilities 0 disable flip/jitter/grey/blur).
    """

    def __init__(
        self,
        size: int,
        *,
        crop: bool = True,
        crop_scale: Sequence[float] = (0.2, 1.0),
        crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        color_jitter: bool = True,
        jitter_p: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.4,
        hue: float = 0.1,
        grayscale_p: float = 0.2,
        blur_p: float = 0.5,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        min_visible: float = 0.5,
        query_region: str = "each",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if size < MIN_INPUT_SIZE:
            raise ValueError(f"view size must be >= {MIN_INPUT_SIZE}, got {size}")
        self.size = int(size)
        self.crop = crop
        self.crop_scale = tuple(float(v) for v in crop_scale)
        self.crop_ratio = tuple(float(v) for v in crop_ratio)
        self.flip_p = flip_p
        self.jitter_p = jitter_p if color_jitter else 0.0
        self.jitter_ranges = (
            (max(0.0, 1 - brightness), 1 + brightness),
            (max(0.0, 1 - contrast), 1 + contrast),
            (max(0.0, 1 - saturation), 1 + saturation),
            (-hue, hue),
        )
        self.grayscale_p = grayscale_p
        self.blur_p = blur_p
        self.blur_sigma = tuple(float(v) for v in blur_sigma)
        if query_region not in QUERY_REGIONS:
            raise ValueError(f"query_region must be one of {QUERY_REGIONS}, got {query_region!r}")
        self.min_visible = min_visible
        self.query_region = query_region
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    @classmethod
    def from_config(cls, aug: Any, size: int) -> "TwoViewTransform":
        """Build from the ``data.aug`` config section (:class:`predet.config.AugConfig`)."""
        return cls(
            size,
            crop=aug.crop,
            crop_scale=list(aug.crop_scale),
            crop_ratio=list(aug.crop_ratio),
            flip_p=aug.flip_p,
            color_jitter=aug.color_jitter,
            jitter_p=aug.jitter_p,
            brightness=aug.brightness,
            contrast=aug.contrast,
            saturation=aug.saturation,
            hue=aug.hue,
            grayscale_p=aug.grayscale_p,
            blur_p=aug.blur_p,
            blur_sigma=list(aug.blur_sigma),
            query_region=aug.query_region,
            min_visible=aug.min_visible,
        )

    def sample_params(self, width: int, height: int, generator: Optional[torch.Generator] = None) -> ViewParams:
        """Draw one view's parameters; the number of draws is fixed so that switching one
        augmentation off does not change the others' randomness."""
        g = generator
        crop = (
            sample_crop(width, height, self.crop_scale, self.crop_ratio, g)
            if self.crop
            else (0, 0, width, height)
        )
        u = torch.rand(4, generator=g, dtype=torch.float64).tolist()  # flip, jitter, grey, blur
        factors = tuple(float(_uniform(g, lo, hi)) for lo, hi in self.jitter_ranges)
        order = tuple(torch.randperm(4, generator=g).tolist())
        sigma = float(_uniform(g, *self.blur_sigma))
        return ViewParams(
            crop=crop,
            flip=u[0] < self.flip_p,
            jitter=u[1] < self.jitter_p,
            jitter_factors=factors,  # type: ignore[arg-type]
            jitter_order=order,  # type: ignore[arg-type]
            gray=u[2] < self.grayscale_p,
            blur_sigma=sigma if u[3] < self.blur_p else 0.0,
        )

    def render(self, img: np.ndarray, params: ViewParams) -> np.ndarray:
        """Crop + resize + flip of an (H, W, 3) uint8 image: (S, S, 3) uint8.

        One ``cv2.resize`` of the crop (a view, no copy): area averaging when both sides shrink
        (antialiased, like PIL's), bilinear otherwise; both map pixel centres as
        ``x -> (x - x0) * S / w``, which :func:`map_boxes` follows. ~8x faster than PIL's
        ``resize(box=...)`` at 480 px.
        """
        x0, y0, w, h = params.crop
        S = self.size
        interp = cv2.INTER_AREA if (w > S and h > S) else cv2.INTER_LINEAR
        view = cv2.resize(img[y0 : y0 + h, x0 : x0 + w], (S, S), interpolation=interp)
        return cv2.flip(view, 1) if params.flip else view

    @staticmethod
    def to_chw(views: Sequence[np.ndarray]) -> torch.Tensor:
        """B views (S, S, 3) uint8 -> (B, 3, S, S) uint8; ``cv2.split`` copies planes ~4x faster
        than converting a permuted (strided) tensor."""
        return torch.from_numpy(np.stack([np.stack(cv2.split(v)) for v in views]))

    def normalize(self, views: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8 -> float ``(x / 255 - mean) / std``, in place after the one copy."""
        return views.float().mul_(1.0 / (255.0 * self.std)).add_(-self.mean / self.std)

    def __call__(
        self, img: Image.Image, boxes: Any, generator: Optional[torch.Generator] = None
    ) -> dict[str, torch.Tensor]:
        """img: RGB PIL image (or (H, W, 3) uint8 array); boxes: ``(M, 4)`` XYXY in its pixels."""
        boxes = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4)
        arr = np.asarray(img if img.mode == "RGB" else img.convert("RGB")) if isinstance(img, Image.Image) else img
        height, width = arr.shape[:2]
        params = [self.sample_params(width, height, generator) for _ in range(2)]
        # uint8 SIMD kernels per view, then one normalise for both
        views = self.normalize(self.to_chw([color_augment_uint8(self.render(arr, p), **p.color_kwargs()) for p in params]))
        return {"view1": views[0], "view2": views[1], **self.map_queries(boxes, params)}

    def map_queries(self, boxes: torch.Tensor, params: Sequence["ViewParams"]) -> dict[str, torch.Tensor]:
        """Image-pixel boxes ``(M, 4)`` -> ``boxes1``, ``boxes2`` in the two views of ``params`` and
        ``valid`` ``(M,)``, by ``query_region`` (see the class)."""
        if self.query_region == "common":  # one region of the image in both views
            boxes, vis = common_part(boxes, [p.crop for p in params])  # (M, 4), (M,)
        else:  # each view clips the box to its own crop: valid if enough is in each
            vis = torch.stack([common_part(boxes, [p.crop])[1] for p in params]).amin(dim=0)  # (M,)
        return {
            "boxes1": map_boxes(boxes, params[0].crop, self.size, params[0].flip),
            "boxes2": map_boxes(boxes, params[1].crop, self.size, params[1].flip),
            "valid": (vis >= self.min_visible) & (vis > 0),
        }
