"""Detection images as a user's photos come: EXIF orientation, odd modes, broken files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from predet.data.detection import DetectionDataset
from predet.engine.evaluate import drop_images, predict

NAMES = ["rgb.jpg", "exif_rot.jpg", "truncated.jpg", "gray16.png", "missing.jpg", "rgba.png", "gray.png"]


def _gt(names=NAMES) -> dict:
    """One image per file (shown as 160 x 120), one box on the red rectangle of :func:`scene`."""
    images = [{"id": k + 1, "file_name": n, "width": 160, "height": 120} for k, n in enumerate(names)]
    anns = [
        {"id": k + 1, "image_id": k + 1, "category_id": 1, "bbox": [15, 10, 55, 50], "area": 2750.0, "iscrowd": 0}
        for k in range(len(names))
    ]
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "red"}]}


def test_photos_are_read_as_shown(odd_images: Path) -> None:
    data = DetectionDataset(_gt(), odd_images / "images", train=False)
    by_name = {n: data[k] for k, n in enumerate(NAMES)}
    ref, _ = by_name["rgb.jpg"]
    assert ref.shape == (3, 120, 160)
    red = ref[:, 10:60, 15:70].mean(dim=(1, 2))
    assert red.tolist() == pytest.approx([220 / 255, 30 / 255, 30 / 255], abs=0.02)
    # stored rotated with EXIF orientation 6: read upright, as the annotations (and a viewer) see it
    rot, target = by_name["exif_rot.jpg"]
    assert rot.shape == ref.shape and (rot - ref).abs().mean() < 0.01
    assert target["boxes"].tolist() == [[15.0, 10.0, 70.0, 60.0]]
    # 16-bit greyscale scaled by its range (a plain convert("RGB") clips it to white)
    g16, g8 = by_name["gray16.png"][0], by_name["gray.png"][0]
    assert (g16 - g8).abs().max() < 1.5 / 255 and g16.mean() < 0.6
    # alpha composited on white, as the photo is shown
    rgba = by_name["rgba.png"][0]
    assert rgba[:, :20, :20].min() == 1.0 and (rgba[:, 30:, 30:] - ref[:, 30:, 30:]).abs().mean() < 0.05  # JPEG noise


def test_unreadable_images_are_skipped_named_once_and_left_out_of_the_ap(odd_images: Path, capsys) -> None:
    gt = _gt()
    ev = DetectionDataset(gt, odd_images / "images", train=False)
    image, target = ev[NAMES.index("truncated.jpg")]
    assert image.shape == (3, 0, 0) and target == {"image_id": 3, "unreadable": target["unreadable"]}
    assert "cannot decode" in target["unreadable"]
    assert ev[NAMES.index("missing.jpg")][1]["unreadable"] == "file not found"
    ev[NAMES.index("truncated.jpg")]  # named once per file
    err = capsys.readouterr().err
    assert err.count("truncated.jpg") == 1 and err.count("missing.jpg") == 1
    assert sorted(ev.unreadable) == sorted(str(odd_images / "images" / n) for n in ("truncated.jpg", "missing.jpg"))

    # training: the next readable image takes the broken one's place (detectron2's rule)
    tr = DetectionDataset(gt, odd_images / "images", train=True, flip_p=0.0)
    assert tr[NAMES.index("truncated.jpg")][1]["image_id"] == 4  # gray16.png
    assert tr[NAMES.index("missing.jpg")][1]["image_id"] == 6  # rgba.png
    assert tr[(2, len(NAMES) - 1)][1]["image_id"] == 7
    # wraps past the last image; the flip still draws from the requested item (epoch, index)
    wrap = DetectionDataset(_gt(["rgb.jpg", "truncated.jpg"]), odd_images / "images", train=True, flip_p=0.5)
    from predet.data.transforms import sample_seed

    for epoch in range(6):
        image, target = wrap[(epoch, 1)]
        flips = torch.rand((), generator=torch.Generator().manual_seed(sample_seed(0, epoch, 1))).item() < 0.5
        assert target["image_id"] == 1
        assert target["boxes"].tolist() == [[90.0, 10.0, 145.0, 60.0] if flips else [15.0, 10.0, 70.0, 60.0]]

    class Boxes(torch.nn.Module):  # one detection on the red rectangle per image it is given
        def forward(self, images):
            return [
                {"boxes": torch.tensor([[15.0, 10.0, 70.0, 60.0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
                for _ in images
            ]

    bad: list[int] = []
    preds = predict(Boxes(), ev, category_of_label={1: 1}, device=torch.device("cpu"), batch_size=3,
                    progress=False, unreadable=bad)  # fmt: skip
    assert sorted(bad) == [3, 5] and sorted(p["image_id"] for p in preds) == [1, 2, 4, 6, 7]
    kept = drop_images(gt, bad)
    assert [im["id"] for im in kept["images"]] == [1, 2, 4, 6, 7]
    assert [a["image_id"] for a in kept["annotations"]] == [1, 2, 4, 6, 7]


def test_every_image_unreadable_is_one_error(odd_images: Path, capsys) -> None:
    from predet.analysis.correlation import correlation
    from predet.errors import UserError

    tr = DetectionDataset(_gt(["truncated.jpg", "missing.jpg"]), odd_images / "images", train=True)
    with pytest.raises(UserError, match="none of the 2 images can be read"):
        tr[0]
    with pytest.raises(UserError, match="none of the 2 images with a usable box could be read"):
        correlation({"scratch": "scratch"}, _gt(["truncated.jpg", "missing.jpg"]), odd_images / "images",
                    backbone="resnet18", fpn_channels=16)  # fmt: skip


def test_unreadable_images_are_named_at_most_max_named_times(odd_images: Path, capsys) -> None:
    from predet.data import detection

    names = [f"gone{k}.jpg" for k in range(detection.MAX_NAMED + 5)] + ["rgb.jpg"]
    ev = DetectionDataset(_gt(names), odd_images / "images", train=False)
    for k in range(len(names)):
        ev[k]
    ev[0]  # known unreadable: not decoded or named again
    err = capsys.readouterr().err.splitlines()
    assert len(err) == detection.MAX_NAMED and "further ones are skipped without a line" in err[-1]
    assert len(ev.unreadable) == detection.MAX_NAMED + 5


def test_categories_sharing_a_name_are_an_error_naming_the_file(tmp_path: Path) -> None:
    """Classes are matched by name: two categories of one name would become one class."""
    import json

    import pytest

    from predet.data.detection import load_coco_json, load_lvis_json
    from predet.errors import UserError

    gt = {"images": [], "annotations": [],
          "categories": [{"id": 1, "name": "cup"}, {"id": 2, "name": "dog"}, {"id": 7, "name": "cup"}]}  # fmt: skip
    path = tmp_path / "dup.json"
    path.write_text(json.dumps(gt))
    for load in (load_coco_json, load_lvis_json):
        with pytest.raises(UserError, match=r"dup.json: categories \[1, 7\] share the name 'cup'; category"):
            load(path)
    gt["categories"][2]["name"] = "cat"
    path.write_text(json.dumps(gt))
    assert [c["name"] for c in load_coco_json(path)["categories"]] == ["cup", "dog", "cat"]
