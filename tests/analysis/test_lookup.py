"""`predet analyze lookup`'s bookkeeping on hand-made outputs: records, summary, image names."""

from __future__ import annotations

import pytest
import torch

from predet.analysis.lookup import _records, _samples, format_summary, summarize


def test_records_and_summary_of_a_hand_made_lookup():
    """One image (views 0 and 1), two query slots (the second invalid), three proposal slots (the
    third invalid) per searched view: every number follows from the boxes by hand."""
    boxes = torch.tensor([[[0.0, 0, 10, 10], [0, 0, 1, 1]],     # view 0's own query boxes
                          [[20.0, 20, 30, 30], [0, 0, 1, 1]]])  # view 1's  # fmt: skip
    proposals = torch.tensor([[[0.0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 10]],
                              [[21.0, 20, 31, 30], [20, 20, 25, 25], [0, 0, 1, 1]]])  # fmt: skip
    valid = torch.tensor([[True, True, False], [True, True, False]])
    sim = torch.tensor([[[0.1, 0.9, 5.0], [0, 0, 0]],   # view 0: picks the far box (a miss)
                        [[0.8, 0.7, 5.0], [0, 0, 0]]])  # view 1: picks the shifted box (a hit)  # fmt: skip
    out = {"boxes": boxes, "mask": torch.tensor([[True, False], [True, False]]), "proposals": proposals,
           "valid": valid, "sim": sim}  # fmt: skip
    recs = _records(out, ["a.jpg"], first=5, top=3)
    assert [(r["sample"], r["image"], r["direction"], r["query_index"]) for r in recs] == [
        (5, "a.jpg", "2->1", 0), (5, "a.jpg", "1->2", 0)]  # fmt: skip
    miss, hit = recs
    assert miss["query"] == [20.0, 20, 30, 30] and miss["target"] == [0.0, 0, 10, 10]  # pooled from view 1
    assert miss["retrieved"] == [[50.0, 50, 60, 60], [0, 0, 10, 10]]  # invalid slot (sim 5) left out
    assert miss["iou"] == [0.0, 1.0] and miss["sim"] == pytest.approx([0.9, 0.1])
    assert (miss["hit"], miss["chance"], miss["covered"]) == (False, 0.5, True)
    assert hit["iou"][0] == pytest.approx(90 / 110) and hit["iou"][1] == pytest.approx(25 / 100)
    assert (hit["hit"], hit["chance"], hit["covered"]) == (True, 0.5, True)
    assert summarize(recs) == {"queries": 2, "lookup_top1_proposals": 0.5, "chance_top1": 0.5, "crpn_recall": 1.0}
    assert summarize([]) == {"queries": 0, "lookup_top1_proposals": None, "chance_top1": None, "crpn_recall": None}
    # named apart from training's lookup_top1, which also counts the appended query boxes
    line = format_summary({"images": 1, **summarize(recs)})
    assert "proposals only): lookup_top1_proposals 0.500 (chance 0.500), crpn_recall 1.000" in line
    # a searched view without any valid proposal: a miss that nothing could have found
    none = _records({**out, "valid": torch.zeros(2, 3, dtype=torch.bool)}, ["a.jpg"], first=0, top=3)
    assert all((r["retrieved"], r["hit"], r["chance"], r["covered"]) == ([], False, 0.0, False) for r in none)


class _Skipping(torch.utils.data.Dataset):
    """Item 3 is unreadable: like WeakLabelDataset, the next image takes its place."""

    paths = [f"{k}.jpg" for k in range(6)]

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return {"skipped": 1 if i == 3 else 0}


def test_samples_are_named_after_the_image_they_were_made_from():
    samples, names = _samples(_Skipping(), 6, seed=0)
    assert names == ["0.jpg", "1.jpg", "2.jpg", "4.jpg", "4.jpg", "5.jpg"]  # 3 was replaced by 4
    assert len(samples) == 6
    _, some = _samples(_Skipping(), 3, seed=1)
    assert len(set(some)) == 3 and some == sorted(some)  # a seeded draw without repeats, in order
