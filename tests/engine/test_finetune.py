"""Fine-tuning: schedule, optimizer groups, data order, init loading, data formats, and tiny end-to-end
runs of Mask R-CNN (COCO), Faster R-CNN (VOC XML) and RetinaNet (LVIS-style) with evaluation."""

from __future__ import annotations

import contextlib
import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from predet.cli import main
from predet.config import FinetuneConfig, PretrainConfig, load_config
from predet.data.detection import (
    DetectionDataset,
    load_coco_json,
    load_voc,
    resolve_split,
    segm_to_mask,
)
from predet.engine.common import WarmupStepSchedule
from predet.engine.finetune import StepBatchSampler, build_optimizer, finetune, schedule
from predet.errors import UserError
from predet.modeling.backbone import build_backbone
from predet.modeling.detectors import build_detector, load_init
from predet.utils import load_checkpoint

TINY = "configs/finetune/mask_rcnn_tiny_cpu.yaml"
KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/engine/conftest.py


def tiny_cfg(*overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, TINY, ["train.num_threads=1", *overrides])


# --------------------------------------------------------------------------------------------
# Schedule, optimizer, data order
# --------------------------------------------------------------------------------------------
def test_schedule_coco_and_scaled() -> None:
    cfg = load_config(FinetuneConfig, None, ["train.batch_size=16"])
    assert schedule(cfg, 118_287) == (90_000, [60_000, 80_000])  # COCO 1x: steps at 2/3 and 8/9
    cfg = load_config(FinetuneConfig, None, ["train.batch_size=16", "train.schedule=3x"])
    assert schedule(cfg, 118_287) == (270_000, [180_000, 240_000])
    # a 1% subset at batch 4: the same ~12.17 epochs -> ceil(90000*16/118287 * 1183/4) iterations
    cfg = load_config(FinetuneConfig, None, ["train.batch_size=4"])
    assert schedule(cfg, 1183)[0] == 3601
    assert schedule(cfg, 1183, world_size=2)[0] == 1801
    cfg = load_config(FinetuneConfig, None, ["train.iters_per_x=100", "train.schedule=2x"])
    assert schedule(cfg, 10) == (200, [133, 178])
    cfg = load_config(FinetuneConfig, None, ["train.steps=50", "train.lr_steps=[40]"])
    assert schedule(cfg, 10) == (50, [40])
    with pytest.raises(UserError, match="train.schedule"):
        schedule(load_config(FinetuneConfig, None, ["train.schedule=long"]), 10)


def test_lr_factor_warmup_and_steps() -> None:
    """Fine-tuning's schedule is pre-training's (one schedule): warm-up, x0.1 at the lr steps."""
    lr_factor = WarmupStepSchedule(warmup_steps=10, warmup_factor=0.001, milestones=[60, 80])
    f = [lr_factor(s) for s in (0, 5, 10, 59, 60, 80)]
    assert f == pytest.approx([0.001, 0.5005, 1.0, 1.0, 0.1, 0.01])


def test_mask_head_lr_is_4x() -> None:
    cfg = tiny_cfg("model.fpn_channels=64", "model.box_head_dim=256")
    model = build_detector(cfg, ["a", "b"])
    opt = build_optimizer(model, cfg)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.04])
    mask_params = list(model.roi_heads.mask_head.parameters()) + list(model.roi_heads.mask_predictor.parameters())
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for p in mask_params}
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in model.parameters())


def test_step_batches_split_by_rank_and_resume() -> None:
    full = list(StepBatchSampler(num_items=10, batch_size=2, seed=3, start=0, total=9))
    ranks = [list(StepBatchSampler(num_items=10, batch_size=1, seed=3, start=0, total=9, rank=r, world_size=2))
             for r in range(2)]  # fmt: skip
    for s in range(9):  # two ranks of batch 1 see exactly the items of one process with batch 2
        assert ranks[0][s] + ranks[1][s] == full[s]
    assert list(StepBatchSampler(num_items=10, batch_size=2, seed=3, start=4, total=9)) == full[4:]
    # every epoch is a permutation: 5 steps of 2 cover the 10 items of epoch 0 exactly once
    assert sorted(i for b in full[:5] for e, i in b) == list(range(10))
    assert {e for b in full[5:] for e, _ in b} == {1}
    # one rank split for both engines: with whole batches per epoch, fine-tuning's order is
    # pre-training's, rank for rank (B=2 per rank, W=2)
    from predet.data.stream import EpochBatchSampler

    for r in range(2):
        step_order = list(StepBatchSampler(num_items=12, batch_size=2, seed=3, start=0, total=6, rank=r,
                                           world_size=2))  # fmt: skip
        stream = iter(EpochBatchSampler(num_items=12, batch_size=2, seed=3, rank=r, world_size=2))
        assert step_order == [next(stream) for _ in range(6)]
    # a data set smaller than a batch wraps into the next epoch
    small = list(StepBatchSampler(num_items=3, batch_size=4, seed=0, start=0, total=3))
    assert [len(b) for b in small] == [4, 4, 4] and sorted(i for e, i in small[0] if e == 0) == [0, 1, 2]


