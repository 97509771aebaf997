"""`predet analyze correlation` (paper §4.4, Fig. 5b): statistics, box jitter, pooling, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, box_iou, roi_align

from predet.analysis.correlation import (
    POOLS,
    _describe_file,
    average_ranks,
    bucket_stats,
    correlation,
    jitter_boxes,
    pearson,
    pooled_similarity,
    size_bucket,
    spearman,
)
from predet.cli import main
from predet.errors import UserError
from predet.export import export_backbone
from predet.modeling.backbone import build_backbone
from predet.utils import save_checkpoint


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------
def _naive_pearson(x, y):
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy)


def _naive_ranks(x):
    """1 + (values below) + (ties - 1) / 2: the average of the positions a tie group occupies."""
    return [1 + sum(b < a for b in x) + (sum(b == a for b in x) - 1) / 2 for a in x]


def test_pearson_and_spearman_on_hand_made_cases():
    # x = 1..4, y = 1,3,2,4: deviations (-1.5,-.5,.5,1.5) and (-1.5,.5,-.5,1.5): r = 4 / 5
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8, abs=1e-12)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8, abs=1e-12)
    assert pearson([1, 2, 3, 4, 5], [2, 4, 6, 8, 10]) == pytest.approx(1.0)
    assert pearson([1, 2, 3, 4, 5], [5, 4, 3, 2, 1]) == pytest.approx(-1.0)
    # Spearman is rank-based: any monotone map gives 1, Pearson does not
    x = [0.1, 0.2, 0.3, 0.4, 0.9]
    assert spearman(x, np.exp(np.array(x) * 10)) == pytest.approx(1.0)
    e = np.exp(np.array(x) * 10)
    assert pearson(x, e) == pytest.approx(np.corrcoef(x, e)[0, 1], abs=1e-12)
    assert pearson(x, e) == pytest.approx(0.9352, abs=1e-4)
    # ties take average ranks: x ranks (1, 2.5, 2.5, 4), y ranks (1, 2, 3, 4): 4.5 / sqrt(4.5 * 5)
    assert average_ranks([1, 2, 2, 3]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5), abs=1e-12)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138, abs=1e-12)
    # undefined: too few pairs, or a constant sample
    assert pearson([1, 2], [3, 4]) is None and spearman([1, 2], [3, 4]) is None
    assert pearson([1, 1, 1, 1], [1, 2, 3, 4]) is None and spearman([1, 2, 3], [5, 5, 5]) is None
    assert bucket_stats([], []) == {"pearson": None, "spearman": None, "pairs": 0}
    # a NaN similarity leaves both undefined (Spearman ranked it as the largest value: 0.6)
    assert bucket_stats([0.1, 0.2, 0.3, 0.4], [1, np.nan, 2, 3]) == {"pearson": None, "spearman": None, "pairs": 4}
    assert bucket_stats([1, 2, 3, 4], [1, 3, 2, 4]) == {"pearson": 0.8, "spearman": 0.8, "pairs": 4}


def test_statistics_match_a_direct_computation_with_many_ties():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 6, 60).astype(float)  # heavy ties, as IoU 0 gives
    y = 0.5 * x + rng.normal(0, 1.0, 60).round(1)
    assert average_ranks(x).tolist() == _naive_ranks(list(x))
    assert pearson(x, y) == pytest.approx(_naive_pearson(list(x), list(y)), abs=1e-12)
    assert spearman(x, y) == pytest.approx(
        _naive_pearson(_naive_ranks(list(x)), _naive_ranks(list(y))), abs=1e-12
    )
    stats = pytest.importorskip("scipy.stats")
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)


# --------------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------------
def test_jittered_boxes_fill_every_iou_bin_evenly_and_deterministically():
    gt = np.array([30.0, 40.0, 70.0, 65.0])
    boxes, iou = jitter_boxes(gt, 100, 100, 50, np.random.default_rng([0, 7]))
    assert boxes.shape == (50, 4) and iou.shape == (50,)
    counts = np.bincount(np.minimum((iou * 10).astype(int), 9), minlength=10)
    assert counts.tolist() == [5] * 10  # 5 boxes in each of [0, .1), [.1, .2), ..., [.9, 1)
    assert iou.min() < 0.1 and 0.9 <= iou.max() < 1.0
    ref = box_iou(torch.from_numpy(boxes), torch.from_numpy(gt)[None]).squeeze(1).numpy()
    np.testing.assert_allclose(iou, ref, atol=1e-9)
    assert (
        (boxes[:, 0::2] >= 0).all()
        and (boxes[:, 0::2] <= 100).all()
        and (boxes[:, 1::2] <= 100).all()
    )
    assert ((boxes[:, 2:] - boxes[:, :2]) >= 2).all()
    again, _ = jitter_boxes(gt, 100, 100, 50, np.random.default_rng([0, 7]))
    np.testing.assert_array_equal(boxes, again)
    other, _ = jitter_boxes(gt, 100, 100, 50, np.random.default_rng([1, 7]))
    assert not np.array_equal(boxes, other)
    # 23 boxes over 10 bins: the first 3 bins get 3, the others 2
    _, iou = jitter_boxes(gt, 100, 100, 23, np.random.default_rng(0))
    assert (
        np.bincount(np.minimum((iou * 10).astype(int), 9), minlength=10).tolist()
        == [3, 3, 3] + [2] * 7
    )


def test_a_box_filling_the_image_cannot_reach_low_iou_and_keeps_fewer():
    boxes, iou = jitter_boxes(
        np.array([0.0, 0.0, 64.0, 64.0]), 64, 64, 50, np.random.default_rng(0)
    )
    # inside the image, IoU with the whole image is the box's area fraction: bins above ~0 fill
    counts = np.bincount(np.minimum((iou * 10).astype(int), 9), minlength=10)
    assert counts[1:].tolist() == [5] * 9 and counts[0] <= 5 and len(boxes) == counts.sum()


def test_size_buckets_scale_cocos_thresholds_with_the_image():
    # 640 px: COCO's 32² / 96²
    assert [size_bucket(a, 640) for a in (32**2 - 1, 32**2, 96**2 - 1, 96**2)] == [
        "small",
        "medium",
        "medium",
        "large",
    ]
    # 96 px: (96/640)² = 0.0225 -> 23.04 and 207.36 px²
    assert [size_bucket(a, 96) for a in (23.0, 23.1, 207.3, 207.4)] == [
        "small",
        "medium",
        "medium",
        "large",
    ]


# --------------------------------------------------------------------------------------------
# Pooling: features that encode position correlate with IoU, shuffled or constant ones do not
# --------------------------------------------------------------------------------------------
def _pairs_correlation(feature_map: torch.Tensor, seed: int = 0, pool: str = "flat") -> float | None:
    """Pearson r over boxes jittered around 6 ground-truth boxes on one ``[1, C, 64, 64]`` map."""
    rng = np.random.default_rng(seed)
    gts = torch.tensor(
        [
            [8, 8, 30, 30],
            [20, 10, 50, 40],
            [34, 30, 60, 58],
            [5, 35, 25, 60],
            [12, 20, 44, 52],
            [40, 4, 60, 24],
        ],
        dtype=torch.float32,
    )
    jit, own, ious = [], [], []
    for g, box in enumerate(gts.double().numpy()):
        b, iou = jitter_boxes(box, 64, 64, 40, rng)
        jit.append(torch.from_numpy(b).float())
        own.append(torch.full((len(b),), g))
        ious.append(iou)
    pooler = MultiScaleRoIAlign(["0"], 7, 2)
    (sim,) = pooled_similarity(
        {"0": feature_map}, pooler, [gts], [torch.cat(jit)], [torch.cat(own)], [(64, 64)], pool=pool
    )
    return pearson(np.concatenate(ious), sim.double().numpy())


def test_positional_features_correlate_more_than_shuffled_or_constant():
    g = torch.Generator().manual_seed(0)
    centres = torch.rand(48, 2, generator=g) * 64
    ys, xs = torch.meshgrid(torch.arange(64.0) + 0.5, torch.arange(64.0) + 0.5, indexing="ij")
    d2 = (xs[None] - centres[:, 0, None, None]) ** 2 + (ys[None] - centres[:, 1, None, None]) ** 2
    positional = torch.exp(-d2 / (2 * 6.0**2))[None]  # [1, 48, 64, 64]: smooth functions of (y, x)
    perm = torch.randperm(64 * 64, generator=g)
    shuffled = positional.flatten(2)[:, :, perm].reshape(
        1, 48, 64, 64
    )  # same values, positions scrambled
    constant = torch.ones(1, 48, 64, 64)
    # the same values without spatial order still correlate (a box near the ground truth samples
    # nearly the same points), but much less than features that vary smoothly with position;
    # for the 7x7 bins flattened and averaged alike
    r_pos, r_shuf = _pairs_correlation(positional), _pairs_correlation(shuffled)
    assert r_pos == pytest.approx(0.9393, abs=2e-3) and r_shuf == pytest.approx(0.7271, abs=2e-3)
    assert r_pos > r_shuf + 0.15
    m_pos, m_shuf = (_pairs_correlation(f, pool="mean") for f in (positional, shuffled))
    assert m_pos == pytest.approx(0.8674, abs=2e-3) and m_shuf == pytest.approx(0.6492, abs=2e-3)
    assert m_pos > m_shuf + 0.15
    for pool in POOLS:  # every cosine is 1: no correlation to measure
        assert _pairs_correlation(constant, pool=pool) is None


def test_mean_pooling_is_the_cosine_of_the_binwise_means():
    g = torch.Generator().manual_seed(3)
    fmap = torch.randn(1, 8, 32, 32, generator=g)
    gts = torch.tensor([[2.0, 3.0, 20.0, 25.0]])
    jit = torch.tensor([[4.0, 3.0, 22.0, 24.0], [10.0, 10.0, 30.0, 30.0], [0.0, 0.0, 8.0, 8.0]])
    pooler = MultiScaleRoIAlign(["0"], 7, 2)
    sims = {
        pool: pooled_similarity(
            {"0": fmap}, pooler, [gts], [jit], [torch.zeros(3, dtype=torch.long)], [(32, 32)], pool=pool
        )[0]
        for pool in POOLS
    }
    pooled = roi_align(fmap, [torch.cat([gts, jit])], 7, spatial_scale=1.0, sampling_ratio=2, aligned=False)
    for pool, vec in (("mean", pooled.mean(dim=(2, 3))), ("flat", pooled.flatten(1))):
        direct = [float(vec[1 + i] @ vec[0] / (vec[1 + i].norm() * vec[0].norm())) for i in range(3)]
        assert sims[pool].tolist() == pytest.approx(direct, abs=1e-5)
    with pytest.raises(UserError, match="pool='max'"):
        pooled_similarity({"0": fmap}, pooler, [gts], [jit], [torch.zeros(3, dtype=torch.long)], [(32, 32)], pool="max")


# --------------------------------------------------------------------------------------------
# Inits, the whole analysis, the CLI
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inits(tmp_path_factory) -> dict[str, Path]:
    """A torchvision-format file (no sidecar) and a pre-training run folder: the same weights."""
    root = tmp_path_factory.mktemp("inits")
    torch.manual_seed(5)
    state = build_backbone("resnet18", fpn_channels=32).state_dict()
    torch.save(state, root / "r18.pth")
    run = root / "pretrain-x"
    save_checkpoint(
        {"model": {f"backbone.{k}": v for k, v in state.items()}, "step": 1},
        run / "checkpoints" / "last.pt",
    )
    return {"file": root / "r18.pth", "run": run}


def test_architecture_and_width_come_from_the_tensors_or_the_sidecar(inits, tmp_path, tiny_world):
    spec = {"architecture": "resnet18", "fpn_channels": 32, "norm": "frozenbn"}
    assert _describe_file(inits["file"]) == spec
    weights, side = export_backbone(torch.load(inits["file"]), "torchvision", tmp_path / "e.pth")
    assert side.name == "e.json" and _describe_file(weights) == spec
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "architecture": "resnet34"}))
    assert _describe_file(weights)["architecture"] == "resnet34"  # the sidecar is what is read ...
    det = tiny_world / "det"
    with pytest.raises(UserError, match=r"e.pth: its ResNet body is not the model's .*: 80 body tensors of the model are not in the file"):
        correlation({"e": weights}, det / "val.json", det / "images", max_images=1)  # not silently
    side.write_text(json.dumps({**meta, "architecture": "resnet50"}))
    with pytest.raises(UserError, match="shape"):  # bottleneck blocks: the tensors' shapes differ
        correlation({"e": weights}, det / "val.json", det / "images", max_images=1)


def test_correlation_is_deterministic_and_a_run_folder_equals_its_export(tiny_world, inits):
    det = tiny_world / "det"
    kwargs = dict(seed=3, boxes_per_gt=20, max_images=4, threads=1)
    a = correlation(
        {"scratch": "scratch", "file": inits["file"], "run": inits["run"]},
        det / "val.json",
        det / "images",
        **kwargs,
    )
    b = correlation(
        {"scratch": "scratch", "file": inits["file"], "run": inits["run"]},
        det / "val.json",
        det / "images",
        **kwargs,
    )
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert (
        a["run"] == a["file"]
    )  # RUN/checkpoints/last.pt goes through `predet export` to the same weights
    assert set(a) == {"scratch", "file", "run"} and all(
        set(v) == {"small", "medium", "large"} for v in a.values()
    )
    gt = json.loads((det / "val.json").read_text())
    first = sorted({x["image_id"] for x in gt["annotations"]})[:4]
    n_boxes = sum(1 for x in gt["annotations"] if x["image_id"] in first and not x.get("iscrowd"))
    pairs = sum(s["pairs"] for s in a["scratch"].values())
    assert (
        n_boxes * 10 <= pairs <= n_boxes * 20
    )  # up to 20 per box; only bins out of reach stay short
    for stats in a["scratch"].values():
        if stats["pairs"] >= 20:
            assert 0.0 < stats["pearson"] <= 1.0 and 0.0 < stats["spearman"] <= 1.0
    c = correlation(
        {"scratch": "scratch"}, det / "val.json", det / "images", **{**kwargs, "seed": 4}
    )
    assert c["scratch"] != a["scratch"]  # another seed: other boxes and another random init
    # resizing as fine-tuning's test size does gives other features, the same pairs
    d = correlation({"file": inits["file"]}, det / "val.json", det / "images", **kwargs, size=160)
    assert [s["pairs"] for s in d["file"].values()] == [s["pairs"] for s in a["file"].values()]
    assert d["file"] != a["file"]


def test_cli_on_the_tiny_world_writes_json_and_png(tiny_world, inits, tmp_path, capsys):
    det = tiny_world / "det"
    out = tmp_path / "corr"
    rc = main(
        [
            "analyze",
            "correlation",
            "--init",
            "scratch",
            "--init",
            str(inits["file"]),
            "--data",
            str(det / "val.json"),
            "--images",
            str(det / "images"),
            "--out",
            str(out),
            "--max-images",
            "6",
            "--boxes-per-gt",
            "20",
            "--seed",
            "1",
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    result = json.loads((out / "correlation.json").read_text())
    assert list(result) == ["scratch", "r18"]
    for buckets in result.values():
        assert list(buckets) == ["small", "medium", "large"]
        assert sum(s["pairs"] for s in buckets.values()) > 100
        for s in buckets.values():
            assert set(s) == {"pearson", "spearman", "pairs"}
            assert (s["pearson"] is None) == (s["pairs"] < 3)
    # the CLI's flags reach the analysis: the same numbers as the call with those arguments
    api = correlation({"scratch": "scratch", "r18": inits["file"]}, det / "val.json", det / "images",
                      seed=1, boxes_per_gt=20, max_images=6, threads=1)  # fmt: skip
    assert result == json.loads(json.dumps(api))
    png = (out / "correlation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    printed = capsys.readouterr().out
    assert "spearman" in printed and f"{result['scratch']['large']['pearson']:.3f}" in printed


def test_bad_input_is_one_line_naming_it(tiny_world, inits, tmp_path, capsys):
    det = tiny_world / "det"
    base = ["analyze", "correlation", "--images", str(det / "images"), "--out", str(tmp_path / "o")]
    no_boxes = tmp_path / "empty.json"
    gt = json.loads((det / "val.json").read_text())
    no_boxes.write_text(
        json.dumps({**gt, "annotations": [{**a, "iscrowd": 1} for a in gt["annotations"]]})
    )
    cases = [
        (["--init", "scratch", "--data", str(tmp_path / "missing.json")], "missing.json"),
        (["--init", "nope.pth", "--data", str(det / "val.json")], "nope.pth"),
        (["--init", str(tmp_path), "--data", str(det / "val.json")], "checkpoints/last.pt"),
        (["--init", "scratch", "--data", str(no_boxes)], "no usable boxes"),
        (
            ["--init", "scratch", "--init", "scratch", "--data", str(det / "val.json")],
            "also named 'scratch'",
        ),
    ]
    for extra, needle in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(UserError, match="no such file"):
        correlation({"x": tmp_path / "absent.pth"}, det / "val.json", det / "images")


def test_images_of_other_sizes_give_the_same_numbers_whatever_the_batch_size(inits, tmp_path):
    """Each image is pooled at its own size, not padded to a larger batch mate's (BN's shift made
    the padding nonzero: 0.804 against 0.758 Pearson for batch 1 vs 8 on such a set)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images, anns = [], []
    for i, (w, h) in enumerate([(101, 77), (77, 131), (97, 97), (150, 61), (88, 120), (64, 64)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": w, "height": h})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [w * 0.2, h * 0.2, w * 0.5, h * 0.5],
                     "area": w * h * 0.25, "iscrowd": 0})  # fmt: skip
    ann = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}
    kwargs = dict(seed=0, boxes_per_gt=20, threads=1)
    one = correlation({"file": inits["file"]}, ann, tmp_path, batch_size=1, **kwargs)
    eight = correlation({"file": inits["file"]}, ann, tmp_path, batch_size=8, **kwargs)
    assert sum(s["pairs"] for s in one["file"].values()) > 0
    for b in ("small", "medium", "large"):
        for k in ("pearson", "spearman"):
            x, y = one["file"][b][k], eight["file"][b][k]
            assert (x is None and y is None) or abs(x - y) < 1e-5, (b, k, x, y)


def test_bad_device_is_one_line(tmp_path, capsys):
    from predet.cli import main

    args = ["analyze", "correlation", "--init", "scratch", "--data", str(tmp_path / "a.json"),
            "--images", str(tmp_path), "--out", str(tmp_path / "o")]  # fmt: skip
    assert main([*args, "--device", "gpu"]) == 2  # was torch's traceback
    assert capsys.readouterr().err.strip() == "predet: error: --device='gpu': expected auto, cpu or cuda"
    assert not (tmp_path / "o").exists()
