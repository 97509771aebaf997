"""Bad input to the data layer: one-line errors naming the file, line or key; unusable images
skipped and counted; query and data shards recomputed when their manifest entries changed."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from predet.cli import main
from predet.config import PretrainConfig, load_config
from predet.data.datasets import build_pretrain_data
from predet.data.detection import (
    DetectionDataset,
    load_coco_json,
    load_gt,
    load_lvis_json,
    load_voc,
)
from predet.data.manifest import read_manifest
from predet.data.queries import (
    QueryCache,
    QueryParams,
    cache_queries,
    read_truth_boxes,
    write_query_file,
)
from predet.data.shards import write_shards
from predet.data.vocab import write_vocab
from predet.errors import UserError


def _cfg(*overrides: str):
    return load_config(PretrainConfig, None, ["model.input_size=64", "data.queries_per_image=8", *overrides])


def _lines(path: Path, objs: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in objs))
    return path


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ---------------------------------------------------------------------------------------------
# Detection data: a size-mismatched image is skipped, malformed fields are one-line errors
# ---------------------------------------------------------------------------------------------
def _gt(sizes: list[tuple[int, int]]) -> dict:
    """One ``rgb.jpg`` (160 x 120) per image, annotated as ``sizes[k]`` = (width, height)."""
    images = [{"id": k + 1, "file_name": "rgb.jpg", "width": w, "height": h} for k, (w, h) in enumerate(sizes)]
    anns = [{"id": k + 1, "image_id": k + 1, "category_id": 1, "bbox": [15, 10, 55, 50], "iscrowd": 0}
            for k in range(len(sizes))]  # fmt: skip
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "red"}]}


def test_size_mismatched_image_is_skipped_like_an_unreadable_one(odd_images: Path, capsys) -> None:
    gt = _gt([(120, 160), (160, 120)])  # image 1's annotations are for a portrait image
    train = DetectionDataset(gt, odd_images / "images", train=True, flip_p=0.0)
    assert train[0][1]["image_id"] == 2  # the next image takes its place
    ev = DetectionDataset(gt, odd_images / "images", train=False)
    image, target = ev[0]
    assert image.shape == (3, 0, 0)
    assert target == {"image_id": 1, "unreadable": "image is 160x120 (EXIF orientation applied) but "
                                                    "the annotations say 120x160"}  # fmt: skip
    assert ev[1][0].shape == (3, 120, 160) and list(ev.unreadable.values()) == [target["unreadable"]]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("warning: skipping image ") for line in err)
    assert "rgb.jpg: image is 160x120" in err[0]

    every = DetectionDataset(_gt([(120, 160)]), odd_images / "images", train=True)
    with pytest.raises(UserError, match=r"none of the 1 images can be read \(first: .*rgb.jpg: image is "
                                        r"160x120 \(EXIF orientation applied\) but the annotations say 120x160\)"):
        every[0]


def test_none_readable_error_gives_the_first_reason(odd_images: Path) -> None:
    gt = _gt([(160, 120)])
    gt["images"][0]["file_name"] = "missing.jpg"
    with pytest.raises(UserError, match=r"\(first: .*missing.jpg: file not found\)"):
        DetectionDataset(gt, odd_images / "images", train=True)[0]


COCO_IMAGE = {"id": 7, "file_name": "a.jpg", "width": 80, "height": 64}
COCO_CAT = {"id": 1, "name": "a"}


@pytest.mark.parametrize(
    "images, anns, cats, fragment",
    [
        ([COCO_IMAGE], [{"id": 3, "image_id": 7, "category_id": 1}], [COCO_CAT],
         "annotation 3 (image 7) has no 'bbox'"),
        ([COCO_IMAGE], [{"id": 3, "image_id": 7, "category_id": 1, "bbox": None}], [COCO_CAT],
         "annotation 3 (image 7): 'bbox' must be [x, y, width, height], got null"),
        ([COCO_IMAGE], [{"id": 3, "image_id": 7, "category_id": 1, "bbox": [1, 2, 3]}], [COCO_CAT],
         "annotation 3 (image 7): 'bbox' must be [x, y, width, height], got [1, 2, 3]"),
        ([COCO_IMAGE], [{"id": 3, "image_id": 7, "bbox": [1, 2, 3, 4]}], [COCO_CAT],
         "annotation 3 (image 7) has no 'category_id'"),
        ([COCO_IMAGE], [{"id": 3, "image_id": 7, "category_id": 2, "bbox": [1, 2, 3, 4]}], [COCO_CAT],
         "annotation 3 (image 7) has category_id 2, which is not in 'categories'"),
        ([COCO_IMAGE], [{"id": 3, "image_id": 8, "category_id": 1, "bbox": [1, 2, 3, 4]}], [COCO_CAT],
         "annotation 3 (image 8) refers to an image_id that is not in 'images'"),
        ([COCO_IMAGE], [{"id": 3, "image_id": [7], "category_id": 1, "bbox": [1, 2, 3, 4]}], [COCO_CAT],
         "annotation 3 (image [7]): 'image_id' must be a number or a string, got [7]"),
        ([{**COCO_IMAGE, "id": [7]}], [], [COCO_CAT], "image id [7] must be a number or a string"),
        ([COCO_IMAGE], [], [{"id": 4}], "category 4 has no 'name' string"),
        ([{"id": 9, "width": 80, "height": 64}], [], [COCO_CAT], "image 9 has no 'file_name'"),
    ],
)  # fmt: skip
def test_malformed_coco_fields_are_one_line_errors(tmp_path: Path, images, anns, cats, fragment) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    with pytest.raises(UserError, match=re.escape(f"bad.json: {fragment}")) as e:
        load_coco_json(path)
    assert "\n" not in str(e.value)


def test_whole_float_and_string_ids_still_match(tmp_path: Path) -> None:
    """COCO tools match ids by value: 7.0 and "7a" are ids like 7."""
    path = tmp_path / "ok.json"
    anns = [{"id": 1, "image_id": 7.0, "category_id": "c1", "bbox": [1, 2, 3, 4]}]
    path.write_text(json.dumps({"images": [COCO_IMAGE], "annotations": anns, "categories": [{"id": "c1", "name": "a"}]}))
    assert load_coco_json(path)["annotations"][0]["area"] == 12.0


def test_lvis_image_without_file_name_or_coco_url(tmp_path: Path) -> None:
    path = tmp_path / "lvis.json"
    images = [{"id": 1, "coco_url": "http://x/000001.jpg", "neg_category_ids": []}, {"id": 2, "neg_category_ids": []}]
    path.write_text(json.dumps({"images": images[:1], "annotations": [], "categories": [COCO_CAT]}))
    assert load_lvis_json(path)["images"][0]["file_name"] == "000001.jpg"
    path.write_text(json.dumps({"images": images, "annotations": [], "categories": [COCO_CAT]}))
    with pytest.raises(UserError, match="lvis.json: image 2 has neither file_name nor coco_url"):
        load_lvis_json(path)


def _voc_xml(ymin: str = "10") -> str:
    return ("<annotation><filename>0.jpg</filename><size><width>80</width><height>64</height></size>"
            f"<object><name>dog</name><bndbox><xmin>10</xmin><ymin>{ymin}</ymin><xmax>30</xmax>"
            "<ymax>30</ymax></bndbox></object></annotation>")  # fmt: skip


def test_malformed_voc_fields_are_one_line_errors(tmp_path: Path, monkeypatch) -> None:
    ann = tmp_path / "VOC" / "Annotations"
    ann.mkdir(parents=True)
    (ann / "a.xml").write_text(_voc_xml("x"))
    with pytest.raises(UserError, match=r"a.xml: object 1: <ymin> must be a number, got 'x'"):
        load_voc(ann)
    (ann / "a.xml").write_text(_voc_xml())
    assert load_voc(ann)["annotations"][0]["bbox"] == [9.0, 9.0, 21.0, 21.0]
    # an image list: the line of an id without annotation is named
    split = tmp_path / "VOC" / "ImageSets" / "Main" / "train.txt"
    split.parent.mkdir(parents=True)
    split.write_text("a\n\nb -1\n")
    with pytest.raises(UserError, match=r"train.txt:3: listed image's annotation not found: .*b.xml"):
        load_voc(split)
    split.write_text("a 1\n")
    assert [im["file_name"] for im in load_voc(split)["images"]] == ["0.jpg"]
    # a list given by a short relative path (was an IndexError on Path.parents[2])
    monkeypatch.chdir(split.parent)
    assert [im["file_name"] for im in load_voc("train.txt")["images"]] == ["0.jpg"]
    (split.parent / "empty.txt").write_text("\n")
    with pytest.raises(UserError, match="empty.txt: VOC image list holds no image ids"):
        load_voc("empty.txt")
    # VOC data under the fine-tuning's default data.format=coco: named, with the key to set
    # (was "annotation file not found: .../Annotations" for a folder that exists)
    with pytest.raises(UserError, match=r"^.*Annotations: a folder, not a COCO JSON: Pascal VOC data needs data.format=voc$"):
        load_gt("coco", ann)
    with pytest.raises(UserError, match=r"^train.txt: an image-set list, not a LVIS JSON: .*data.format=voc$"):
        load_gt("lvis", "train.txt")
    assert load_gt("voc", "train.txt")["images"][0]["file_name"] == "0.jpg"


# ---------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------
def test_non_utf8_manifest_names_file_and_line(tmp_path: Path, capsys) -> None:
    m = tmp_path / "m.jsonl"
    m.write_bytes(b'{"image": "a.jpg", "tags": ["x"]}\n{"image": "b.jpg", "tags": ["caf\xe9"]}\n')
    with pytest.raises(UserError, match=r"m.jsonl:2: not UTF-8 text \(byte 0xe9 at column 33\)"):
        read_manifest(m)
    (tmp_path / "s.json").write_text('{"x": []}')
    assert main(["data", "vocab", "--manifest", str(m), "--synonyms", str(tmp_path / "s.json"),
                 "--out", str(tmp_path / "o")]) == 2  # fmt: skip
    assert "m.jsonl:2: not UTF-8 text" in _one_line_error(capsys)


def test_first_line_with_image_keys_is_not_a_header(tmp_path: Path) -> None:
    m = _lines(tmp_path / "m.jsonl", [{"img": "0.jpg", "labels": ["a"]}, {"image": "1.jpg", "labels": ["a"]}])
    with pytest.raises(UserError, match=r"m.jsonl:1: missing key 'image' \(keys: 'img', 'labels'\)"):
        read_manifest(m)
    for key in ("tags", "queries"):
        _lines(m, [{"path": "0.jpg", key: []}, {"image": "1.jpg"}])
        with pytest.raises(UserError, match="m.jsonl:1: missing key 'image'"):
            read_manifest(m)
    _lines(m, [{"world": "synthetic", "drop": 0.3}, {"image": "1.jpg"}])  # a header is still one
    assert read_manifest(m).header == {"world": "synthetic", "drop": 0.3}


# ---------------------------------------------------------------------------------------------
# predet data vocab: never overwrites its input, nor an earlier output unless asked
# ---------------------------------------------------------------------------------------------
def test_vocab_refuses_to_overwrite_its_input_or_earlier_outputs(tmp_path: Path, capsys) -> None:
    m = _lines(tmp_path / "manifest.jsonl", [{"image": "a.jpg", "tags": ["dog"]}, {"image": "b.jpg", "tags": ["cat"]},
                                             {"image": "c.jpg", "tags": ["cow"]}])  # fmt: skip
    before = m.read_bytes()
    syn = tmp_path / "syn.json"
    syn.write_text(json.dumps({"dog": [], "cat": []}))
    args = ["data", "vocab", "--manifest", str(m), "--synonyms", str(syn)]
    assert main([*args, "--out", str(tmp_path)]) == 2
    err = _one_line_error(capsys)
    assert f"would overwrite the input {m}" in err
    assert m.read_bytes() == before and not (tmp_path / "vocab.json").exists()  # nothing written

    out = tmp_path / "out"
    assert main([*args, "--out", str(out)]) == 0
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 2  # c.jpg has no class
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 2
    assert f"{out / 'vocab.json'} exists; pass --overwrite" in _one_line_error(capsys)
    # the output manifest as the next input, into the same folder: refused even with overwrite
    with pytest.raises(UserError, match="would overwrite the input"):
        write_vocab(out / "manifest.jsonl", syn, out, min_images=2, overwrite=True)
    syn.write_text(json.dumps({"dog": [], "cat": [], "cow": []}))
    assert main([*args, "--out", str(out), "--overwrite"]) == 0  # --overwrite replaces the earlier outputs
    assert json.loads((out / "vocab.json").read_text())["classes"] == ["cat", "cow", "dog"]
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 3


# ---------------------------------------------------------------------------------------------
# Query cache and data shards: a shard is reused only for the entries it was computed for
# ---------------------------------------------------------------------------------------------
def _scene_manifest(tmp_path: Path, n: int, name: str = "m.jsonl") -> Path:
    (tmp_path / "im").mkdir(exist_ok=True)
    lines = []
    for k in range(n):
        rng = np.random.default_rng(k)
        img = rng.integers(110, 130, (96, 128, 3), dtype=np.uint8)
        img[10 + k : 60, 15:70] = (220, 30, 30)
        Image.fromarray(img).save(tmp_path / "im" / f"{k}.png")
        lines.append({"image": f"im/{k}.png", "labels": ["a" if k % 2 else "b"], "queries": [[15, 10, 70, 60]]})
    return _lines(tmp_path / name, lines)


def test_query_cache_recomputes_shards_whose_entries_changed(tmp_path: Path, capsys) -> None:
    out, p = tmp_path / "q", QueryParams(max_boxes=5)
    first = cache_queries(read_manifest(_scene_manifest(tmp_path, 3)).entries, out, p, shard_size=2, progress=False)
    assert first["images"] == 3
    with np.load(out / "queries-000001.npz") as z:
        assert z["entries"].tolist() == ["im/2.png"]
    kept = (out / "queries-000000.npz").stat().st_mtime_ns
    capsys.readouterr()
    # two lines appended: shard 1 now covers im/2 and im/3, shard 2 is new
    entries = read_manifest(_scene_manifest(tmp_path, 5)).entries
    again = cache_queries(entries, out, p, shard_size=2, progress=False)
    assert again == {**again, "images": 3, "shards_skipped": 1, "shards_recomputed": 1}
    assert (out / "queries-000000.npz").stat().st_mtime_ns == kept  # reused as it is
    said = capsys.readouterr().out.splitlines()
    assert len(said) == 1 and "queries-000001.npz: computed for other images than the manifest's entries 2..3" in said[0]
    with np.load(out / "queries-000001.npz") as z:
        assert z["entries"].tolist() == z["images"].tolist() == ["im/2.png", "im/3.png"]
    cache = QueryCache(out)
    assert all(cache.get(e.image) is not None for e in entries)
    assert cache_queries(entries, out, p, shard_size=2, progress=False)["shards_skipped"] == 3
    # other parameters: every shard is recomputed with them (the boxes of max_boxes=5 were kept)
    capsys.readouterr()
    again = cache_queries(entries, out, QueryParams(max_boxes=1), shard_size=2, progress=False)
    assert (again["shards_skipped"], again["shards_recomputed"]) == (0, 3)
    assert "or with other parameters" in capsys.readouterr().out
    assert all(len(QueryCache(out).get(e.image)[0]) == 1 for e in entries)
    # a larger --shard-size: shards 1 and 2 of the old layout would be read over the new ones
    (out / "queries-000002.npz").rename(out / "queries-000007.npz")
    again = cache_queries(entries, out, QueryParams(max_boxes=1), shard_size=3, progress=False)
    assert (again["shards_recomputed"], again["shards_removed"]) == (2, 1)
    assert sorted(f.name for f in out.glob("queries-*.npz")) == ["queries-000000.npz", "queries-000001.npz"]


def test_query_cache_without_entries_record_is_judged_by_its_contents(tmp_path: Path) -> None:
    """A cache written before shards recorded their entries: kept when its images and failed images
    are the shard's entries, recomputed otherwise."""
    out = tmp_path / "q"
    out.mkdir()
    entries = read_manifest(_scene_manifest(tmp_path, 3)).entries
    box = [np.array([[1, 2, 3, 4]], np.float32)]

    def old_file(k: int, images: list[str], failed: list[str]) -> None:
        np.savez(out / f"queries-{k:06d}.npz", images=np.array(images, np.str_), paths=np.array(images, np.str_),
                 offsets=np.arange(len(images) + 1, dtype=np.int64), boxes=np.concatenate(box * len(images)),
                 scores=np.ones(len(images), np.float32), failed_images=np.array(failed, np.str_),
                 failed_reasons=np.array(["file not found"] * len(failed), np.str_))  # fmt: skip

    old_file(0, ["im/1.png"], ["im/0.png"])  # matches shard 0 (im/0, im/1)
    old_file(1, ["im/9.png"], [])  # does not match shard 1 (im/2)
    counts = cache_queries(entries, out, QueryParams(max_boxes=5), shard_size=2, progress=False)
    assert counts["shards_skipped"] == 1 and counts["shards_recomputed"] == 1 and counts["images"] == 1
    cache = QueryCache(out)
    assert cache.get("im/1.png")[0].tolist() == [[1, 2, 3, 4]] and cache.failed == {"im/0.png": "file not found"}
    assert cache.get("im/9.png") is None and len(cache.get("im/2.png")[0]) >= 1