# --------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def export_file(tmp_path_factory) -> tuple[Path, dict]:
    """A torchvision-format export (``body.*``, ``fpn.*``) of a resnet18 + 64-channel FPN, random values."""
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", norm="bn", fpn_channels=64)
    state = {k: (v + torch.rand_like(v) if v.is_floating_point() else v) for k, v in backbone.state_dict().items()}
    path = tmp_path_factory.mktemp("init") / "predet.pth"
    torch.save(state, path)
    return path, state


def test_export_loads_every_backbone_and_fpn_tensor(export_file) -> None:
    path, state = export_file
    model = build_detector(tiny_cfg("model.fpn_channels=64", "model.box_head_dim=256"), ["a", "b"])
    report = load_init(model, str(path))
    assert report.name == "predet" and report.missing == [] and report.unused == []
    assert report.loaded == sorted(state)
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_retinanet_shifts_fpn_levels(export_file) -> None:
    path, state = export_file
    model = build_detector(tiny_cfg("model.arch=retinanet", "model.fpn_channels=64"), ["a", "b"])
    report = load_init(model, str(path))
    got = model.backbone.state_dict()
    for i in range(3):  # export's C3..C5 blocks (1..3) are RetinaNet's 0..2
        for kind in ("inner_blocks", "layer_blocks"):
            assert torch.equal(got[f"fpn.{kind}.{i}.0.weight"], state[f"fpn.{kind}.{i + 1}.0.weight"])
    assert report.missing == [f"fpn.extra_blocks.{p}.{w}" for p in ("p6", "p7") for w in ("bias", "weight")]
    assert report.unused == ["fpn.inner_blocks.0.0.bias", "fpn.inner_blocks.0.0.weight",
                             "fpn.layer_blocks.0.0.bias", "fpn.layer_blocks.0.0.weight"]  # fmt: skip
    assert all(torch.equal(got[k], state[k]) for k in got if k.startswith("body."))


def test_plain_resnet_state_dict_and_scratch(tmp_path: Path) -> None:
    resnet = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(resnet.state_dict(), path)
    model = build_detector(tiny_cfg("model.norm=frozenbn", "model.fpn_channels=64", "model.box_head_dim=256"), ["a"])
    report = load_init(model, str(path))
    assert report.unused == ["fc.bias", "fc.weight"]
    assert report.missing == sorted(k for k in model.backbone.state_dict() if k.startswith("fpn."))
    ref = {k: v for k, v in resnet.state_dict().items() if not k.endswith("num_batches_tracked")}
    body = model.backbone.body.state_dict()
    assert all(torch.equal(body[k], v) for k, v in ref.items() if k in body)
    assert len(report.loaded) == len([k for k in body])  # every body tensor came from the file
    scratch = load_init(model, "scratch")
    assert scratch.loaded == [] and scratch.missing == sorted(model.backbone.state_dict())


