"""`predet compare`: the markdown table from run folders' results.json / init.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from predet.analysis.compare import compare, mean_std
from predet.cli import main


def make_run(root: Path, folder: str, init: str | None, bbox: dict, segm: dict | None = None) -> Path:
    run = root / folder
    run.mkdir(parents=True)
    results = {"bbox": bbox} | ({"segm": segm} if segm is not None else {})
    (run / "results.json").write_text(json.dumps(results))
    if init is not None:
        (run / "init.json").write_text(json.dumps({"init": init, "loaded": [], "missing": [], "unused": []}))
    return run


def ap(a: float | None, a50: float | None, a75: float | None) -> dict:
    return {"AP": a, "AP50": a50, "AP75": a75, "APs": None, "APm": 1.0, "APl": 2.0}


def test_table_rows_columns_and_gain_over_scratch(tmp_path: Path) -> None:
    runs = [
        make_run(tmp_path, "r1", "scratch", ap(10.04, 20.0, 8.96), ap(9.0, 18.25, 7.0)),
        make_run(tmp_path, "r2", "cls-only", ap(12.5, 25.0, 11.0), ap(11.0, 22.0, 10.0)),
        make_run(tmp_path, "r3", "predet", ap(14.25, 28.0, 13.0), ap(12.0, 24.0, None)),
    ]
    assert compare(runs) == (
        "| init | AP^bb | AP^bb_50 | AP^bb_75 | AP^mk | AP^mk_50 | AP^mk_75 | ΔAP^bb vs scratch |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|\n"
        "| scratch | 10.0 | 20.0 | 9.0 | 9.0 | 18.2 | 7.0 | +0.0 |\n"
        "| cls-only | 12.5 | 25.0 | 11.0 | 11.0 | 22.0 | 10.0 | +2.5 |\n"
        "| predet | 14.2 | 28.0 | 13.0 | 12.0 | 24.0 | - | +4.2 |\n"
    )


def test_boxes_only_and_name_from_folder(tmp_path: Path) -> None:
    run = make_run(tmp_path, "voc-run", None, ap(50.0, 80.0, 55.5))
    assert compare([run]) == "| init | AP^bb | AP^bb_50 | AP^bb_75 |\n|---|---:|---:|---:|\n| voc-run | 50.0 | 80.0 | 55.5 |\n"


def test_cli_prints_and_writes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = make_run(tmp_path, "r", "predet", ap(1.0, 2.0, 3.0))
    out = tmp_path / "table.md"
    assert main(["compare", str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.read_text() == compare([run]) and printed.startswith(out.read_text())
    assert main(["compare", str(tmp_path / "missing")]) == 2
    assert "run folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty")]) == 2
    assert "results.json not found" in capsys.readouterr().err
    # --out replaces an earlier table, never another file (an export's sidecar given by mistake)
    assert main(["compare", str(run), "--out", str(out)]) == 0
    sidecar = tmp_path / "backbone.json"
    sidecar.write_text('{"architecture": "resnet18"}')
    assert main(["compare", str(run), "--out", str(sidecar)]) == 2
    assert f"--out {sidecar}: exists and is not a table predet compare wrote" in capsys.readouterr().err
    assert sidecar.read_text() == '{"architecture": "resnet18"}'


def test_seeds_of_one_init_make_one_mean_std_row(tmp_path: Path) -> None:
    runs = [
        make_run(tmp_path, "p0", "predet", ap(14.0, 28.0, 13.0)),
        make_run(tmp_path, "s0", "scratch", ap(10.0, 20.0, 9.0)),
        make_run(tmp_path, "p1", "predet", ap(16.0, 30.0, 15.0)),
        make_run(tmp_path, "s1", "scratch", ap(11.0, 22.0, None)),
        make_run(tmp_path, "p2", "predet", ap(18.0, 32.0, 17.0)),
    ]
    # predet: mean 16, sample std 2; scratch: mean 10.5, std 0.707; AP75 of scratch over 1 run
    assert compare(runs) == (
        "| init | n | AP^bb | AP^bb_50 | AP^bb_75 | ΔAP^bb vs scratch |\n"
        "|---|---:|---:|---:|---:|---:|\n"
        "| predet | 3 | 16.0 ± 2.0 | 30.0 ± 2.0 | 15.0 ± 2.0 | +5.5 |\n"
        "| scratch | 2 | 10.5 ± 0.7 | 21.0 ± 1.4 | 9.0 | +0.0 |\n"
    )


def test_two_files_of_one_stem_are_two_rows_a_given_name_one(tmp_path: Path) -> None:
    def run(folder: str, init: str, path: str, a: float, named: bool = False) -> Path:
        r = make_run(tmp_path, folder, init, ap(a, 2 * a, a))
        (r / "init.json").write_text(json.dumps({"init": init, "path": path, "named": named}))
        return r

    stems = [run("a0", "backbone", "exp/predet/backbone.pth", 10.0), run("b0", "backbone", "exp/cls/backbone.pth", 30.0),
             run("a1", "backbone", "exp/predet/backbone.pth", 12.0)]  # fmt: skip
    assert compare(stems) == (
        "| init | n | AP^bb | AP^bb_50 | AP^bb_75 |\n|---|---:|---:|---:|---:|\n"
        "| backbone (exp/predet/backbone.pth) | 2 | 11.0 ± 1.4 | 22.0 ± 2.8 | 11.0 ± 1.4 |\n"
        "| backbone (exp/cls/backbone.pth) | 1 | 30.0 | 60.0 | 30.0 |\n"
    )
    # `name=predet` on the exports of two pre-training seeds (the demo's --pretrain-seeds): one row
    named = [run("p0", "predet", "d/predet.pth", 10.0, True), run("p1", "predet", "d/predet-p1.pth", 14.0, True)]
    assert compare(named).splitlines()[-1] == "| predet | 2 | 12.0 ± 2.8 | 24.0 ± 5.7 | 12.0 ± 2.8 |"


def test_demo_verdict_needs_the_noise_of_every_row() -> None:
    from predet.demo import _verdict

    def stats(*aps: list) -> dict:
        return {n: {"bbox": {"AP": list(mean_std(v))}} for n, v in zip(("predet", "cls-only", "scratch"), aps)}

    assert mean_std([30.1]) == (30.1, None)
    # one fine-tune per init: a margin of 0.1 over an unmeasured noise is no verdict
    assert _verdict(stats([30.1], [30.0], [29.9])) == (
        "an init has one fine-tune with a box AP: no verdict on noise (use --seeds 2 or more)")
    assert _verdict(stats([3.0, 3.2], [2.0, 2.2], [1.0, 1.4])) == (
        "PreDet box AP 3.1 ± 0.1: +1.0 over the better of cls-only/scratch, largest std 0.3 -> beyond noise")
    assert _verdict(stats([3.0, 3.2], [2.0, 3.0], [1.0, 1.4])).endswith("largest std 0.7 -> NOT beyond noise")


def test_runs_of_other_detectors_or_val_sets_are_not_pooled(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Two runs of one init fine-tuned differently (Faster R-CNN on VOC, Mask R-CNN on COCO) or
    scored on other sets were averaged into one row as if they were seeds."""
    def with_setup(run: Path, arch: str, ann: str, via: str, images: int = 3) -> Path:
        if via == "results":  # written by predet evaluate beside results.json
            (run / "scored.json").write_text(json.dumps({"ann": ann, "format": "coco", "images": images, "arch": arch}))
        else:  # an older run: its config.yaml
            (run / "config.yaml").write_text(f"model:\n  arch: {arch}\ndata:\n  val:\n    ann: {ann}\n")
        return run

    a = with_setup(make_run(tmp_path, "a", "pt1", ap(1.0, 2.0, 3.0)), "mask_rcnn", "/d/val.json", "results")
    b = with_setup(make_run(tmp_path, "b", "pt1", ap(3.0, 4.0, 5.0)), "mask_rcnn", "/d/val.json", "config")
    assert compare([a, b]).splitlines()[2] == "| pt1 | 2 | 2.0 ± 1.4 | 3.0 ± 1.4 | 4.0 ± 1.4 |"  # seeds: pooled
    c = with_setup(make_run(tmp_path, "c", "pt1", ap(9.0, 9.0, 9.0)), "faster_rcnn", "/voc/val", "results")
    assert main(["compare", str(a), str(c)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"predet: error: {a} and {c} share the init 'pt1' but were not fine-tuned and scored alike "
                   "(arch mask_rcnn vs faster_rcnn, ann /d/val.json vs /voc/val): compare runs of one detector "
                   "and one val set")  # fmt: skip
    d = with_setup(make_run(tmp_path, "d", "pt1", ap(9.0, 9.0, 9.0)), "mask_rcnn", "/d/train.json", "results")
    with pytest.raises(Exception, match=r"\(ann /d/val.json vs /d/train.json\)"):
        compare([a, d])
    # the same file scored on another number of images (data.val_subset): not the same set
    e = with_setup(make_run(tmp_path, "e", "pt1", ap(9.0, 9.0, 9.0)), "mask_rcnn", "/d/val.json", "results", images=50)
    with pytest.raises(Exception, match=r"\(images 3 vs 50\)"):
        compare([a, e])
    # an older run's relative val path says nothing about where it pointed: not a mismatch
    f = with_setup(make_run(tmp_path, "f", "pt1", ap(5.0, 6.0, 7.0)), "mask_rcnn", "det/val.json", "config")
    assert compare([a, f]).splitlines()[2].startswith("| pt1 | 2 | 3.0 ± 2.8 |")
    # other inits on other sets are other rows (not pooled, not refused)
    g = with_setup(make_run(tmp_path, "g", "scratch", ap(0.5, 1.0, 0.0)), "faster_rcnn", "/voc/val", "results")
    assert len(compare([a, g]).splitlines()) == 4
