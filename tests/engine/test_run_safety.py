"""A run folder survives bad input: a fine-tuning whose data or init is wrong makes no folder, a
``--resume`` whose model no longer fits the checkpoint changes nothing, a resumed run trains on
its config's lr schedule, and ``predet evaluate`` names a checkpoint of another model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from predet.config import FinetuneConfig, load_config
from predet.engine.evaluate import evaluate_run
from predet.engine.finetune import finetune
from predet.errors import UserError
from predet.modeling.detectors import build_detector, load_init

TINY = "configs/finetune/mask_rcnn_tiny_cpu.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/engine/conftest.py


def _cfg(det: Path, *overrides: str) -> FinetuneConfig:
    base = [f"data.train.ann={det / 'train.json'}", f"data.train.images={det / 'images'}", "data.val.ann=",
            "model.arch=faster_rcnn", "data.subset=12", "train.log_every=1", "train.num_threads=1"]  # fmt: skip
    return load_config(FinetuneConfig, TINY, [*base, *overrides])


def _lrs(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in rows if "lr" in r}


@pytest.mark.slow
def test_resume_trains_on_the_config_schedule_and_refuses_a_model_that_does_not_fit(tiny_world, tmp_path):
    det = tiny_world / "det"
    new = ["train.steps=4", "train.lr_steps=[3]", "train.warmup_steps=2"]
    straight = finetune(_cfg(det, *new), "scratch", tmp_path / "a", progress=False)
    # the first half under another schedule (warm-up 1, decay at 1), then resumed under `new`
    finetune(_cfg(det, "train.steps=2", "train.lr_steps=[1]", "train.warmup_steps=1"), "scratch",
             tmp_path / "b", progress=False)  # fmt: skip
    saved = (tmp_path / "b" / "config.yaml").read_bytes()
    with pytest.raises(UserError) as err:  # another box head: the checkpoint does not fit
        finetune(_cfg(det, *new, "model.box_head_dim=64"), "scratch", tmp_path / "b", resume=True, progress=False)
    msg = str(err.value)
    assert "last.pt: does not fit this model" in msg and "model.box_head_dim: 128 -> 64" in msg, msg
    assert (tmp_path / "b" / "config.yaml").read_bytes() == saved  # nothing written
    resumed = finetune(_cfg(det, *new), "scratch", tmp_path / "b", resume=True, progress=False)
    a, b = _lrs(straight), _lrs(resumed)
    assert b[2] != a[2]  # the first half did run another schedule
    assert [b[s] for s in (3, 4)] == pytest.approx([a[s] for s in (3, 4)], rel=1e-9)
    assert a[4] == pytest.approx(a[3] * 0.1)  # the config's decay at step 3 took effect

    # predet evaluate with a checkpoint of another model (e.g. a pre-training's): one line
    other = tmp_path / "other.pt"
    classes = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)["classes"]
    torch.save({"model": {"body.conv1.weight": torch.zeros(8, 3, 7, 7)}, "classes": classes, "step": 1}, other)
    with pytest.raises(UserError, match=r"other\.pt: does not fit this model: .*a pre-training checkpoint"):
        evaluate_run(resumed, det / "val.json", det / "images", ckpt=other, progress=False)


def test_bad_training_data_makes_no_run_folder(tiny_world, tmp_path):
    det = tiny_world / "det"
    with pytest.raises(UserError, match="nope.json"):
        finetune(_cfg(det, f"data.train.ann={det / 'nope.json'}"), "scratch", tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # the corrected command needs no --overwrite


def test_an_init_without_backbone_tensors_is_an_error(tiny_world, tmp_path):
    """E.g. the ``--box-head`` file of an export given as ``--init``: before, it trained from a
    random backbone under the file's name."""
    head = tmp_path / "x_box_head.pth"
    torch.save({"fc6.weight": torch.zeros(32, 8), "fc6.bias": torch.zeros(32)}, head)
    model = build_detector(_cfg(tiny_world / "det"), ["a", "b"])
    with pytest.raises(UserError, match=r"x_box_head\.pth: none of its 2 tensors is a backbone or FPN tensor"):
        load_init(model, str(head))


def test_config_yaml_records_absolute_data_paths(tmp_path, monkeypatch):
    """A run folder works from any directory: its data paths are made absolute before
    config.yaml is written (`cd / && predet evaluate --run RUN` read det/val.json relative to /)."""
    from predet.config import PretrainConfig
    from predet.engine.finetune import resolve_init_widths
    from predet.engine.pretrain import _resolve
    from predet.utils import absolute_path

    monkeypatch.chdir(tmp_path)
    cfg = load_config(PretrainConfig, None, ["data.manifest=own/m.jsonl", "data.queries=q", "data.synonyms=~/s.json",
                                             "data.images=../pics", "data.shards=sh/x-{0..1}.tar"])  # fmt: skip
    d = _resolve(cfg).data
    assert (d.manifest, d.queries, d.images) == (str(tmp_path / "own/m.jsonl"), str(tmp_path / "q"), str(tmp_path.parent / "pics"))
    assert d.synonyms == str(Path.home() / "s.json") and d.shards == str(tmp_path / "sh/x-{0..1}.tar")
    assert cfg.data.manifest == "own/m.jsonl"  # a copy: the caller's config is unchanged
    tiny = str(Path(__file__).resolve().parents[2] / TINY)
    ft = resolve_init_widths(load_config(FinetuneConfig, tiny, ["data.train.ann=det/t.json", "data.train.images=det/im",
                                                                "data.val.ann=", "data.val.images="]), "scratch")  # fmt: skip
    assert (ft.data.train.ann, ft.data.train.images) == (str(tmp_path / "det/t.json"), str(tmp_path / "det/im"))
    assert (ft.data.val.ann, ft.data.val.images) == ("", "")  # unset stays unset
    for kept in ("builtin:tiny", "pipe:curl -s http://x/a.tar", "s3://bucket/x-{0..9}.tar", "/abs/m.jsonl", None):
        assert absolute_path(kept) == kept