def test_wrong_depth_is_a_user_error(export_file) -> None:
    path, _ = export_file
    model = build_detector(tiny_cfg("model.backbone=resnet50", "model.fpn_channels=64", "model.box_head_dim=256"), ["a"])
    with pytest.raises(UserError, match=r"tensor 'body\.layer1\.0\.conv1\.weight' has shape"):
        load_init(model, str(path))
    # R18 and R34 share the widths of every common tensor: the depth is checked by the blocks
    r34 = build_detector(tiny_cfg("model.backbone=resnet34", "model.fpn_channels=64", "model.box_head_dim=256"), ["a"])
    with pytest.raises(UserError, match=r"body is not the model's .*: 80 body tensors of the model are not in the "
                                        r"file \(layer1\.2, layer2\.2, layer2\.3, layer3\.2\.\.\.\)"):  # fmt: skip
        load_init(r34, str(path))
    r34_file = path.parent / "r34.pth"
    torch.save(r34.backbone.state_dict(), r34_file)
    r18 = build_detector(tiny_cfg("model.fpn_channels=64", "model.box_head_dim=256"), ["a"])
    with pytest.raises(UserError, match=r"body is not the model's .*: 80 of the file are not in the model"):
        load_init(r18, str(r34_file))


# --------------------------------------------------------------------------------------------
# Data formats
# --------------------------------------------------------------------------------------------
def coco_to_voc(gt: dict, out: Path) -> Path:
    """Write a COCO dict as VOC XML files (1-based inclusive pixels); the first box is 'difficult'."""
    out.mkdir(parents=True, exist_ok=True)
    names = {c["id"]: c["name"] for c in gt["categories"]}
    for img in gt["images"]:
        root = ET.Element("annotation")
        ET.SubElement(root, "filename").text = img["file_name"]
        size = ET.SubElement(root, "size")
        ET.SubElement(size, "width").text, ET.SubElement(size, "height").text = str(img["width"]), str(img["height"])
        ET.SubElement(size, "depth").text = "3"
        for j, a in enumerate(x for x in gt["annotations"] if x["image_id"] == img["id"]):
            obj = ET.SubElement(root, "object")
            ET.SubElement(obj, "name").text = names[a["category_id"]]
            ET.SubElement(obj, "difficult").text = "1" if (img["id"], j) == (gt["images"][0]["id"], 0) else "0"
            x, y, w, h = a["bbox"]
            bb = ET.SubElement(obj, "bndbox")
            for k, v in zip(("xmin", "ymin", "xmax", "ymax"), (x + 1, y + 1, x + w, y + h)):
                ET.SubElement(bb, k).text = str(v)
        ET.ElementTree(root).write(out / f"{Path(img['file_name']).stem}.xml")
    return out


