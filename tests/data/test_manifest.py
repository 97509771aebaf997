"""Manifests (errors name file:line), tag normalisation, vocabulary building, robust image loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from predet.cli import main
from predet.data.images import BadImage, load_image
from predet.data.manifest import read_coco_as_manifest, read_manifest
from predet.data.vocab import build_vocab, normalize_tag, tag_to_classes
from predet.errors import UserError


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_read_manifest_paths_header_queries(tmp_path: Path) -> None:
    m = _write(
        tmp_path / "m.jsonl",
        [
            {"world": "synthetic", "drop": 0.3},  # header
            {"image": "a/1.jpg", "tags": ["#x"]},
            "",
            {"image": "/abs/2.jpg", "labels": ["dog"], "queries": [[1, 2, 3, 4], [0, 0, 5, 5]]},
        ],
    )
    man = read_manifest(m)
    assert man.header == {"world": "synthetic", "drop": 0.3}
    assert [e.path for e in man.entries] == [tmp_path / "a/1.jpg", Path("/abs/2.jpg")]
    assert [e.line for e in man.entries] == [2, 4]
    assert man.entries[0].labels is None and man.entries[1].labels == ["dog"]
    assert man.entries[1].queries.dtype == np.float32 and man.entries[1].queries.shape == (2, 4)


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ("{not json", "m.jsonl:3: not valid JSON"),
        ('["a list"]', "m.jsonl:3: expected a JSON object"),
        ('{"tags": ["#x"]}', "m.jsonl:3: missing key 'image'"),
        ('{"image": "x.jpg", "tags": "#dog"}', "m.jsonl:3: 'tags' must be a list of strings"),
        ('{"image": "x.jpg", "queries": [[1, 2, 3]]}', "m.jsonl:3: 'queries' must be a list"),
    ],
)
def test_bad_manifest_line_names_file_and_line(tmp_path: Path, bad: str, fragment: str) -> None:
    m = _write(tmp_path / "m.jsonl", [{"image": "a.jpg"}, {"image": "b.jpg"}, bad])
    with pytest.raises(UserError, match=fragment.replace("[", r"\[")):
        read_manifest(m)


def test_manifest_missing_file_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="manifest not found"):
        read_manifest(tmp_path / "nope.jsonl")


def test_normalize_tag_and_synonym_map() -> None:
    assert normalize_tag("  #Dogs ") == "dogs"
    assert normalize_tag("##PUPPY") == "puppy"
    assert normalize_tag("\uff24\uff2f\uff27") == "dog"  # full-width letters (NFKC)
    t2c = tag_to_classes({"dog": ["#dogs", "#Puppy", "#pet"], "cat": ["#kitty", "pet"]})
    assert t2c["dog"] == ["dog"] and t2c["dogs"] == ["dog"] and t2c["puppy"] == ["dog"]
    assert t2c["pet"] == ["dog", "cat"]  # a tag listed under two classes names both
    assert t2c["cat"] == ["cat"]


def test_build_vocab_counts_unique_images_and_drops_rare(tmp_path: Path) -> None:
    lines = [
        {"image": "1.jpg", "tags": ["#Dogs", "#puppy", "#sunset"]},  # dog once, not twice
        {"image": "2.jpg", "tags": ["#DOG", "#kitty"]},
        {"image": "3.jpg", "tags": ["dog", "#wow"]},
        {"image": "4.jpg", "tags": ["#bird", "#love"]},  # bird is rare -> no class left
        {"image": "5.jpg", "tags": []},
        {"image": "6.jpg", "labels": ["cat"], "tags": ["#dog"]},  # labels win over tags
    ]
    man = read_manifest(_write(tmp_path / "m.jsonl", lines))
    syn = {"dog": ["#dogs", "#puppy"], "cat": ["#kitty"], "bird": ["#birdie"]}
    v = build_vocab(man.entries, syn, min_images=2)
    assert v.classes == ["cat", "dog"]
    assert v.counts == {"cat": 2, "dog": 3}
    assert v.dropped == {"bird": 1}
    assert v.labels == [["dog"], ["cat", "dog"], ["dog"], [], [], ["cat"]]
    assert v.num_no_class == 2
    assert v.unknown_tags == {"love": 1, "sunset": 1, "wow": 1}
    with pytest.raises(UserError, match="min_images"):
        build_vocab(man.entries, syn, min_images=0)


def test_vocab_cli_writes_vocab_and_labelled_manifest(odd_images: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "vocab"
    rc = main(["data", "vocab", "--manifest", str(odd_images / "manifest.jsonl"),
               "--synonyms", str(odd_images / "synonyms.json"), "--min-images", "6", "--out", str(out)])
    assert rc == 0
    vocab = json.loads((out / "vocab.json").read_text())
    # 11 lines alternate {red, blue} / {green, unknown}: red 6, blue 6, green 5 (< 6: dropped)
    assert vocab == {"classes": ["blue", "red"], "counts": {"blue": 6, "red": 6}, "dropped": {"green": 5}}
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all(x["labels"] == ["blue", "red"] for x in lines)
    # relative image paths are rewritten to stay valid from the new folder
    assert (out / lines[0]["image"]).resolve() == (odd_images / "images/rgb.jpg").resolve()
    text = capsys.readouterr().out
    assert "6 kept, 5 with no class left" in text and "tags never seen in the synonyms: 1 distinct: unknowntag (5)" in text


def test_vocab_cli_says_when_it_lists_only_the_most_frequent_unknown_tags(tmp_path: Path, capsys) -> None:
    lines = [{"image": f"{k}.jpg", "tags": ["#dog", *[f"#t{j}" for j in range(k + 1)]]} for k in range(10)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "s.json").write_text(json.dumps({"dog": ["#dog"]}))
    assert main(["data", "vocab", "--manifest", str(tmp_path / "m.jsonl"), "--synonyms", str(tmp_path / "s.json"),
                 "--out", str(tmp_path / "v")]) == 0  # fmt: skip
    said = [x for x in capsys.readouterr().out.splitlines() if x.startswith("tags never seen")]
    # t0 in 10 images, t1 in 9, ...: 10 distinct, the 8 most frequent listed (was "10 distinct:" then 8)
    assert said == ["tags never seen in the synonyms: 10 distinct (the 8 most frequent): "
                    + ", ".join(f"t{j} ({10 - j})" for j in range(8))]


def test_vocab_cli_bad_synonyms_is_one_line_error(tmp_path: Path, capsys) -> None:
    m = _write(tmp_path / "m.jsonl", [{"image": "a.jpg", "tags": ["#x"]}])
    (tmp_path / "s.json").write_text('{"dog": "#dogs"}')
    rc = main(["data", "vocab", "--manifest", str(m), "--synonyms", str(tmp_path / "s.json"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "class 'dog' must map to a list" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------
def test_odd_images_load_as_rgb(odd_images: Path, odd_names) -> None:
    good, _ = odd_names
    ref = np.asarray(Image.open(odd_images / "images/rgb.jpg").convert("RGB"), np.float32)
    for name in good:
        img, full = load_image(odd_images / "images" / name)
        arr = np.asarray(img, np.float32)
        assert img.mode == "RGB" and img.size == full == (160, 120), name
        if name in ("gray.png", "gray16.png"):
            arr, want = arr[..., 0], ref @ np.array([0.299, 0.587, 0.114], np.float32)  # luma
            assert np.abs(arr - want).mean() < 6, name
        elif name == "rgba.png":
            assert (arr[:20, :20] == 255).all()  # transparent corner composited on white
            assert np.abs(arr[30:, 30:] - ref[30:, 30:]).mean() < 8  # ref is a JPEG
        else:  # jpeg/cmyk/palette/EXIF-rotated: same picture as rgb.jpg
            assert np.abs(arr - ref).mean() < 8, (name, np.abs(arr - ref).mean())


def test_16bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.array([[0, 256, 32768, 65535]] * 40, np.uint16).repeat(10, axis=1)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    img, _ = load_image(tmp_path / "g16.png")
    assert np.asarray(img)[0, ::10, 0].tolist() == [0, 1, 128, 255]


def test_bad_images_raise_named_reasons(odd_images: Path, odd_names) -> None:
    _, bad = odd_names
    for name, reason in bad.items():
        with pytest.raises(BadImage, match=reason) as e:
            load_image(odd_images / "images" / name)
        assert name in str(e.value)


def test_jpeg_draft_decodes_smaller_and_reports_full_size(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((768, 1024, 3), np.uint8)).save(tmp_path / "big.jpg")
    img, full = load_image(tmp_path / "big.jpg", draft_short_side=200)
    assert full == (1024, 768) and img.size == (512, 384)  # 1/4 would be under 200 px


def test_coco_as_weak_labels(tiny_world: Path) -> None:
    man = read_coco_as_manifest(tiny_world / "det/train.json")
    coco = json.loads((tiny_world / "det/train.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    first = coco["images"][0]
    want = sorted({names[a["category_id"]] for a in coco["annotations"] if a["image_id"] == first["id"]})
    assert man.entries[0].labels == want
    assert man.entries[0].path == tiny_world / "det/images" / first["file_name"]
    assert man.entries[0].queries is None  # its boxes are never queries
    assert len(man) == len(coco["images"])


def test_json_suffix_jsonl_is_read_as_lines(tmp_path: Path) -> None:
    m = _write(tmp_path / "m.json", [{"image": "a.jpg", "tags": ["#x"]}, {"image": "b.jpg"}])
    assert [e.image for e in read_manifest(m).entries] == ["a.jpg", "b.jpg"]


def test_repeated_images_count_once_and_are_named(tmp_path: Path, capsys) -> None:
    lines = [{"image": "a.jpg", "tags": ["#dog"]}, {"image": "b.jpg", "tags": ["#cat"]},
             {"image": "a.jpg", "tags": ["#dog"]}]  # fmt: skip
    man = read_manifest(_write(tmp_path / "m.jsonl", lines))
    assert build_vocab(man.entries, {"dog": ["#dog"], "cat": ["#cat"]}).counts == {"cat": 1, "dog": 1}
    (tmp_path / "s.json").write_text(json.dumps({"dog": ["#dog"], "cat": ["#cat"]}))
    args = ["data", "vocab", "--manifest", str(tmp_path / "m.jsonl"), "--synonyms", str(tmp_path / "s.json")]
    assert main([*args, "--min-images", "2", "--out", str(tmp_path / "o")]) == 2  # dog has 1 image, not 2
    assert "no class has >= 2 images" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "o")]) == 0
    assert "repeated images: 1 lines name an image of an earlier line (first: line 3 repeats line 1)" in capsys.readouterr().out
    (tmp_path / "afile").write_text("x")  # --out naming a file: one line (was FileExistsError)
    assert main([*args, "--out", str(tmp_path / "afile")]) == 2
    assert "--out" in capsys.readouterr().err and (tmp_path / "afile").read_text() == "x"


def test_utf8_bom_is_accepted_in_manifest_synonyms_and_coco(tmp_path: Path, capsys) -> None:
    """Windows editors start UTF-8 files with a BOM: the first line was 'not valid JSON'."""
    bom = "\ufeff"
    (tmp_path / "m.jsonl").write_text(bom + json.dumps({"image": "a.jpg", "tags": ["#dog"]}) + "\n", encoding="utf-8")
    (tmp_path / "s.json").write_text(bom + json.dumps({"dog": ["#dog"]}), encoding="utf-8")
    assert [e.tags for e in read_manifest(tmp_path / "m.jsonl").entries] == [["#dog"]]
    assert main(["data", "vocab", "--manifest", str(tmp_path / "m.jsonl"), "--synonyms", str(tmp_path / "s.json"),
                 "--out", str(tmp_path / "o")]) == 0  # fmt: skip
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}], "annotations": [],
            "categories": [{"id": 1, "name": "dog"}]}  # fmt: skip
    (tmp_path / "c.json").write_text(bom + json.dumps(coco), encoding="utf-8")
    from predet.data.detection import load_coco_json

    assert load_coco_json(tmp_path / "c.json")["categories"] == [{"id": 1, "name": "dog"}]
    assert [e.image for e in read_manifest(tmp_path / "c.json").entries] == ["a.jpg"]


@pytest.mark.parametrize("full,short,want", [((1001, 603), 150, 0.25), ((1024, 768), 200, 0.5), ((640, 480), 480, 1.0)])
def test_draft_scale_is_libjpegs_power_of_two(tmp_path: Path, full: tuple, short: int, want: float) -> None:
    """A painted column at x = 900 of a 1001-px JPEG decoded at 1/4 (251 px wide) is at 225 =
    900 / 4, where draft_scale puts it (size / full would say 225.7)."""
    from predet.data.images import draft_scale

    arr = np.zeros((full[1], full[0], 3), np.uint8)
    x = int(full[0] * 0.9) // 8 * 8  # an 8-aligned column: one DCT block edge
    arr[:, x : x + 8] = 255
    Image.fromarray(arr).save(tmp_path / "p.jpg", quality=95)
    img, got_full = load_image(tmp_path / "p.jpg", draft_short_side=short)
    s = draft_scale(img.size, got_full)
    assert got_full == full and s == want
    col = np.asarray(img)[:, :, 0].mean(axis=0)
    left = int(np.argmax(col > 128))  # first bright column in the decoded image
    assert abs(left - x * s) <= 0.5, (left, x * s, x * img.width / full[0])
