"""cls_map: average precision against hand-computed values and the textbook formula; the held-out
slice is fixed and never trained on; pre-training logs cls_map / cls_map_true."""

from __future__ import annotations

import json

import numpy as np
import pytest

from predet.analysis.cls_map import average_precision, chance_map, mean_average_precision
from predet.data.heldout import build_heldout_set, heldout_indices


def _textbook_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """sum_k P@k * rel_k / #positives over the list ranked by score (distinct scores)."""
    order = np.argsort(-scores)
    hits, total = 0, 0.0
    for k, i in enumerate(order, start=1):
        if labels[i]:
            hits += 1
            total += hits / k
    return total / labels.sum()


def test_ap_hand_built() -> None:
    # ranks: + - + -  -> (1/1 + 2/3) / 2
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == pytest.approx(5 / 6)
    # a perfect ranking and a reversed one
    assert average_precision(np.array([3.0, 2.0, 1.0]), np.array([1, 1, 0])) == pytest.approx(1.0)
    assert average_precision(np.array([1.0, 2.0, 3.0]), np.array([1, 0, 0])) == pytest.approx(1 / 3)
    # tied scores form one threshold: {0.5, 0.5} holds 1 of 2 positives at precision 1/2, then 2/3
    assert average_precision(np.array([0.5, 0.5, 0.1]), np.array([0, 1, 1])) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert np.isnan(average_precision(np.array([0.1, 0.2]), np.array([0, 0])))


def test_ap_equals_textbook_formula_and_is_order_free_under_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(5, 60))
        scores, labels = rng.normal(size=n), rng.random(n) < 0.3
        labels[0] = True
        assert average_precision(scores, labels) == pytest.approx(_textbook_ap(scores, labels), abs=1e-12)
    # ties: the value does not depend on the order of the tied images
    scores = np.array([0.3, 0.3, 0.3, 0.9, 0.1, 0.3])
    labels = np.array([1, 0, 0, 1, 1, 0])
    perm = rng.permutation(len(scores))
    assert average_precision(scores, labels) == pytest.approx(average_precision(scores[perm], labels[perm]))


def test_map_skips_classes_without_positives_and_chance() -> None:
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.5], [0.1, 0.3, 0.5]])
    labels = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 0]])
    # class 0: AP 1; class 1: ranks 0.8(+) 0.3(+) 0.1(-) -> 1; class 2 has no positive
    assert mean_average_precision(scores, labels) == pytest.approx(1.0)
    # exact E[AP] of a random ranking, N = 3: 1 positive -> (1 + 1/2 + 1/3) / 3; 2 positives -> the
    # mean over the 3 places of the negative, APs 1, 5/6 and 7/12: 0.8056
    perms = [(1, 1, 0), (1, 0, 1), (0, 1, 1)]
    two = np.mean([average_precision(np.array([3.0, 2.0, 1.0]), np.array(p)) for p in perms])
    assert chance_map(labels) == pytest.approx(((1 + 1 / 2 + 1 / 3) / 3 + two) / 2)
    assert chance_map(np.eye(10)[:, :1]) == pytest.approx(sum(1 / k for k in range(1, 11)) / 10)  # 0.293
    # random scores average to chance, sparse classes included (where it is well above n / N)
    rng = np.random.default_rng(1)
    y = rng.random((256, 6)) < np.array([0.01, 0.03, 0.1, 0.2, 0.3, 0.5])
    draws = [mean_average_precision(rng.random(y.shape), y) for _ in range(400)]
    assert np.mean(draws) == pytest.approx(chance_map(y), abs=3 * np.std(draws) / 20)
    assert chance_map(y) > y.mean(axis=0).mean() + 0.01
    # a score that is not finite makes the mAP NaN, whatever the other scores
    bad = scores.copy()
    bad[1, 0] = np.nan
    assert np.isnan(mean_average_precision(bad, labels)) and np.isnan(average_precision(bad[:, 0], labels[:, 0]))
    assert np.isnan(mean_average_precision(np.full((3, 3), np.nan), labels))
    with pytest.raises(ValueError):
        mean_average_precision(scores, labels[:2])