def coco_to_lvis(gt: dict, out: Path) -> Path:
    """LVIS-style JSON: no iscrowd, per-image negative / not-exhaustive lists, category frequencies."""
    lvis = json.loads(json.dumps(gt))
    present: dict[int, set] = {}
    for a in lvis["annotations"]:
        a.pop("iscrowd", None)
        present.setdefault(a["image_id"], set()).add(a["category_id"])
    cats = [c["id"] for c in lvis["categories"]]
    for i, img in enumerate(lvis["images"]):
        absent = [c for c in cats if c not in present.get(img["id"], set())]
        img["neg_category_ids"] = absent[: len(absent) // 2]
        img["not_exhaustive_category_ids"] = sorted(present.get(img["id"], set()))[:1] if i % 3 == 0 else []
    for c, freq in zip(lvis["categories"], "rcf" * len(cats)):
        c["frequency"] = freq
    out.write_text(json.dumps(lvis))
    return out


def test_voc_conversion_and_difficult(tiny_world: Path, tmp_path: Path) -> None:
    gt = load_coco_json(tiny_world / "det" / "val.json")
    voc = load_voc(coco_to_voc(gt, tmp_path / "Annotations"))
    assert [c["name"] for c in voc["categories"]] == sorted(c["name"] for c in gt["categories"])
    src = sorted((a["image_id"], tuple(a["bbox"])) for a in gt["annotations"])
    got = sorted((a["image_id"], tuple(a["bbox"])) for a in voc["annotations"])
    assert np.allclose([b for _, b in got], [b for _, b in src], atol=1e-4)
    assert sum(a["iscrowd"] for a in voc["annotations"]) == 1
    split = tmp_path / "ImageSets" / "Main" / "val.txt"
    split.parent.mkdir(parents=True)
    split.write_text("\n".join(Path(i["file_name"]).stem for i in gt["images"][:5]) + "\n")
    assert len(load_voc(split)["images"]) == 5


def test_builtin_split_resolves_to_the_cached_world(tmp_path: Path, monkeypatch) -> None:
    world = tmp_path / "worlds" / "small-seed3"
    world.mkdir(parents=True)
    from predet.data.builtin import generator_fingerprint

    # a finished world made by this code: nothing is generated
    (world / ".complete").write_text(json.dumps({"fingerprint": generator_fingerprint()}))
    monkeypatch.setenv("PREDET_CACHE", str(tmp_path))
    assert resolve_split("builtin:small:3", "", "val") == (str(world / "det" / "val.json"), str(world / "det" / "images"))
    assert resolve_split("builtin:small:3", "/imgs", "train") == (str(world / "det" / "train.json"), "/imgs")
    assert resolve_split("a.json", "imgs", "train") == ("a.json", "imgs")


def test_dataset_targets_flip_and_subset(tiny_world: Path) -> None:
    gt = load_coco_json(tiny_world / "det" / "train.json")
    images = tiny_world / "det" / "images"
    plain = DetectionDataset(gt, images, train=True, with_masks=True, flip_p=0.0)
    flipped = DetectionDataset(gt, images, train=True, with_masks=True, flip_p=1.0)
    img, t = plain[0]
    img_f, t_f = flipped[(3, 0)]
    w = img.shape[-1]
    assert torch.equal(img_f, img.flip(-1)) and torch.equal(t_f["masks"], t["masks"].flip(-1))
    assert torch.allclose(t_f["boxes"][:, [2, 0]], w - t["boxes"][:, [0, 2]])
    for box, mask in zip(t["boxes"], t["masks"]):  # masks agree with boxes (±1 px)
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert torch.allclose(torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float(), box, atol=1.01)
    assert t["labels"].min() >= 1 and t["labels"].max() <= len(plain.classes)
    sub = DetectionDataset(gt, images, train=True, subset=10, seed=1)
    assert len(sub) == 10 and sub.ids == DetectionDataset(gt, images, train=True, subset=10, seed=1).ids
    assert sub.ids != DetectionDataset(gt, images, train=True, subset=10, seed=2).ids
    # data.subset_seed: one subset whatever the run's seed (the draw of seed=5), the order still
    # follows the run's seed
    fixed = [DetectionDataset(gt, images, train=True, subset=10, seed=s, subset_seed=5) for s in (1, 2)]
    assert fixed[0].ids == fixed[1].ids == DetectionDataset(gt, images, train=True, subset=10, seed=5).ids
    assert fixed[0].ids != sub.ids and fixed[0].seed == 1 and fixed[1].seed == 2
    with pytest.raises(UserError, match="data.subset=1000"):
        DetectionDataset(gt, images, train=True, subset=1000)
    assert segm_to_mask([], 4, 5).shape == (4, 5)


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------
def split_overrides(train_ann: Path, val_ann: Path, images: Path, fmt: str = "coco") -> list[str]:
    return [f"data.format={fmt}", f"data.train.ann={train_ann}", f"data.train.images={images}",
            f"data.val.ann={val_ann}", f"data.val.images={images}"]  # fmt: skip


def reference_eval(gt: dict, predictions: Path, iou_type: str) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        dets = json.loads(predictions.read_text())
        if iou_type == "segm":
            for d in dets:
                d.pop("bbox")
        E = COCOeval(coco, coco.loadRes(dets), iou_type)
        E.evaluate(), E.accumulate(), E.summarize()
    return {k: (None if s < 0 else 100 * s) for k, s in zip(KEYS, E.stats[:6])}


def assert_matches_reference(results: dict, gt: dict, run: Path) -> None:
    for iou_type, res in results.items():
        ref = reference_eval(gt, run / "predictions.json", iou_type)
        for k in KEYS:
            assert (res[k] is None) if ref[k] is None else res[k] == pytest.approx(ref[k], abs=1e-4), (iou_type, k)


@pytest.fixture(scope="module")
def predet_export(tmp_path_factory) -> Path:
    """A PreDet model of configs/pretrain/tiny_cpu.yaml exported with ``predet export --format torchvision``."""
    from predet.export import export_backbone
    from predet.modeling.predet import build_predet

    torch.manual_seed(0)
    model = build_predet(load_config(PretrainConfig, "configs/pretrain/tiny_cpu.yaml"), num_classes=6)
    out = tmp_path_factory.mktemp("export") / "predet.pth"
    export_backbone(model.state_dict(), "torchvision", out, box_head=True)
    return out


@pytest.mark.slow
def test_mask_rcnn_from_predet_export(tiny_world: Path, predet_export: Path, tmp_path: Path) -> None:
    det = tiny_world / "det"
    cfg = tiny_cfg(*split_overrides(det / "train.json", det / "val.json", det / "images"))
    run = finetune(cfg, str(predet_export), tmp_path / "run", progress=False)
    results = json.loads((run / "results.json").read_text())
    assert results["bbox"]["AP"] > 0 and results["segm"]["AP"] > 0
    exported = torch.load(predet_export, weights_only=True)
    init = json.loads((run / "init.json").read_text())
    assert init["init"] == "predet" and init["missing"] == []
    assert set(exported) <= set(init["loaded"])  # every backbone and FPN tensor of the export
    log = (run / "log.txt").read_text()
    logged = next(line for line in log.splitlines() if line.startswith("init loaded:")).split()[2:]
    assert set(exported) <= set(logged)
    saved = load_config(FinetuneConfig, run / "config.yaml")
    assert (saved.model.fpn_channels, saved.model.box_head_dim) == (32, 128)
    assert_matches_reference(results, load_coco_json(det / "val.json"), run)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [10, 20, 30, 40]
    assert {"loss_classifier", "loss_mask", "loss_objectness", "images_per_s"} <= set(metrics[-1])


@pytest.mark.slow
def test_faster_rcnn_on_voc_xml(tiny_world: Path, tmp_path: Path) -> None:
    det = tiny_world / "det"
    train = coco_to_voc(load_coco_json(det / "train.json"), tmp_path / "voc_train")
    val = coco_to_voc(load_coco_json(det / "val.json"), tmp_path / "voc_val")
    cfg = tiny_cfg(*split_overrides(train, val, det / "images", "voc"), "model.arch=faster_rcnn", "train.steps=4")
    run = finetune(cfg, "scratch", tmp_path / "run", progress=False)
    results = json.loads((run / "results.json").read_text())
    assert set(results) == {"bbox"}
    assert_matches_reference(results, load_voc(val), run)
    n_val = len(load_voc(val)["images"])
    scored = {"ann": str(val), "format": "voc", "images": n_val, "arch": "faster_rcnn"}
    assert json.loads((run / "scored.json").read_text()) == scored  # what predet compare pools by
    assert main(["evaluate", "--run", str(run), "--data", str(val), "--images", str(det / "images")]) == 0
    assert json.loads((run / "results.json").read_text()) == results
    # scored on another set: the record says so (compare will not pool it with val scores)
    assert main(["evaluate", "--run", str(run), "--data", str(det / "train.json"), "--images", str(det / "images")]) == 0
    again = json.loads((run / "scored.json").read_text())
    assert again == {**scored, "ann": str(det / "train.json"), "format": "coco", "images": again["images"]}
    assert again["images"] == len(load_coco_json(det / "train.json")["images"])


@pytest.mark.slow
def test_retinanet_on_lvis_style(tiny_world: Path, predet_export: Path, tmp_path: Path) -> None:
    det = tiny_world / "det"
    train = coco_to_lvis(load_coco_json(det / "train.json"), tmp_path / "lvis_train.json")
    val = coco_to_lvis(load_coco_json(det / "val.json"), tmp_path / "lvis_val.json")
    cfg = tiny_cfg(*split_overrides(train, val, det / "images", "lvis"), "model.arch=retinanet", "train.steps=4")
    run = finetune(cfg, str(predet_export), tmp_path / "run", progress=False)
    res = json.loads((run / "results.json").read_text())["bbox"]
    assert set(res) == set(KEYS) | {"APr", "APc", "APf"}
    assert all(v is None or 0 <= v <= 100 for v in res.values())
    init = json.loads((run / "init.json").read_text())
    assert init["missing"] == [f"fpn.extra_blocks.{p}.{w}" for p in ("p6", "p7") for w in ("bias", "weight")]
    assert "fpn.inner_blocks.0.0.weight" in init["unused"]


@pytest.mark.slow
def test_resume_is_exact(tiny_world: Path, tmp_path: Path) -> None:
    det = tiny_world / "det"
    base = [*split_overrides(det / "train.json", "", det / "images"), "model.arch=faster_rcnn",
            "train.lr_steps=[3]", "train.warmup_steps=2", "data.subset=12"]  # fmt: skip
    straight = finetune(tiny_cfg(*base, "train.steps=4"), "scratch", tmp_path / "a", progress=False)
    finetune(tiny_cfg(*base, "train.steps=2"), "scratch", tmp_path / "b", progress=False)
    resumed = finetune(tiny_cfg(*base, "train.steps=4"), "scratch", tmp_path / "b", resume=True, progress=False)
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    diff = max((a["model"][k].double() - b["model"][k].double()).abs().max().item() for k in a["model"])
    assert diff <= 1e-6
    assert not (tmp_path / "a" / "results.json").exists()  # no val split: no evaluation
    assert a["world_size"] == 1
    # a checkpoint of a 2-process run resumed by one (an elastic restart with fewer nodes): it
    # continues from its step, at the lr of the new global batch, and says so (one policy, as
    # pre-training's)
    from predet.utils import save_checkpoint

    save_checkpoint({**b, "world_size": 2, "rng": b["rng"] * 2}, resumed / "checkpoints" / "last.pt")
    finetune(tiny_cfg(*base, "train.steps=6"), "scratch", resumed, resume=True, progress=False)
    log = (resumed / "log.txt").read_text()
    assert ("resuming a 2-process run on 1: global batch 4 -> 2, lr 0.01 for the new global batch, "
            "the data re-split over the ranks and new RNG streams") in log
    assert torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)["step"] == 6


