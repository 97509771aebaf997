"""Robust image decoding: RGB whatever the file holds, or a one-line reason why not.

:func:`load_image` / :func:`decode_image` return RGB (EXIF rotation applied; CMYK, RGBA, LA, P,
L, 16-bit converted) and raise :class:`BadImage` with a one-line reason for missing, truncated,
corrupt or too-small files, so callers count and name them.
"""

from __future__ import annotations

import io
import math
import os
from typing import Optional

import numpy as np
from PIL import Image, ImageFile, ImageOps

__all__ = ["BadImage", "decode_image", "draft_scale", "load_image", "MIN_IMAGE_SIDE"]

MIN_IMAGE_SIDE = 32  # smaller images carry no usable query boxes at 480x480 views

# A truncated JPEG must raise, not decode to a grey bottom half.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class BadImage(Exception):
    """An image that cannot be used; ``str(e)`` is a one-line reason. Callers count and name these."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16/32-bit greyscale is scaled by its dtype's range, alpha is
    composited on white (a transparent background is not black in the photo the user saw)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if img.mode.startswith("I;16"):
            arr8 = (arr.astype(np.uint32) >> 8).astype(np.uint8)
        else:  # 32-bit int or float: map its own range to 0..255
            arr = arr.astype(np.float64)
            lo, hi = float(arr.min()), float(arr.max())
            arr8 = ((arr - lo) * (255.0 / max(hi - lo, 1e-12))).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def decode_image(
    data: bytes | str | os.PathLike,
    *,
    name: str | os.PathLike = "<bytes>",
    min_side: int = MIN_IMAGE_SIDE,
    draft_short_side: Optional[int] = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode an image file (path or bytes) to RGB; EXIF orientation applied.

    Args:
        data: a path or the file's bytes.
        name: how errors name the image.
        min_side: smaller images raise :class:`BadImage`.
        draft_short_side: for JPEG, let libjpeg decode at 1/2, 1/4 or 1/8 scale as long as the
            short side stays >= this (much faster for large photos); boxes must then be scaled by
            :func:`draft_scale`.

    Returns:
        ``(image, full_size)``: the RGB image and the ``(width, height)`` the file has at full
        resolution after EXIF rotation (the pixel frame of the query cache).
    """
    if isinstance(data, (str, os.PathLike)) and not os.path.isfile(data):
        raise BadImage(name, "file not found")
    try:
        img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        full = img.size
        if draft_short_side is not None and img.format in ("JPEG", "MPO"):  # MPO: camera JPEGs
            scale = max(draft_short_side / max(min(full), 1), 1e-6)
            img.draft("RGB", (max(1, int(full[0] * scale)), max(1, int(full[1] * scale))))
        img.load()  # raises on truncated/corrupt data
        transposed = ImageOps.exif_transpose(img)
        if transposed is not None and transposed is not img:
            if transposed.size != img.size:
                full = (full[1], full[0])  # 90/270 degree orientation
            img = transposed
        img = _to_rgb(img)
    except BadImage:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError) as e:
        raise BadImage(name, f"cannot decode ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if min(full) < min_side:
        raise BadImage(name, f"too small ({full[0]}x{full[1]} < {min_side} px)")
    return img, full


def draft_scale(size: tuple[int, int], full: tuple[int, int]) -> float:
    """What a pixel length of the full image is in an image :func:`decode_image` returned at
    ``size`` for a file of ``full`` pixels: 1, or libjpeg's draft scale 1/2, 1/4 or 1/8 exactly.

    Not ``size / full``: a draft image is ``ceil(full / 2**k)`` pixels wide, a little more than
    ``full / 2**k`` (at 1/4, a 1001-px side decodes to 251 px: x = 900 maps to 225, not 225.7)."""
    if tuple(size) == tuple(full):
        return 1.0
    return 2.0 ** -round(math.log2(max(full) / max(size)))


def load_image(
    path: str | os.PathLike, *, min_side: int = MIN_IMAGE_SIDE, draft_short_side: Optional[int] = None
) -> tuple[Image.Image, tuple[int, int]]:
    """:func:`decode_image` for a file path (the error names the path)."""
    return decode_image(path, name=path, min_side=min_side, draft_short_side=draft_short_side)
