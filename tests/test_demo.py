"""`predet demo` end to end on the tiny world, with a few steps per stage."""

import json

import pytest

from predet import cli
from predet.demo import demo


@pytest.mark.slow
def test_demo_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    r = demo(out, preset="tiny", pretrain_overrides=["train.steps=3", "ckpt.every=3"],
             finetune_overrides=["train.steps=3", "train.warmup_steps=1"])
    # one row per initialisation, in the printed table and the written one
    table = (out / "compare.md").read_text()
    assert table == r["table"]
    rows = [line for line in table.splitlines() if line.startswith("|") and "---" not in line][1:]
    assert {row.split("|")[1].strip() for row in rows} == {"scratch", "cls-only", "predet"}
    assert set(r["results"]) == {"scratch", "cls-only", "predet"}
    for name, res in r["results"].items():
        for iou_type in ("bbox", "segm"):
            assert set(res[iou_type]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
            ap = res[iou_type]["AP"]
            assert ap is None or 0.0 <= ap <= 100.0
    # both pre-training runs logged the same number of steps, only PreDet has detection losses
    pre = {n: [json.loads(l) for l in (out / f"pretrain-{n}" / "metrics.jsonl").read_text().splitlines()]
           for n in ("predet", "cls-only")}
    assert [row["step"] for row in pre["predet"]] == [row["step"] for row in pre["cls-only"]]
    assert "loss_info" in pre["predet"][-1] and "loss_info" not in pre["cls-only"][-1]
    # every backbone + FPN tensor of the PreDet export was loaded by the fine-tune
    init = json.loads((out / "finetune-predet" / "init.json").read_text())
    assert init["init"] == "predet" and init["missing"] == [] and len(init["loaded"]) > 100
    for png in ("pretrain_curves.png", "finetune_curves.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["results"] == r["results"]
    # an existing demo folder is not overwritten
    assert cli.main(["demo", "--out", str(out), "--preset", "tiny"]) == 2
    assert "exists" in capsys.readouterr().err