def test_cli_user_errors(tiny_world: Path, tmp_path: Path, capsys) -> None:
    det = tiny_world / "det"
    args = ["finetune", "--config", TINY, "--out", str(tmp_path / "run")]
    data = split_overrides(det / "train.json", det / "val.json", det / "images")
    assert main([*args, "--init", str(tmp_path / "nope.pth"), *data]) == 2
    assert "nope.pth" in capsys.readouterr().err
    # a pre-training run folder (was "file not found" for a folder that exists): the export to run
    pt = tmp_path / "pt"
    (pt / "checkpoints").mkdir(parents=True)
    assert main([*args, "--init", str(pt), *data]) == 2
    assert capsys.readouterr().err.strip() == (
        f"predet: error: --init: {pt} is a folder, not a backbone file: export it first, e.g. "
        f"`predet export --run {pt} --format torchvision --out {pt / 'backbone.pth'}`")
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("x")
    assert main([*args, "--init", "scratch", *data]) == 2
    assert "--resume" in capsys.readouterr().err and (tmp_path / "run" / "keep.txt").exists()
    assert main([*args, "--init", "scratch", "--overwrite", "model.arch=yolo", *data]) == 2
    assert "model.arch" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(Path("configs/finetune").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(FinetuneConfig, path)
    assert cfg.model.arch in ("mask_rcnn", "faster_rcnn", "retinanet") and cfg.data.format in ("coco", "lvis", "voc")
    if "x101_32x8d" in path.stem:  # the paper's settings: 16 images per step on 8 GPUs, COCO 1x = 90k
        assert cfg.model.backbone == "resnext101_32x8d" and cfg.train.batch_size * 8 == 16
        if "coco_1x" in path.stem:
            assert schedule(cfg, 118_287, world_size=8) == (90_000, [60_000, 80_000])


def test_norm_options(export_file) -> None:
    path, state = export_file
    kinds = {}
    for norm in ("frozenbn", "bn", "gn"):
        model = build_detector(tiny_cfg(f"model.norm={norm}", "model.fpn_channels=64", "model.box_head_dim=256"), ["a"])
        kinds[norm] = type(model.backbone.body.layer1[0].bn1).__name__
        if norm == "gn":  # BN weights would land in GroupNorm's affine parameters: refused
            with pytest.raises(UserError, match=r"BatchNorm statistics \('body\.bn1\.running_mean'\) for a GroupNorm model"):
                load_init(model, str(path))
            continue
        report = load_init(model, str(path))
        assert report.missing == [] and report.unused == []
    assert kinds == {"frozenbn": "FrozenBatchNorm2d", "bn": "BatchNorm2d", "gn": "GroupNorm"}
    # the reverse: a GroupNorm file for a (frozen) BN model would never normalise
    gn = build_detector(tiny_cfg("model.norm=gn", "model.fpn_channels=64", "model.box_head_dim=256"), ["a"])
    gn_file = path.parent / "gn.pth"
    torch.save(gn.backbone.state_dict(), gn_file)
    assert load_init(gn, str(gn_file)).missing == []
    frozen_model = build_detector(tiny_cfg("model.norm=frozenbn", "model.fpn_channels=64"), ["a"])
    with pytest.raises(UserError, match=r"'body\.bn1\.weight' has no BatchNorm statistics .* use model.norm=gn"):
        load_init(frozen_model, str(gn_file))
    frozen = build_detector(tiny_cfg("model.trainable_layers=3", "model.fpn_channels=64"), ["a"])
    trainable = {n.split(".")[1] for n, p in frozen.backbone.named_parameters() if p.requires_grad and n.startswith("body.")}
    assert trainable == {"layer2", "layer3", "layer4"}


@pytest.mark.slow
def test_torchrun_two_processes(tiny_world: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    det = tiny_world / "det"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "predet", "finetune",
           "--config", str(Path(TINY).resolve()), "--init", "scratch", "--out", str(tmp_path / "run"),
           *split_overrides(det / "train.json", det / "val.json", det / "images"), "model.arch=faster_rcnn",
           "train.steps=2", "train.log_every=1", "train.num_threads=1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["world_size"]) for m in metrics] == [(1, 2), (2, 2)]  # rank 0 writes, once per step
    assert "bbox" in json.loads((tmp_path / "run" / "results.json").read_text())


def test_images_without_boxes(tiny_world: Path) -> None:
    gt = load_coco_json(tiny_world / "det" / "val.json")
    empty_id = gt["images"][0]["id"]
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] != empty_id]
    images = tiny_world / "det" / "images"
    train = DetectionDataset(gt, images, train=True, with_masks=True)
    assert empty_id not in train.ids and train.num_without_boxes == 1  # as torchvision's reference scripts
    test = DetectionDataset(gt, images, train=False, with_masks=True)
    _, target = test[test.ids.index(empty_id)]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,) and target["masks"].shape[0] == 0


