"""`predet demo` end to end on a copy of the tiny world (as `--world`), with a few steps per stage."""

import json
import shutil

import pytest

from predet import cli
from predet.demo import demo, resolve_world
from predet.errors import UserError


def _world_copy(tmp_path, src):
    """A tiny world in the §6 layout, without a query cache."""
    w = tmp_path / "w"
    for sub in ("pretrain", "det"):
        shutil.copytree(src / sub, w / sub)
    return w


@pytest.mark.slow
def test_demo_on_a_world_end_to_end(tmp_path, tiny_world, capsys):
    w = _world_copy(tmp_path, tiny_world)
    out = tmp_path / "demo"
    r = demo(out, preset="tiny", world=w, seeds=2,
             pretrain_overrides=["train.steps=3", "ckpt.every=3", "data.heldout=40"],
             finetune_overrides=["train.steps=3", "train.warmup_steps=1"])  # fmt: skip
    # the world had no query cache: computed for the 3 x 4 + 40 images the pre-training reads
    import numpy as np

    from predet.data.manifest import read_manifest, sample_indices

    cached = sorted(str(im) for f in (out / "queries").glob("queries-*.npz") for im in np.load(f)["images"])
    entries = read_manifest(w / "pretrain" / "manifest.jsonl").entries
    assert cached == sorted(entries[i].image for i in sample_indices(200, 52))
    said = capsys.readouterr().out
    assert ("has 200 images; the pre-trainings see 3 x 4 = 12 of them: they read a fixed sample of 52 "
            "(10 held out) and query boxes are computed for those only") in said  # held out: at most a fifth
    assert "'manifest_images': 200, 'images': 52," in said
    # one row per initialisation with n = 2 seeds, mean ± std cells
    table = (out / "compare.md").read_text()
    assert table.startswith(r["table"])
    rows = [line for line in r["table"].splitlines() if line.startswith("|") and "---" not in line][1:]
    assert [row.split("|")[1].strip() for row in rows] == ["predet", "cls-only", "scratch"]
    assert all(row.split("|")[2].strip() == "2" and "±" in row for row in rows)
    assert "beyond" in table or "no verdict" in table
    assert all(f"- {n}: " in table.split("Per fine-tuning seed")[1] for n in ("predet", "cls-only", "scratch"))
    # each row holds its own runs: the results are those of finetune-<init>-s<k>, fine-tuned from
    # that init's export, and the table is `predet compare` of those folders
    from predet.analysis.compare import compare

    folders = [out / f"finetune-{n}-s{k}" for n in ("predet", "cls-only", "scratch") for k in (0, 1)]
    assert r["table"] == compare(folders)
    for name, results in r["results"].items():
        assert results == [json.loads((out / f"finetune-{name}-s{k}" / "results.json").read_text()) for k in (0, 1)]
        for k in (0, 1):
            used = json.loads((out / f"finetune-{name}-s{k}" / "init.json").read_text())
            assert used["init"] == name and used["path"] == (None if name == "scratch" else str(out / f"{name}.pth"))
    # both pre-trainings logged the same steps, only PreDet has detection losses; both scored cls_map
    pre = {n: [json.loads(l) for l in (out / f"pretrain-{n}" / "metrics.jsonl").read_text().splitlines()]
           for n in ("predet", "cls-only")}  # fmt: skip
    assert [row["step"] for row in pre["predet"]] == [row["step"] for row in pre["cls-only"]]
    assert "loss_info" in pre["predet"][-1] and "loss_info" not in pre["cls-only"][-1]
    for n in ("predet", "cls-only"):  # the last evaluation each pre-training logged
        last = [row for row in pre[n] if "cls_map_true" in row][-1]
        assert r["cls_map"][n] == {"cls_map": last["cls_map"], "cls_map_true": last["cls_map_true"]}
        assert 0.0 < r["cls_map"][n]["cls_map_true"] <= 1.0 and f"{n}: cls_map" in table
    # the correlation of the three inits, under the demo's names, in the json and the png
    corr = json.loads((out / "correlation.json").read_text())
    assert set(corr) == {"predet", "cls-only", "scratch"} == set(r["correlation"])
    assert all(set(v) == {"small", "medium", "large"} for v in corr.values())
    assert sum(corr["scratch"][b]["pairs"] for b in corr["scratch"]) > 0
    for png in ("pretrain_curves.png", "finetune_curves.png", "correlation.png", "lookup/lookup_000.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # PreDet's lookup on its own data: the file, the summary line of compare.md and summary.json agree
    look = json.loads((out / "lookup" / "lookup.json").read_text())
    assert look["run"] == str(out / "pretrain-predet") and look["queries"] == len(look["records"]) > 0
    summary = json.loads((out / "summary.json").read_text())["lookup"]
    assert summary == {k: v for k, v in look.items() if k != "records"}
    assert (f"lookup_top1_proposals {look['lookup_top1_proposals']:.3f} (chance {look['chance_top1']:.3f})"
            in (out / "compare.md").read_text())  # fmt: skip
    # every backbone + FPN tensor of the PreDet export was loaded by each fine-tune
    init = json.loads((out / "finetune-predet-s1" / "init.json").read_text())
    assert init["init"] == "predet" and init["missing"] == [] and len(init["loaded"]) > 100
    # every fine-tune draws the same low-shot subset (the demo's seed); the run seeds differ
    import yaml

    cfgs = [yaml.safe_load((out / f"finetune-{n}-s{s}" / "config.yaml").read_text())
            for n in ("predet", "cls-only", "scratch") for s in (0, 1)]  # fmt: skip
    assert {c["data"]["subset_seed"] for c in cfgs} == {0} and {c["seed"] for c in cfgs} == {0, 1}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["results"] == r["results"] and summary["seeds"] == 2
    assert {"world", "pretrain-predet", "pretrain-cls-only", "finetune-scratch", "correlation"} <= set(
        summary["stage_seconds"]
    )
    # an existing demo folder is not overwritten; the hint names the flag the demo has
    assert cli.main(["demo", "--out", str(out), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "exists; pass --overwrite" in err and "--resume" not in err


def _photo_world(tmp_path, src):
    """The tiny world made to look like a user's photos: box-only annotations
    (``"segmentation": []``), det images of other sizes (2x, one stored rotated with EXIF
    orientation 6, as phones save them), one truncated val image, no query cache."""
    import numpy as np
    from PIL import Image

    w = _world_copy(tmp_path, src)
    det = w / "det"
    for split in ("train", "val"):
        gt = json.loads((det / f"{split}.json").read_text())
        for a in gt["annotations"]:
            a["segmentation"] = []
        for k, im in enumerate(gt["images"][:3]):  # 2x larger, boxes in the new pixels
            path = det / "images" / im["file_name"]
            big = Image.open(path).convert("RGB").resize((im["width"] * 2, im["height"] * 2))
            if split == "train" and k == 0:
                stored = Image.fromarray(np.rot90(np.asarray(big), k=1).copy())  # viewer rotates 90 CW
                exif = Image.Exif()
                exif[0x0112] = 6
                stored.save(path, exif=exif.tobytes(), quality=95)
            else:
                big.save(path, quality=95)
            im["width"], im["height"] = im["width"] * 2, im["height"] * 2
            for a in gt["annotations"]:
                if a["image_id"] == im["id"]:
                    a["bbox"] = [v * 2 for v in a["bbox"]]
                    a["area"] = a["area"] * 4
        if split == "val":  # a damaged file in the val set
            path = det / "images" / gt["images"][-1]["file_name"]
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        (det / f"{split}.json").write_text(json.dumps(gt))
    return w


@pytest.mark.slow
def test_demo_on_a_box_only_photo_world(tmp_path, tiny_world, capsys):
    """A user's world as photos come: no masks -> Faster R-CNN and box AP; a truncated val image
    is named and left out of the AP; other sizes and EXIF orientation read as shown."""
    out = tmp_path / "demo"
    # PreDet with the CRPN alone (no CROI head): nothing to look up, the demo still finishes
    r = demo(out, preset="tiny", world=_photo_world(tmp_path, tiny_world), seeds=1,
             pretrain_overrides=["train.steps=2", "ckpt.every=2", "data.heldout=40", "loss.info=false",
                                 "loss.croi_reg=false"],
             finetune_overrides=["train.steps=2", "train.warmup_steps=1"])  # fmt: skip
    assert "PreDet's query-box lookup: none (its pre-training has no CROI head)" in (out / "compare.md").read_text()
    assert not (out / "lookup").exists() and json.loads((out / "summary.json").read_text())["lookup"] is None
    text = capsys.readouterr()
    assert "box-only annotations (train.json: " in text.out and "fine-tune Faster R-CNN from predet" in text.out
    assert text.out.count("evaluate: 1 of ") == 3  # one truncated val image, in each fine-tune's AP
    assert "skipping unreadable image" in text.err
    assert "detection images: median short side " in text.out
    assert "(long side 320 px at most)" in text.out  # the CPU plan's query scale
    for name, results in r["results"].items():
        assert set(results[0]) == {"bbox"} and 0.0 <= (results[0]["bbox"]["AP"] or 0.0) <= 100.0
    import yaml

    cfg = yaml.safe_load((out / "finetune-predet-s0" / "config.yaml").read_text())
    assert cfg["model"]["arch"] == "faster_rcnn" and cfg["model"]["detections_per_img"] == 100
    corr = json.loads((out / "correlation.json").read_text())
    assert sum(v["pairs"] for v in corr["predet"].values()) > 0


def test_world_layout_errors_name_the_missing_file(tmp_path, capsys):
    w = tmp_path / "w"
    (w / "pretrain").mkdir(parents=True)
    with pytest.raises(UserError, match=r"pretrain/manifest\.jsonl not found"):
        resolve_world(w, preset="tiny", seed=0, out=tmp_path / "o")
    (w / "pretrain" / "manifest.jsonl").write_text("")
    (w / "det").mkdir()
    (w / "det" / "train.json").write_text("{}")
    with pytest.raises(UserError, match=r"det/val\.json not found"):
        resolve_world(w, preset="tiny", seed=0, out=tmp_path / "o")
    (w / "det" / "val.json").write_text("{}")
    with pytest.raises(UserError, match=r"det/images is not a folder"):
        resolve_world(w, preset="tiny", seed=0, out=tmp_path / "o")
    assert cli.main(["demo", "--world", str(tmp_path / "nowhere"), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0] and "not found" in err[0]
    assert not (tmp_path / "d").exists()  # nothing written for a bad --world


def test_a_broken_world_file_is_an_error_before_any_compute(tmp_path, tiny_world, capsys):
    """A world's manifest classes and detection files are read before the query pass and the
    pre-trainings (a malformed det/val.json surfaced after both), and OUT is not made."""
    import shutil

    w = tmp_path / "w"
    for sub in ("pretrain", "det"):
        shutil.copytree(tiny_world / sub, w / sub)
    (w / "det" / "val.json").write_text('{"images": [')
    args = ["demo", "--preset", "tiny", "--world", str(w), "--out", str(tmp_path / "d")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "val.json" in err[0] and "not valid JSON" in err[0], err
    shutil.copy(tiny_world / "det" / "val.json", w / "det" / "val.json")
    lines = (w / "pretrain" / "manifest.jsonl").read_text().splitlines()
    tagged = [json.dumps({"image": json.loads(x)["image"], "tags": ["circle"]}) for x in lines if '"image"' in x]
    (w / "pretrain" / "manifest.jsonl").write_text("\n".join(tagged) + "\n")  # tags, and no synonyms.json
    (w / "pretrain" / "synonyms.json").unlink(missing_ok=True)
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no synonyms file" in err[0], err
    assert not (tmp_path / "d").exists()


@pytest.mark.slow
def test_gpu_preset_runs_on_cpu_with_a_tiny_budget(tmp_path, tiny_world):
    """`predet demo --preset gpu` (bench/transfer_gpu.sh): its shipped configs load and the recipe
    runs end to end on the CPU when only the step counts, batch and sizes are shrunk."""
    pre = ["train.device=cpu", "train.steps=2", "train.batch_size=2", "train.eval_every=2", "ckpt.every=2",
           "data.num_workers=0", "data.heldout=40", "model.input_size=64"]  # fmt: skip
    ft = ["train.device=cpu", "train.steps=2", "train.batch_size=1", "train.warmup_steps=1", "data.num_workers=0",
          "data.subset=4", "model.train_sizes=[64]", "model.test_size=64", "data.eval_batch_size=4"]  # fmt: skip
    r = demo(tmp_path / "d", preset="gpu", world=_world_copy(tmp_path, tiny_world), seeds=1,
             pretrain_overrides=pre, finetune_overrides=ft)  # fmt: skip
    saved = (tmp_path / "d" / "pretrain-predet" / "config.yaml").read_text()
    assert "backbone: resnet50" in saved and "fpn_channels: 256" in saved
    assert set(r["stats"]) == {"predet", "cls-only", "scratch"}
    assert all(s["n"] == 1 for s in r["stats"].values())


def test_low_shot_subset_fits_a_small_world(tiny_world, capsys):
    """A --world with fewer usable training images than the plan's subset fine-tunes on all of
    them (DetectionDataset would refuse data.subset > the usable images)."""
    from predet.config import FinetuneConfig, load_config
    from predet.demo import DemoWorld, _fit_subset

    det = tiny_world / "det"
    w = DemoWorld(tiny_world / "pretrain" / "manifest.jsonl", tiny_world / "queries",
                  det / "train.json", det / "val.json", det / "images")  # fmt: skip
    train = json.loads((det / "train.json").read_text())
    usable = len({a["image_id"] for a in train["annotations"] if not a.get("iscrowd", 0)})
    assert 0 < usable < 10_000
    cfg = lambda n: load_config(FinetuneConfig, None, [f"data.subset={n}"])  # noqa: E731
    assert _fit_subset(cfg(10_000), w) == [f"data.subset={usable}"]
    assert f"{usable} usable training images" in capsys.readouterr().out
    assert _fit_subset(cfg(usable), w) == [] and _fit_subset(cfg(1), w) == []
    assert _fit_subset(load_config(FinetuneConfig, None, []), w) == []  # no subset: all images


def test_demo_overrides_from_the_command_line_are_checked_first(tmp_path, capsys, monkeypatch):
    seen = {}
    monkeypatch.setattr("predet.demo.demo", lambda out, **kw: seen.update(kw))
    assert cli.main(["demo", "--out", str(tmp_path / "d"), "--pretrain", "train.steps=7",
                     "--finetune", "model.test_size=256", "--finetune", "train.steps=9"]) == 0  # fmt: skip
    assert seen["pretrain_overrides"] == ["train.steps=7"]
    assert seen["finetune_overrides"] == ["model.test_size=256", "train.steps=9"]
    monkeypatch.undo()
    # a typo is one line naming the key, before anything is written
    assert cli.main(["demo", "--out", str(tmp_path / "d"), "--finetune", "model.test_sise=256"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "test_sise" in err[0] and not (tmp_path / "d").exists()
    assert cli.main(["demo", "--out", str(tmp_path / "d"), "--pretrain", "train.step=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.step" in err[0] and not (tmp_path / "d").exists()


def test_per_seed_lines_list_every_run():
    from predet.demo import _per_seed_lines

    text = _per_seed_lines({
        "predet": [{"bbox": {"AP": 2.43}, "segm": {"AP": 5.82}}, {"bbox": {"AP": 1.63}, "segm": {"AP": 3.48}}],
        "scratch": [{"bbox": {"AP": None}}],
    })  # fmt: skip
    assert text.splitlines()[1:] == ["Per fine-tuning seed (AP^bb / AP^mk):",
                                     "- predet: 2.4/5.8  1.6/3.5", "- scratch: -/-"]  # fmt: skip


@pytest.mark.slow
def test_pretrain_seeds_pool_every_pretraining_into_one_row(tmp_path, tiny_world):
    """--pretrain-seeds 2: two pre-trainings per method (seeds 0 and 1, the second with a -p1
    suffix), each fine-tuned --seeds times, all pooled under the method's row; scratch runs
    seeds x 2 seeds."""
    out = tmp_path / "demo"
    r = demo(out, preset="tiny", world=_world_copy(tmp_path, tiny_world), seeds=1, pretrain_seeds=2,
             pretrain_overrides=["train.steps=2", "ckpt.every=2", "data.heldout=40"],
             finetune_overrides=["train.steps=2", "train.warmup_steps=1"])  # fmt: skip
    assert {n: len(v) for n, v in r["results"].items()} == {"predet": 2, "cls-only": 2, "scratch": 2}
    assert {n: s["n"] for n, s in r["stats"].items()} == {"predet": 2, "cls-only": 2, "scratch": 2}
    import torch
    import yaml

    for n in ("predet", "cls-only"):
        cfg0 = yaml.safe_load((out / f"pretrain-{n}" / "config.yaml").read_text())
        cfg1 = yaml.safe_load((out / f"pretrain-{n}-p1" / "config.yaml").read_text())
        assert (cfg0["seed"], cfg1["seed"]) == (0, 1)
        assert (out / f"{n}-p1.pth").is_file() and f"{n}-p1" in r["cls_map"]
        init = json.loads((out / f"finetune-{n}-p1-s0" / "init.json").read_text())
        assert init["init"] == n  # pooled under the method's name, not the file's stem
        a = torch.load(out / f"{n}.pth", weights_only=True)
        b = torch.load(out / f"{n}-p1.pth", weights_only=True)
        assert any(not torch.equal(a[k], b[k]) for k in a)  # two different pre-trainings
    assert {p.name for p in out.glob("finetune-scratch-s*")} == {"finetune-scratch-s0", "finetune-scratch-s1"}
    assert json.loads((out / "summary.json").read_text())["pretrain_seeds"] == 2


def test_bad_pretrain_seeds_is_a_user_error(tmp_path, capsys):
    assert cli.main(["demo", "--pretrain-seeds", "0", "--out", str(tmp_path / "d")]) == 2
    assert "--pretrain-seeds must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_bad_seeds_is_a_user_error(tmp_path, capsys):
    assert cli.main(["demo", "--seeds", "0", "--out", str(tmp_path / "d")]) == 2  # was the plan's 3
    assert "--seeds must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_every_plan_reads_a_builtin_world_preset(tmp_path, monkeypatch):
    """`--preset gpu` without --world (bench/transfer_gpu.sh) asked for a built-in world 'gpu':
    each plan names the world it runs on."""
    from predet.data.builtin import PRESETS
    from predet.demo import PLANS

    assert {name: plan.world for name, plan in PLANS.items()} == {"small": "small", "tiny": "tiny", "gpu": "small"}
    assert all(plan.world in PRESETS for plan in PLANS.values())
    asked = []

    def stop(world, *, preset, **kw):
        asked.append(preset)
        raise UserError("stop here")

    monkeypatch.setattr("predet.demo.resolve_world", stop)
    for preset in ("gpu", "tiny"):
        with pytest.raises(UserError, match="stop here"):
            demo(tmp_path / preset, preset=preset)
    assert asked == ["small", "tiny"]


@pytest.mark.parametrize("inside", ["world_in_out", "out_is_det", "same"])
def test_out_must_not_hold_or_replace_the_world(tmp_path, tiny_world, inside):
    """--overwrite empties OUT before the world is read: a world inside it was deleted (OUT in a
    folder of its own inside W, e.g. W/demo, is fine)."""
    out = tmp_path / "d"
    world = {"world_in_out": out / "w", "out_is_det": tmp_path / "w", "same": out}[inside]
    shutil.copytree(tiny_world, world)
    target = {"world_in_out": out, "out_is_det": world / "det" / "run", "same": world}[inside]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(UserError, match="would hold or replace the world .*; give the demo a folder of its own"):
        demo(target, world=world, overwrite=True)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def _stats(**box_aps):
    """``summarize``'s stats of fine-tunes with these box APs per init (``cls_only`` -> cls-only)."""
    from predet.analysis.compare import summarize

    return summarize({k.replace("_", "-"): [{"bbox": {"AP": v}} for v in aps] for k, aps in box_aps.items()})


def test_verdict_beyond_and_within_noise():
    from predet.demo import _verdict

    # the small demo's seeds (README): margin 3.2 - 2.23 = 0.97 over the larger std 0.69
    one = _stats(predet=[2.8, 2.8, 4.0], cls_only=[2.0, 2.1, 2.6], scratch=[1.5, 2.2, 0.9])
    assert _verdict(one, finetune_steps=150) == (
        "PreDet box AP 3.2 ± 0.7: +1.0 over the better of cls-only/scratch, largest std 0.7 -> beyond noise")
    # --pretrain-seeds 2 (docs/experiments.md): margin 3.17 - 2.62 = 0.55 under the larger std 0.64
    two = _stats(predet=[2.8, 2.8, 4.0, 3.1, 3.9, 2.4], cls_only=[2.0, 2.1, 2.6, 3.2, 2.5, 3.3],
                 scratch=[1.5, 2.2, 0.9, 1.5, 2.4, 1.7])  # fmt: skip
    assert _verdict(two) == (
        "PreDet box AP 3.2 ± 0.6: +0.5 over the better of cls-only/scratch, largest std 0.6 -> NOT beyond noise")
    # behind cls-only: a negative margin
    behind = _stats(predet=[2.0, 2.2], cls_only=[3.0, 3.2], scratch=[1.0, 1.2])
    assert "-1.0 over the better" in _verdict(behind) and "NOT beyond noise" in _verdict(behind)


def test_verdict_when_every_init_ends_near_zero():
    """A world the plan's 150 fine-tuning steps are too short for (a 10-class digits-on-photos
    world: every init at 0.2-0.4 APbox): no verdict, and the knob named."""
    from predet.demo import NEAR_ZERO_AP, _verdict

    zero = _stats(predet=[0.2, 0.4, 0.3], cls_only=[0.3, 0.2, 0.4], scratch=[0.2, 0.2, 0.3])
    assert NEAR_ZERO_AP == 1.0
    assert _verdict(zero, finetune_steps=150) == (
        "every init ends near zero box AP (best 0.3 < 1.0): the fine-tuning is too short for this world "
        "to rank the inits; no verdict (give it more steps, e.g. --finetune train.steps=600; this run: 150)")
    # a schedule without train.steps, and one seed per init: still the near-zero verdict
    assert _verdict(_stats(predet=[0.9], cls_only=[0.1], scratch=[0.0])).endswith(
        "no verdict (give it more steps, --finetune train.steps=N)")
    # the threshold is on the best init: one init at 1.0 is a result, judged against the noise
    edge = _stats(predet=[1.0, 1.0], cls_only=[0.2, 0.2], scratch=[0.1, 0.1])
    assert _verdict(edge) == (
        "PreDet box AP 1.0 ± 0.0: +0.8 over the better of cls-only/scratch, largest std 0.0 -> beyond noise")
    assert _verdict(_stats(predet=[0.1], cls_only=[0.2])) == "not every init has a box AP: no verdict"


def test_verdict_needs_two_seeds_for_noise():
    from predet.demo import _verdict

    assert _verdict(_stats(predet=[3.0], cls_only=[2.0], scratch=[1.0])) == (
        "an init has one fine-tune with a box AP: no verdict on noise (use --seeds 2 or more)")


@pytest.mark.parametrize("preset", ["small", "tiny", "gpu"])
def test_finetune_widths_are_the_pretrainings(preset):
    """Every detector (scratch too) gets the pre-trained widths, read from the PreDet
    pre-training's config; cls-only's would give the same (its switches are loss.* only)."""
    from predet.config import FinetuneConfig, PretrainConfig, load_config
    from predet.demo import PLANS, _widths, config_dir
    from predet.modeling.predet import CLS_ONLY_OVERRIDES

    plan, cfgs = PLANS[preset], config_dir()
    pre = {name: load_config(PretrainConfig, cfgs / plan.pretrain_config, [*plan.pretrain_overrides, *switches])
           for name, switches in (("predet", ()), ("cls-only", CLS_ONLY_OVERRIDES))}  # fmt: skip
    assert all(s.startswith("loss.") for s in CLS_ONLY_OVERRIDES)
    assert _widths(pre["predet"]) == _widths(pre["cls-only"])
    want = {"small": ("resnet18", 64, 256), "tiny": ("resnet18", 32, 128), "gpu": ("resnet50", 256, 1024)}[preset]
    assert _widths(pre["predet"]) == [f"model.backbone={want[0]}", f"model.fpn_channels={want[1]}",
                                      f"model.box_head_dim={want[2]}"]  # fmt: skip
    # and they load into the plan's fine-tuning config unchanged
    ft = load_config(FinetuneConfig, cfgs / plan.finetune_config, _widths(pre["predet"]))
    assert (ft.model.backbone, ft.model.fpn_channels, ft.model.box_head_dim) == want


@pytest.mark.parametrize("preset", ["small", "tiny", "gpu"])
def test_cls_only_baseline_resolves_as_the_demo_s_own_switches(preset):
    """The demo takes the cls-only baseline from predet.modeling.predet (CLS_ONLY_OVERRIDES, which
    also says loss.cls=true) instead of its own list: each plan's cls-only config is unchanged."""
    from predet.config import PretrainConfig, load_config, to_dict
    from predet.demo import PLANS, config_dir
    from predet.modeling.predet import CLS_ONLY_OVERRIDES, cls_only_config

    plan = PLANS[preset]
    path = config_dir() / plan.pretrain_config
    before = ["loss.crpn=false", "loss.info=false", "loss.croi_reg=false"]  # demo.CLS_ONLY until now
    old = load_config(PretrainConfig, path, [*plan.pretrain_overrides, *before])
    new = load_config(PretrainConfig, path, [*plan.pretrain_overrides, *CLS_ONLY_OVERRIDES])
    assert to_dict(new) == to_dict(old)
    assert to_dict(cls_only_config(load_config(PretrainConfig, path, list(plan.pretrain_overrides)))) == (
        to_dict(old))
    assert (old.loss.cls, old.loss.crpn, old.loss.info, old.loss.croi_reg) == (True, False, False, False)