def test_unreadable_images_are_found_by_path_like_the_boxes(tmp_path: Path) -> None:
    """A manifest naming the cached files by other strings (another folder, a vocab's rewritten
    manifest) found their boxes by resolved path, but not their failure: an unreadable image was
    counted as 'without queries' and only skipped in the middle of training."""
    first = _scene_manifest(tmp_path, 2)
    (tmp_path / "im" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with open(first, "a") as f:
        f.write(json.dumps({"image": "im/bad.png", "labels": ["a"]}) + "\n")
    out = tmp_path / "q"
    counts = cache_queries(read_manifest(first).entries, out, QueryParams(max_boxes=5), progress=False)
    assert (counts["images"], counts["failed"]) == (2, 1)
    (tmp_path / "sub").mkdir()
    other = _lines(tmp_path / "sub" / "m.jsonl", [{"image": f"../im/{n}.png", "labels": ["a", "b"]} for n in (0, 1, "bad")])
    cache = QueryCache(out)
    entries = read_manifest(other).entries
    assert [cache.is_failed(e.image, e.path) for e in entries] == [False, False, True]
    assert cache.failed_reason(entries[2].image) is None  # the string alone is not the cached one
    assert cache.failed_reason(entries[2].image, entries[2].path) == cache.failed["im/bad.png"]
    data = build_pretrain_data(_cfg(f"data.manifest={other}", f"data.queries={out}", "data.heldout=0"))
    assert (data.counts["excluded_unreadable"], data.counts["without_queries"], data.counts["used"]) == (1, 0, 2)


def _tar_images(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return [json.loads(tar.extractfile(m).read())["image"] for m in tar.getmembers() if m.name.endswith(".json")]


def test_data_shards_are_rewritten_when_their_entries_changed(tmp_path: Path, capsys) -> None:
    out = tmp_path / "shards"
    entries = read_manifest(_scene_manifest(tmp_path, 3)).entries
    labels = [e.labels for e in entries]
    c = write_shards(entries, labels, out, shard_size=2)
    assert c["shards_written"] == 2 and _tar_images(out / "shard-000001.tar") == ["im/2.png"]
    assert json.loads((out / "shard-000001.entries.json").read_text()) == {"images": ["im/2.png"], "labels": [["b"]]}
    kept = (out / "shard-000000.tar").stat().st_mtime_ns
    capsys.readouterr()
    entries = read_manifest(_scene_manifest(tmp_path, 5)).entries  # two lines appended
    labels = [e.labels for e in entries]
    c = write_shards(entries, labels, out, shard_size=2)
    assert (c["shards_written"], c["shards_skipped"], c["shards_rewritten"], c["written"]) == (2, 1, 1, 3)
    assert "shard-000001.tar: written for other images or classes than the manifest's entries 2..3" in capsys.readouterr().out
    assert (out / "shard-000000.tar").stat().st_mtime_ns == kept
    assert [_tar_images(out / f"shard-{k:06d}.tar") for k in range(3)] == [
        ["im/0.png", "im/1.png"], ["im/2.png", "im/3.png"], ["im/4.png"]
    ]  # fmt: skip
    # other classes for the same images: rewritten too
    labels[0] = ["c"]
    assert write_shards(entries, labels, out, shard_size=2)["shards_rewritten"] == 1
    # a shard written before the record existed is rewritten
    (out / "shard-000002.entries.json").unlink()
    c = write_shards(entries, labels, out, shard_size=2)
    assert (c["shards_skipped"], c["shards_rewritten"]) == (2, 1) and (out / "shard-000002.entries.json").exists()
    # the manifest shrinks to 3 lines: the third shard would bring im/4 back, it is removed
    (out / "shard-000002.failed.jsonl").write_text('{"image": "im/4.png", "reason": "x"}\n')
    capsys.readouterr()
    c = write_shards(entries[:3], labels[:3], out, shard_size=2)
    assert (c["shards_skipped"], c["shards_rewritten"], c["shards_removed"]) == (1, 1, 1)
    assert "removed 1 shards numbered beyond the manifest's 2" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("shard-*")) == [
        f"shard-{k:06d}.{x}" for k in range(2) for x in ("entries.json", "failed.jsonl", "tar")
    ]  # fmt: skip
    assert (out / "failed.jsonl").read_text() == ""
    # a rank other than 0 removes nothing (rank 0 does, once)
    (out / "shard-000007.tar").write_bytes(b"")
    assert "shards_removed" not in write_shards(entries[:3], labels[:3], out, shard_size=2, rank=1, world_size=2)
    assert (out / "shard-000007.tar").exists()


# ---------------------------------------------------------------------------------------------
# Pre-training config keys that were ignored
# ---------------------------------------------------------------------------------------------
def test_data_images_is_honoured_for_a_coco_json_read_as_manifest(tmp_path: Path) -> None:
    (tmp_path / "ann").mkdir()
    (tmp_path / "pics").mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "pics" / "x.jpg")
    coco = {"images": [{"id": 1, "file_name": "x.jpg"}], "categories": [COCO_CAT],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 9, 9]}]}  # fmt: skip
    (tmp_path / "ann" / "train.json").write_text(json.dumps(coco))
    (tmp_path / "q").mkdir()
    write_query_file(tmp_path / "q" / "queries-000000.npz", images=["x.jpg"], paths=[str(tmp_path / "pics/x.jpg")],
                     boxes=[np.array([[1, 1, 9, 9]], np.float32)], scores=[np.ones(1, np.float32)])  # fmt: skip
    for fmt in ("coco", "manifest"):
        data = build_pretrain_data(_cfg(f"data.format={fmt}", f"data.manifest={tmp_path / 'ann/train.json'}",
                                        f"data.images={tmp_path / 'pics'}", f"data.queries={tmp_path / 'q'}",
                                        "data.heldout=0"))  # fmt: skip
        assert data.dataset.paths == [str(tmp_path / "pics" / "x.jpg")], fmt