def test_scratch_trains_batchnorm_where_frozenbn_is_asked(tiny_world: Path, tmp_path: Path) -> None:
    """A random init has no statistics to freeze: like torchvision's detectors, --init scratch
    trains BatchNorm when model.norm is frozenbn (the fine-tuning default), and says so."""
    det = tiny_world / "det"
    cfg = tiny_cfg(*split_overrides(det / "train.json", "", det / "images"), "model.arch=faster_rcnn",
                   "model.norm=frozenbn", "train.steps=2", "data.subset=4")  # fmt: skip
    run = finetune(cfg, "scratch", tmp_path / "run", progress=False)
    assert load_config(FinetuneConfig, run / "config.yaml").model.norm == "bn"
    assert "trains BatchNorm instead" in (run / "log.txt").read_text()
    state = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    assert int(state["backbone.body.bn1.num_batches_tracked"]) == 2  # trained BN, 2 steps


def test_subset_images_is_one_fixed_draw() -> None:
    from predet.engine.evaluate import subset_images

    gt = {"images": [{"id": i} for i in (5, 1, 9, 3, 7)], "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": k, "image_id": i} for k, i in enumerate((5, 5, 1, 9, 3, 7, 7))]}  # fmt: skip
    sub = subset_images(gt, 3)
    ids = sorted(img["id"] for img in sub["images"])
    # the draw: permutation(5) of default_rng(0) over the sorted ids [1, 3, 5, 7, 9], first 3
    want = sorted([1, 3, 5, 7, 9][i] for i in np.random.default_rng(0).permutation(5)[:3])
    assert ids == want and len(ids) == 3
    assert sorted(a["image_id"] for a in sub["annotations"]) == sorted(
        a["image_id"] for a in gt["annotations"] if a["image_id"] in ids)  # fmt: skip
    assert subset_images(gt, 3) == sub and sub["categories"] == gt["categories"]
    assert subset_images(gt, None) is gt and subset_images(gt, 5) is gt and subset_images(gt, 50) is gt
    with pytest.raises(UserError, match="data.val_subset=0"):
        subset_images(gt, 0)


