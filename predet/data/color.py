"""MoCo-v2 colour augmentations of one view ``(H, W, 3)`` uint8 through OpenCV's SIMD kernels
(:func:`color_augment_uint8`), what data-loader workers run. Each op equals
``torchvision.transforms.v2.functional``'s up to uint8 rounding and OpenCV's 1/256-turn hue
quantisation (tests).
"""

from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np

__all__ = ["color_augment_uint8", "blur_radius"]


def blur_radius(sigma: float, size: int, truncate: float = 3.0) -> int:
    """Kernel radius ``ceil(truncate * sigma)``, at least 1 and below the image side."""
    return min(max(1, int(math.ceil(truncate * sigma))), size - 1)


# OpenCV's uint8 kernels: ~6x faster per view on one core than float tensor ops, which is what
# keeps a data-loader worker ahead of the GPU
def _hue_lut(shift: float) -> np.ndarray:
    # OpenCV's *_FULL HSV stores hue as 0..255 for a full turn
    return ((np.arange(256) + int(round(shift * 256))) % 256).astype(np.uint8)


def _jitter_uint8(x: np.ndarray, op_id: int, f: float) -> np.ndarray:
    if op_id == 0:  # brightness: f * x, saturating
        return cv2.addWeighted(x, f, x, 0.0, 0.0)
    if op_id == 1:  # contrast: blend with the mean luma
        mean = float(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).mean())
        return cv2.addWeighted(x, f, x, 0.0, (1.0 - f) * mean)
    if op_id == 2:  # saturation: blend with the luma image
        gray = cv2.cvtColor(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
        return cv2.addWeighted(x, f, gray, 1.0 - f, 0.0)
    hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV_FULL)
    hsv[..., 0] = cv2.LUT(hsv[..., 0], _hue_lut(f))
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def color_augment_uint8(
    x: np.ndarray,
    *,
    jitter: bool,
    jitter_factors: Sequence[float],
    jitter_order: Sequence[int],
    gray: bool,
    blur_sigma: float,
) -> np.ndarray:
    """One view ``(H, W, 3)`` uint8 RGB -> colour-augmented uint8.

    Args:
        jitter: apply colour jitter. jitter_factors: brightness, contrast, saturation factors and
            the hue shift (in turns). jitter_order: the order of those four ops (0..3).
        gray: convert to grey (3 equal channels). blur_sigma: Gaussian blur sigma (0: none).
    """
    if jitter:
        for op_id in jitter_order:
            x = _jitter_uint8(x, op_id, jitter_factors[op_id])
    if gray:
        x = cv2.cvtColor(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    if blur_sigma > 0:
        k = 2 * blur_radius(blur_sigma, min(x.shape[:2])) + 1
        x = cv2.GaussianBlur(x, (k, k), blur_sigma, borderType=cv2.BORDER_REFLECT_101)
    return x
