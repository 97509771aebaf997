"""A folder of good, odd and broken images with a manifest, for the bad-input matrix."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# name -> why it is bad (None: good, must be processed)
BAD = {
    "truncated.jpg": "cannot decode",
    "corrupt.jpg": "cannot decode",
    "missing.jpg": "file not found",
    "tiny.jpg": "too small",
}
GOOD = ["rgb.jpg", "cmyk.jpg", "rgba.png", "gray.png", "gray16.png", "exif_rot.jpg", "palette.png"]


def scene(w: int = 160, h: int = 120, seed: int = 0) -> np.ndarray:
    """Noise background with three flat rectangles (easy query boxes)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(90, 140, (h, w, 3), dtype=np.uint8)
    img[10:60, 15:70] = (220, 30, 30)
    img[50:110, 90:150] = (30, 30, 220)
    img[70:100, 20:60] = (30, 200, 40)
    return img


def write_odd_images(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    base = scene()
    paths = {name: folder / name for name in [*GOOD, *BAD]}
    Image.fromarray(base).save(paths["rgb.jpg"], quality=95)
    Image.fromarray(base).convert("CMYK").save(paths["cmyk.jpg"], quality=95)
    rgba = np.concatenate([base, np.full(base.shape[:2] + (1,), 255, np.uint8)], axis=2)
    rgba[:20, :20, 3] = 0  # a transparent corner
    Image.fromarray(rgba, "RGBA").save(paths["rgba.png"])
    Image.fromarray(base).convert("L").save(paths["gray.png"])
    g16 = (np.asarray(Image.fromarray(base).convert("L"), np.uint16) * 257).astype(np.uint16)
    Image.fromarray(g16).save(paths["gray16.png"])
    Image.fromarray(base).convert("P", palette=Image.ADAPTIVE).save(paths["palette.png"])
    # stored rotated: EXIF orientation 6 (rotate 90 CW to view) -> the viewer sees `base`
    stored = Image.fromarray(np.rot90(base, k=1).copy())  # 90 CCW
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(paths["exif_rot.jpg"], exif=exif.tobytes(), quality=95)
    buf = io.BytesIO()
    Image.fromarray(base).save(buf, format="JPEG", quality=95)
    paths["truncated.jpg"].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    paths["corrupt.jpg"].write_bytes(b"\xff\xd8\xff\xe0" + np.random.default_rng(1).bytes(3000))
    Image.fromarray(base[:20, :24]).save(paths["tiny.jpg"])
    return paths


@pytest.fixture(scope="session")
def odd_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with ``images/`` (good and bad files), ``manifest.jsonl`` (tags) and ``synonyms.json``."""
    root = tmp_path_factory.mktemp("odd")
    write_odd_images(root / "images")
    lines = []
    for k, name in enumerate([*GOOD, *BAD]):
        tags = ["#Red", "blue"] if k % 2 == 0 else ["#GREEN", "#unknowntag"]
        lines.append({"image": f"images/{name}", "tags": tags})
    (root / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (root / "synonyms.json").write_text(json.dumps({"red": ["#red", "crimson"], "blue": ["#blue"], "green": ["#green"]}))
    return root


@pytest.fixture(scope="session")
def odd_names() -> tuple[list[str], dict[str, str]]:
    """(good image names, {bad image name: expected reason fragment})."""
    return list(GOOD), dict(BAD)