def test_val_subset_scores_the_same_images_whatever_the_seed(tiny_world: Path, tmp_path: Path) -> None:
    from predet.engine.evaluate import evaluate_run, subset_images

    det = tiny_world / "det"
    gt = json.loads((det / "val.json").read_text())
    want = {img["id"] for img in subset_images(gt, 3)["images"]}
    base = [*split_overrides(det / "train.json", det / "val.json", det / "images"), "model.arch=faster_rcnn",
            "train.steps=1", "data.val_subset=3", "model.score_thresh=0.0"]  # fmt: skip
    seen = []
    for seed in (0, 1):
        run = finetune(tiny_cfg(*base, f"seed={seed}"), "scratch", tmp_path / f"s{seed}", progress=False)
        preds = json.loads((run / "predictions.json").read_text())
        seen.append({p["image_id"] for p in preds})
        assert seen[-1] <= want and len(seen[-1]) > 0
        sub = subset_images(gt, 3)
        assert_matches_reference(json.loads((run / "results.json").read_text()), sub, run)
    # an explicit --data is scored whole
    full = evaluate_run(tmp_path / "s0", det / "val.json", det / "images", progress=False)
    assert len({p["image_id"] for p in json.loads((tmp_path / "s0" / "predictions.json").read_text())}) > 3
    assert set(full) == {"bbox"}