def test_heldout_indices_fixed_and_bounded() -> None:
    a, b = heldout_indices(2000, 256), heldout_indices(2000, 256)
    assert np.array_equal(a, b) and len(a) == 256 and len(np.unique(a)) == 256
    assert np.all(np.diff(a) > 0) and a.min() >= 0 and a.max() < 2000
    assert len(heldout_indices(100, 256)) == 20  # at most a fifth of the manifest
    assert len(heldout_indices(100, 0)) == 0


def test_heldout_set_reads_truth(tmp_path) -> None:
    (tmp_path / "truth.jsonl").write_text(
        json.dumps({"image": "a.jpg", "labels": ["cat", "dog"]}) + "\n"
        + json.dumps({"image": "b.jpg", "labels": ["emu"]}) + "\n"
    )
    hs = build_heldout_set(tmp_path / "manifest.jsonl", ["b.jpg", "a.jpg"], ["B", "A"], [["dog"], ["cat"]],
                           ["cat", "dog", "emu"])
    assert hs.tags.tolist() == [[0, 1, 0], [1, 0, 0]]
    assert hs.truth.tolist() == [[0, 0, 1], [1, 1, 0]]
    # truth.jsonl that does not cover every held-out image: no true labels
    hs = build_heldout_set(tmp_path / "manifest.jsonl", ["c.jpg"], ["C"], [["dog"]], ["cat", "dog", "emu"])
    assert hs.truth is None


def test_evaluator_scores_equal_a_direct_computation(tmp_path) -> None:
    """ClsEvaluator against the head written out: whole image resized to S (bilinear), ImageNet
    normalisation, the model in eval mode (BatchNorm's running statistics), softmax averaged over
    the FPN levels; an unreadable image skipped and counted; the train mode restored."""
    import torch
    from PIL import Image

    from predet.analysis.cls_map import ClsEvaluator
    from predet.config import PretrainConfig, load_config
    from predet.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from predet.modeling.predet import build_predet

    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(80, 60), (64, 64), (100, 128)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    paths.insert(1, str(tmp_path / "bad.png"))
    tags = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 1], [1, 0, 1]])
    truth = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])
    cfg = load_config(PretrainConfig, None, ["model.backbone=resnet18", "model.fpn_channels=16", "model.input_size=32",
                                             "loss.crpn=false", "loss.info=false", "loss.croi_reg=false"])  # fmt: skip
    torch.manual_seed(0)
    model = build_predet(cfg, 3)
    model.train()
    with torch.no_grad():  # move BatchNorm's running statistics away from (0, 1)
        model.backbone(torch.randn(4, 3, 32, 32) * 3 + 1)
    ev = ClsEvaluator(paths, tags, truth, input_size=32)
    out = ev(model)
    assert ev.skipped == 1 and len(ev) == 3 and model.training

    x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((32, 32), resample=2)).copy())
                     for p in paths if "bad" not in p]).permute(0, 3, 1, 2).float() / 255  # fmt: skip
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    model.eval()
    with torch.no_grad():
        ref = model.cls_head(model.backbone(x)).softmax(dim=-1).mean(dim=0).numpy()  # [3, K]
    np.testing.assert_allclose(ev.scores(model), ref, atol=1e-5)
    kept = [0, 2, 3]
    assert out["cls_map"] == pytest.approx(mean_average_precision(ref, tags[kept]), abs=1e-6)
    assert out["cls_map_true"] == pytest.approx(mean_average_precision(ref, truth[kept]), abs=1e-6)
    model.train()
    with torch.no_grad():  # the same images in train mode score differently: eval mode mattered
        train_scores = model.cls_head(model.backbone(x)).softmax(dim=-1).mean(dim=0).numpy()
    assert np.abs(train_scores - ref).max() > 1e-3