def test_shards_reject_manifest_only_keys(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"data.min_images=3 filters a manifest's classes; .*predet data vocab --min-images"):
        build_pretrain_data(_cfg("data.format=shards", "data.shards=x", "data.min_images=3"))
    with pytest.raises(UserError, match=r"data.heldout=10 holds out a slice of a manifest .* \(unset it\)"):
        build_pretrain_data(_cfg("data.format=shards", "data.shards=x", "data.heldout=10"))
    # 0 and the default held-out size (a manifest's, not an ask) pass: the shards are checked next
    for heldout in ("data.heldout=0", "data.min_images=1"):
        with pytest.raises(UserError, match="data.shards: no shard files at 'x'"):
            build_pretrain_data(_cfg("data.format=shards", "data.shards=x", heldout))


def test_shards_and_a_manifest_together_are_an_error_not_a_guess() -> None:
    """A config that names a manifest (e.g. tiny_cpu.yaml's builtin:tiny) plus data.shards=...
    trained on the manifest and ignored the shards; now the user says which."""
    with pytest.raises(UserError, match=r"^data.shards='s/x.tar' and data.manifest='builtin:tiny' are both set: "
                                        r"add data.format=shards .* or data.shards=null"):  # fmt: skip
        build_pretrain_data(_cfg("data.manifest=builtin:tiny", "data.shards=s/x.tar"))
    # with data.format=shards the shards are read (and checked) whatever the manifest says
    with pytest.raises(UserError, match="data.shards: no shard files at 's/x.tar'"):
        build_pretrain_data(_cfg("data.manifest=builtin:tiny", "data.shards=s/x.tar", "data.format=shards"))


