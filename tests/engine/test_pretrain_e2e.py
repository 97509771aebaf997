"""End to end on the built-in tiny world with the real model and data (slow, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from predet.cli import main
from predet.utils import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "pretrain" / "tiny_cpu.yaml")
SHORT = ["train.steps=4", "train.batch_size=2", "ckpt.every=2", "train.warmup_steps=1"]

pytestmark = pytest.mark.slow


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_run(builtin_cache, tmp_path_factory):
    """``predet pretrain --config configs/pretrain/tiny_cpu.yaml`` as shipped; (run, seconds)."""
    from predet.data.builtin import resolve_builtin

    resolve_builtin("builtin:tiny", progress=False)  # generation is not part of the timing
    run = tmp_path_factory.mktemp("tiny") / "run"
    t0 = time.perf_counter()
    assert main(["pretrain", "--config", TINY, "--out", str(run)]) == 0
    return run, time.perf_counter() - t0


def test_tiny_config_learns_lookup(tiny_run):
    run, seconds = tiny_run
    rows = _rows(run)
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, len(rows) + 1)) and len(rows) >= 20
    keys = {"step", "lr", "loss", "loss_cls", "loss_crpn_cls", "loss_crpn_reg", "loss_info",
            "loss_croi_reg", "lookup_top1", "crpn_recall", "valid_queries", "images_per_s",
            "world_size"}  # fmt: skip
    assert keys <= set(rows[-1]) and rows[-1]["world_size"] == 1
    tenth = max(1, len(rows) // 10)
    first = sum(r["lookup_top1"] for r in rows[:tenth]) / tenth
    last = sum(r["lookup_top1"] for r in rows[-tenth:]) / tenth
    print(f"tiny_cpu: {len(rows)} steps in {seconds:.1f} s, lookup_top1 {first:.3f} -> {last:.3f}")
    assert last >= 3 * first, (first, last)
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.pt" in ckpts and any(n.startswith("step_") for n in ckpts)
    saved = yaml.safe_load((run / "config.yaml").read_text())  # resolved: files and the lr used
    assert Path(saved["data"]["manifest"]).is_file() and Path(saved["data"]["queries"]).is_dir()
    assert saved["train"]["lr"] == rows[-1]["lr"] * 10  # tiny_cpu: x0.1 at step 60


def test_tiny_run_exports(tiny_run, tmp_path):
    run, _ = tiny_run
    out = tmp_path / "tv.pth"
    assert main(["export", "--run", str(run), "--format", "torchvision", "--out", str(out),
                 "--box-head"]) == 0  # fmt: skip
    state = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    exported = torch.load(out, weights_only=True)
    assert set(exported) == {k.removeprefix("backbone.") for k in state if k.startswith("backbone.")}
    assert all(torch.equal(v, state[f"backbone.{k}"]) for k, v in exported.items())
    head = torch.load(tmp_path / "tv_box_head.pth", weights_only=True)
    assert torch.equal(head["fc6.weight"], state["box_head.fc6.weight"])


def test_lookup_numbers_and_pictures_of_the_tiny_run(tiny_run, tmp_path):
    """predet analyze lookup: each summary number is the mean of its per-query records, each
    record's IoU and hit follow from its boxes, both directions see the same queries, and a rerun
    gives the same file and replaces the earlier pictures."""
    from PIL import Image

    run, _ = tiny_run
    out = tmp_path / "look"
    args = ["analyze", "lookup", "--run", str(run), "--out", str(out), "--images", "6", "--threads", "1"]
    assert main([*args, "--pictures", "2"]) == 0
    got = json.loads((out / "lookup.json").read_text())
    recs = got.pop("records")
    assert got["images"] == 6 and got["queries"] == len(recs) > 0
    for key, field in (("lookup_top1_proposals", "hit"), ("chance_top1", "chance"), ("crpn_recall", "covered")):
        assert got[key] == pytest.approx(sum(float(r[field]) for r in recs) / len(recs), abs=1e-9), key

    def iou(a, b):
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
        return w * h / union

    for r in recs:
        assert 1 <= len(r["retrieved"]) <= 3 and r["sim"] == sorted(r["sim"], reverse=True)
        assert [iou(r["target"], b) for b in r["retrieved"]] == pytest.approx(r["iou"], abs=1e-5)
        assert r["hit"] == (r["iou"][0] > 0.5) and 0.0 <= r["chance"] <= float(r["covered"])
        assert all(-1e-4 <= v <= 96 + 1e-4 for b in r["retrieved"] for v in b)  # inside the 96-px view
    directions = [r["direction"] for r in recs]
    assert directions.count("1->2") == directions.count("2->1")
    for k in (0, 1):
        with Image.open(out / f"lookup_{k:03d}.png") as im:
            assert im.size[0] >= 200 and im.size[1] >= 200
    assert main([*args, "--pictures", "1"]) == 0
    again = json.loads((out / "lookup.json").read_text())
    assert again == {**got, "records": recs}  # the same images, views and numbers
    assert sorted(p.name for p in out.iterdir()) == ["lookup.json", "lookup_000.png"]


def test_lookup_of_a_cls_only_run_is_one_line(tmp_path, capsys):
    from predet.config import PretrainConfig, load_config, save_config

    run = tmp_path / "cls"
    run.mkdir()
    save_config(load_config(PretrainConfig, TINY, ["loss.crpn=false", "loss.info=false", "loss.croi_reg=false"]),
                run / "config.yaml")  # fmt: skip
    assert main(["analyze", "lookup", "--run", str(run), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"predet: error: {run}: a run without the CROI head (loss.info and loss.croi_reg off): it has no lookup"
    assert not (tmp_path / "o").exists()


def test_resume_exact_with_real_model_and_workers(builtin_cache, tmp_path):
    a, b = tmp_path / "straight", tmp_path / "split"
    args = ["pretrain", "--config", TINY, *SHORT, "data.num_workers=1"]
    assert main([*args[:3], "--out", str(a), *args[3:]]) == 0
    assert main([*args[:3], "--out", str(b), *args[3:], "train.stop_at=2"]) == 0
    assert main([*args[:3], "--out", str(b), "--resume", *args[3:]]) == 0
    wa = load_checkpoint(a / "checkpoints" / "last.pt")["model"]
    wb = load_checkpoint(b / "checkpoints" / "last.pt")["model"]
    diff = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert diff <= 1e-6
    assert [r["loss"] for r in _rows(a)] == pytest.approx([r["loss"] for r in _rows(b)], abs=1e-6)


def test_missing_manifest_exits_2_and_keeps_run(builtin_cache, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("mine")
    code = main(["pretrain", "--config", TINY, "--out", str(run), "--overwrite",
                 f"data.manifest={tmp_path / 'nope' / 'manifest.jsonl'}"])  # fmt: skip
    assert code == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("predet:")]
    assert len(err) == 1 and "manifest" in err[0] and "nope" in err[0]
    assert (run / "keep.txt").read_text() == "mine"


def test_num_classes_other_than_the_data_exits_2_before_the_run_folder(builtin_cache, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--config", TINY, "--out", str(run), "model.num_classes=99"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("predet:")]
    assert len(err) == 1 and "model.num_classes: 99 given, but the data has" in err[0], err
    from predet.data.builtin import resolve_builtin

    vocab = resolve_builtin("builtin:tiny", progress=False).manifest.parent / "synonyms.json"
    assert f"the data has {len(json.loads(vocab.read_text()))} classes" in err[0]
    assert not run.exists()


def test_torchrun_two_cpu_processes(builtin_cache, tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "predet", "pretrain", "--config", TINY, "--out", str(run), *SHORT[:2],
           "train.batch_size=2", "data.num_workers=0"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads((run / "ranks.json").read_text())
    assert ranks["world_size"] == 2 and len(set(ranks["param_sha1"])) == 1
    assert {r["world_size"] for r in _rows(run)} == {2}
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 4


def test_cls_map_logged_on_heldout_slice(builtin_cache, tmp_path):
    """With a held-out slice, cls_map (tags) and cls_map_true (truth.jsonl) are logged at every
    eval step and at the end, as mAPs in [0, 1]; without one, neither key appears."""
    run = tmp_path / "run"
    args = ["pretrain", "--config", TINY, "--out", str(run), *SHORT, "data.heldout=40", "train.eval_every=3"]
    assert main(args) == 0
    rows = _rows(run)
    evals = [r for r in rows if "cls_map" in r]
    assert [r["step"] for r in evals] == [3, 4]
    for r in evals:
        assert 0.0 < r["cls_map"] <= 1.0 and 0.0 < r["cls_map_true"] <= 1.0
    assert all("loss" in r for r in evals)  # merged into the step's row (tiny_cpu logs every step)
    plain = tmp_path / "plain"
    assert main(["pretrain", "--config", TINY, "--out", str(plain), *SHORT]) == 0  # data.heldout: 0
    assert not any("cls_map" in r for r in _rows(plain))
