"""`predet data shards` on odd/broken images, resumability, and `predet bench data`'s figures."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from predet.cli import main
from predet.data.images import load_image


def _tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def test_shards_cli_bad_input_matrix_and_resume(odd_images: Path, odd_names, tmp_path: Path, capsys) -> None:
    good, bad = odd_names
    q, out = tmp_path / "q", tmp_path / "shards"
    manifest = str(odd_images / "manifest.jsonl")
    assert main(["data", "queries", "--manifest", manifest, "--out", str(q), "--workers", "1", "--max-boxes", "10"]) == 0
    assert main(["data", "shards", "--manifest", manifest, "--queries", str(q), "--out", str(out), "--shard-size", "4"]) == 0
    tars = sorted(out.glob("shard-*.tar"))
    assert len(tars) == 3  # 11 lines / 4
    samples = {}
    for t in tars:
        samples.update(_tar_samples(t))
    metas = {json.loads(s["json"])["image"]: (json.loads(s["json"]), s["jpg"]) for s in samples.values()}
    assert {Path(k).name for k in metas} == set(good)  # every good image, no bad one
    failed = [json.loads(x) for x in (out / "failed.jsonl").read_text().splitlines()]
    assert {Path(f["image"]).name for f in failed} == set(bad)
    assert json.loads((out / "vocab.json").read_text())["classes"] == ["blue", "green", "red"]
    for name, (meta, jpg) in metas.items():
        stored = Image.open(io.BytesIO(jpg))
        assert stored.format == "JPEG" and stored.mode == "RGB"
        # the stored pixels are the frame of the queries: same size as the EXIF-applied original
        assert stored.size == load_image(odd_images / name)[0].size == (160, 120), name
        assert len(meta["queries"]) >= 3 and len(meta["queries"]) == len(meta["scores"])
    # the EXIF-rotated file is stored upright: it matches the plain RGB JPEG
    a = np.asarray(Image.open(io.BytesIO(metas["images/exif_rot.jpg"][1])), np.float32)
    b = np.asarray(Image.open(io.BytesIO(metas["images/rgb.jpg"][1])), np.float32)
    assert np.abs(a - b).mean() < 8
    text = capsys.readouterr().out
    assert f"{len(good)} images in 3 new shards" in text and "4 failed" in text
    # resume: a lost shard is rewritten, finished ones are skipped
    before = _tar_samples(tars[1])
    tars[1].unlink()
    assert main(["data", "shards", "--manifest", manifest, "--queries", str(q), "--out", str(out), "--shard-size", "4"]) == 0
    assert "1 new shards (2 finished shards skipped)" in capsys.readouterr().out
    assert _tar_samples(tars[1]) == before  # same samples, byte for byte


def test_shards_without_queries_is_one_line_error(odd_images: Path, tmp_path: Path, capsys) -> None:
    rc = main(["data", "shards", "--manifest", str(odd_images / "manifest.jsonl"), "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert rc == 2 and "predet data queries" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_bench_data_reports_figures(capsys) -> None:
    assert main(["bench", "data", "--images", "3", "--repeats", "1", "--size", "160"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(
        r"query_img_s=([\d.]+) two_view_s=([\d.]+) tv2_two_view_s=([\d.]+) speedup=([\d.]+) valid_frac=([\d.]+)", last
    )
    assert m, last
    q, two, tv2, speedup, frac = map(float, m.groups())
    assert q > 0 and two > 0 and tv2 > 0
    assert speedup == pytest.approx(two / tv2, rel=0.02)
    assert 0.0 < frac < 1.0


def test_bench_data_times_a_manifest_of_png_images(tmp_path: Path, capsys) -> None:
    """The torchvision baseline decodes any format the loader reads (it took JPEG only: a PNG
    manifest was a traceback)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    lines = []
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "labels": ["a"]}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["bench", "data", "--images", "2", "--repeats", "1", "--size", "64",
                 "--manifest", str(tmp_path / "m.jsonl")]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("query_img_s=")