# ---------------------------------------------------------------------------------------------
# predet bench data and predet data queries
# ---------------------------------------------------------------------------------------------
def test_bench_data_without_images_is_one_line_error(tmp_path: Path, capsys) -> None:
    assert main(["bench", "data", "--images", "0"]) == 2
    assert "--images and --repeats must be >= 1, got 0 and 2" in _one_line_error(capsys)
    m = _lines(tmp_path / "m.jsonl", [{"image": "gone0.jpg"}, {"image": "gone1.jpg"}])
    assert main(["bench", "data", "--images", "4", "--manifest", str(m)]) == 2
    err = _one_line_error(capsys)
    assert "m.jsonl: none of its 2 images can be read (first: " in err and "gone0.jpg: file not found)" in err


def test_malformed_truth_is_named_before_queries_are_computed(tmp_path: Path, capsys) -> None:
    m = _scene_manifest(tmp_path, 2)
    truth = _lines(tmp_path / "truth.jsonl", [{"image": "im/0.png", "boxes": [[15, 10, 70, 60]]},
                                              {"image": "im/1.png", "boxes": [[1, 2, 3]]}])  # fmt: skip
    out = tmp_path / "q"
    assert main(["data", "queries", "--manifest", str(m), "--out", str(out), "--workers", "1"]) == 2
    assert "truth.jsonl:2: 'boxes' must be a list of [x1, y1, x2, y2] boxes, got [[1, 2, 3]]" in _one_line_error(capsys)
    assert not out.exists()  # nothing computed
    _lines(truth, [{"image": "im/0.png", "boxes": []}, "", {"image": "im/1.png"}])
    assert [(im, b.shape) for im, b in read_truth_boxes(truth)] == [("im/0.png", (0, 4)), ("im/1.png", (0, 4))]
    for bad, fragment in [("{oops", "truth.jsonl:1: not a UTF-8 JSON line"),
                          ('{"boxes": []}', "truth.jsonl:1: expected a JSON object with an 'image' string"),
                          ('{"image": "a", "boxes": [[1, 2, 3, "x"]]}', "truth.jsonl:1: 'boxes' must be")]:  # fmt: skip
        _lines(truth, [bad])
        with pytest.raises(UserError, match=fragment):
            read_truth_boxes(truth)