def test_evaluate_box_only_val_and_unreadable_images(tiny_world: Path, tmp_path: Path, capsys) -> None:
    """A Mask R-CNN run scored on a val set without masks gives box AP only; a truncated image is
    left out of the AP (the same AP as a val set without it); no readable image is one error."""
    import shutil

    from predet.engine.evaluate import drop_images, evaluate_predictions, evaluate_run

    det = tiny_world / "det"
    base = [*split_overrides(det / "train.json", det / "val.json", det / "images"), "train.steps=1",
            "data.val_subset=4", "model.score_thresh=0.0"]  # fmt: skip
    run = finetune(tiny_cfg(*base), "scratch", tmp_path / "run", progress=False)
    gt = json.loads((det / "val.json").read_text())
    gt["images"] = gt["images"][:4]
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in {im["id"] for im in gt["images"]}]
    for a in gt["annotations"]:
        a["segmentation"] = []
    images = tmp_path / "images"
    images.mkdir()
    for im in gt["images"]:
        shutil.copy(det / "images" / im["file_name"], images / im["file_name"])
    bad = images / gt["images"][1]["file_name"]
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    (tmp_path / "val.json").write_text(json.dumps(gt))
    capsys.readouterr()
    results = evaluate_run(run, tmp_path / "val.json", images, progress=False)
    out = capsys.readouterr().out
    assert set(results) == {"bbox"} and "have no segmentation: box AP only" in out
    assert "evaluate: 1 of 4 images unreadable" in out
    preds = json.loads((run / "predictions.json").read_text())
    assert gt["images"][1]["id"] not in {p["image_id"] for p in preds}
    assert results == evaluate_predictions(drop_images(gt, [gt["images"][1]["id"]]), preds, ("bbox",))
    (tmp_path / "elsewhere").mkdir()  # a folder that does not hold the file_name paths
    with pytest.raises(UserError, match="none of the 4 images .* can be read"):
        evaluate_run(run, tmp_path / "val.json", tmp_path / "elsewhere", progress=False)


@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
def test_boxes_are_decoded_in_float32_under_bf16_autocast(arch: str) -> None:
    """torchvision's BoxCoder casts the anchors / proposals to the deltas' dtype: under bf16 autocast
    (train.amp on a GPU) every box was bf16, coordinates in 512..1024 px multiples of 4."""
    torch.manual_seed(0)
    cfg = tiny_cfg(f"model.arch={arch}", "model.fpn_channels=32", "model.box_head_dim=64", "model.test_size=704",
                   "model.max_size=1024", "model.score_thresh=0.0", "model.detections_per_img=100")  # fmt: skip
    model = build_detector(cfg, ["a"], for_test=True).eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        boxes = model([torch.rand(3, 704, 1000)])[0]["boxes"]
    assert boxes.dtype == torch.float32 and len(boxes) > 20
    far = boxes[(boxes > 512) & (boxes < 700)]  # not clipped to the image's edge (704, 1000)
    assert far.numel() > 10 and (far % 4 == 0).float().mean() < 0.5  # bf16 steps: all of them (1.00)
