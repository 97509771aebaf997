"""build_pretrain_data for manifest / coco / shards: labels, queries, reproducibility, bad images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from predet.cli import main
from predet.config import PretrainConfig, load_config
from predet.data.datasets import build_pretrain_data
from predet.data.manifest import read_manifest
from predet.data.queries import QueryCache, QueryParams, cache_queries
from predet.data.vocab import build_vocab
from predet.errors import UserError


def _cfg(*overrides: str):
    return load_config(
        PretrainConfig, None, ["model.input_size=64", "data.queries_per_image=8", "data.heldout=0", *overrides]
    )


@pytest.fixture(scope="module")
def tiny_queries(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A query cache of the tiny world's first 40 pre-training images (the rest are absent)."""
    out = tmp_path_factory.mktemp("tiny_q")
    entries = read_manifest(tiny_world / "pretrain/manifest.jsonl").entries[:40]
    cache_queries(entries, out, QueryParams(max_boxes=30), progress=False)
    return out


def test_heldout_slice_is_never_trained_on(tiny_world: Path, tiny_queries: Path) -> None:
    manifest = tiny_world / "pretrain/manifest.jsonl"
    entries = read_manifest(manifest).entries
    q = f"data.queries={tiny_queries}"
    data = build_pretrain_data(_cfg(f"data.manifest={manifest}", q, "data.heldout=30"))
    held = data.heldout
    assert len(held.paths) == 30 == data.counts["heldout"]
    assert not set(held.paths) & {str(p) for p in data.dataset.paths}
    # every image is either held out, trained on, or without a class
    assert len(held.paths) + data.counts["used"] + data.counts["no_class"] == len(entries)
    # tags -> the same classes as training uses; truth.jsonl beside the manifest gives true labels
    assert held.tags.shape == held.truth.shape == (30, len(data.classes))
    truth = {json.loads(l)["image"]: json.loads(l)["labels"] for l in (tiny_world / "pretrain/truth.jsonl").open()}
    by_path = {str(e.path): e.image for e in entries}
    for i, p in enumerate(held.paths):
        assert sorted(data.classes[k] for k in np.nonzero(held.truth[i])[0]) == sorted(truth[by_path[p]])
    # the same slice for another seed
    again = build_pretrain_data(_cfg(f"data.manifest={manifest}", q, "data.heldout=30", "seed=5"))
    assert again.heldout.paths == held.paths


def test_sample_indices_fixed_nested_and_sorted() -> None:
    from predet.data.manifest import sample_indices

    # golden values: the sample is a function of (n, k) alone
    assert sample_indices(10, 3).tolist() == [6, 7, 8]
    assert sample_indices(10, 5).tolist() == [2, 5, 6, 7, 8]
    assert sample_indices(200, 52)[:8].tolist() == [7, 12, 13, 20, 22, 31, 34, 39]
    assert sample_indices(5, None).tolist() == sample_indices(5, 9).tolist() == [0, 1, 2, 3, 4]
    for k in (1, 17, 99):  # sorted, distinct, and each sample holds the smaller ones
        a, b = sample_indices(200, k), sample_indices(200, k + 1)
        assert len(a) == k and len(set(a.tolist())) == k and (np.diff(a) > 0).all()
        assert set(a.tolist()) < set(b.tolist())


def test_max_images_reads_a_fixed_sample_of_the_manifest(tiny_world: Path, tiny_queries: Path) -> None:
    from predet.data.manifest import sample_indices

    manifest = tiny_world / "pretrain/manifest.jsonl"
    entries = read_manifest(manifest).entries
    q = f"data.queries={tiny_queries}"
    data = build_pretrain_data(_cfg(f"data.manifest={manifest}", q, "data.max_images=50", "data.heldout=10"))
    assert data.counts["manifest_images"] == 200 and data.counts["images"] == 50
    sample = {str(entries[i].path) for i in sample_indices(200, 50)}
    seen = set(data.heldout.paths) | {str(p) for p in data.dataset.paths}
    assert seen <= sample and len(data.heldout.paths) + data.counts["used"] + data.counts["no_class"] == 50
    # the same images for another seed; without the key, the whole manifest and no extra count
    again = build_pretrain_data(_cfg(f"data.manifest={manifest}", q, "data.max_images=50", "data.heldout=10", "seed=3"))
    assert again.dataset.paths == data.dataset.paths and again.heldout.paths == data.heldout.paths
    whole = build_pretrain_data(_cfg(f"data.manifest={manifest}", q))
    assert whole.counts["images"] == 200 and "manifest_images" not in whole.counts
    with pytest.raises(UserError, match="data.max_images: must be >= 1"):
        _cfg(f"data.manifest={manifest}", "data.max_images=0")
    with pytest.raises(UserError, match="data.max_images samples a manifest"):
        build_pretrain_data(_cfg("data.format=shards", "data.shards=x", "data.max_images=5"))


def test_manifest_tags_map_like_vocab_and_queries_come_from_cache(tiny_world: Path, tiny_queries: Path) -> None:
    manifest = tiny_world / "pretrain/manifest.jsonl"
    data = build_pretrain_data(_cfg(f"data.manifest={manifest}", f"data.queries={tiny_queries}", "data.min_images=5"))
    entries = read_manifest(manifest).entries
    vocab = build_vocab(entries, json.loads((tiny_world / "pretrain/synonyms.json").read_text()), 5)
    assert data.classes == vocab.classes
    kept = [e for e, lab in zip(entries, vocab.labels) if lab]
    assert data.counts["no_class"] == vocab.num_no_class and data.counts["used"] == len(kept)
    cache = QueryCache(tiny_queries)
    empty = sum(1 for i, lab in enumerate(vocab.labels) if lab and (i >= 40 or len(cache.get(entries[i].image)[0]) == 0))
    assert data.counts["without_queries"] == empty >= len(kept) - 40  # kept with no query: cls loss only
    ds = data.dataset
    # multi-hot labels are the vocab's labels of the same image
    k = 3
    want = torch.zeros(len(vocab.classes))
    want[[vocab.classes.index(c) for c in [lab for lab in vocab.labels if lab][k]]] = 1
    assert torch.equal(ds.labels_of(k), want)
    s = ds[k]
    assert s["view1"].shape == (3, 64, 64) and s["labels"].shape == (len(data.classes),)
    assert s["boxes1"].shape == s["boxes2"].shape == (len(ds.queries_of(k)), 4)
    b = data.collate_fn([ds[i] for i in range(4)])
    assert b["boxes1"].shape == (4, 8, 4) and b["query_mask"].shape == (4, 8)


def test_items_are_reproducible_across_instances_and_epochs_differ(tiny_world: Path, tiny_queries: Path) -> None:
    cfg = _cfg(f"data.manifest={tiny_world / 'pretrain/manifest.jsonl'}", f"data.queries={tiny_queries}")
    a, b = build_pretrain_data(cfg).dataset, build_pretrain_data(cfg).dataset
    for key in ("view1", "view2", "boxes1", "valid", "labels"):
        assert torch.equal(a[5][key], b[5][key])
    assert a[5]["seed"] == b[5]["seed"]
    b.set_epoch(1)
    assert not torch.equal(a[5]["view1"], b[5]["view1"])


def test_no_query_source_is_user_error(tiny_world: Path) -> None:
    with pytest.raises(UserError, match="predet data queries"):
        build_pretrain_data(_cfg(f"data.manifest={tiny_world / 'pretrain/manifest.jsonl'}"))
    with pytest.raises(UserError, match="data.format: unknown value 'zip'"):
        build_pretrain_data(_cfg("data.format=zip", "data.manifest=x"))


def test_tags_without_synonyms_is_user_error(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.jpg", "tags": ["#x"], "queries": []}) + "\n")
    with pytest.raises(UserError, match="no synonyms file"):
        build_pretrain_data(_cfg(f"data.manifest={tmp_path / 'm.jsonl'}"))


def test_unreadable_images_are_skipped_and_counted(odd_images: Path, odd_names, tmp_path: Path, caplog) -> None:
    """Inline queries, so nothing excludes bad files up front: they are met at load time."""
    good, bad = odd_names
    lines = [json.loads(x) for x in (odd_images / "manifest.jsonl").read_text().splitlines()]
    for x in lines:
        x["image"] = str(odd_images / x["image"])
        x["labels"] = ["thing"]
        x["queries"] = [[10, 10, 70, 60]]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    data = build_pretrain_data(_cfg(f"data.manifest={tmp_path / 'm.jsonl'}"))
    ds = data.dataset
    samples = [ds[i] for i in range(len(ds))]
    assert len(samples) == len(good) + len(bad)
    assert ds.num_skipped == len(bad) and data.num_skipped == len(bad)
    assert {Path(ds.paths[i]).name for i in ds.bad} == set(bad)
    named = [r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert len(named) == len(bad) and all(any(n in m for m in named) for n in bad)  # named once each
    # the 4 bad files close the manifest: item i returns the next readable image (wrapping to
    # the first) and says how many it passed over
    assert [Path(x["image"]).name for x in lines][-4:] == list(bad)
    assert [s["skipped"] for s in samples] == [0] * len(good) + [4, 3, 2, 1]
    assert torch.equal(samples[-1]["labels"], samples[0]["labels"])
    assert int(data.collate_fn(samples)["num_skipped"]) == 10


def test_failed_images_from_the_cache_are_excluded(odd_images: Path, odd_names, tmp_path: Path) -> None:
    good, bad = odd_names
    q = tmp_path / "q"
    assert main(["data", "queries", "--manifest", str(odd_images / "manifest.jsonl"), "--out", str(q), "--workers", "1"]) == 0
    data = build_pretrain_data(_cfg(f"data.manifest={odd_images / 'manifest.jsonl'}", f"data.queries={q}"))
    # 11 images: alternate lines {red, blue} / {green}; 'missing.jpg' etc. are named in failed.jsonl
    assert data.counts["excluded_unreadable"] == len(bad)
    assert data.counts["used"] == len(good)
    assert data.num_skipped == len(bad)
    assert all(len(data.dataset.queries_of(i)) >= 1 for i in range(len(data.dataset)))


def test_coco_weak_labels_with_cached_queries(tiny_world: Path, tmp_path: Path) -> None:
    ann = tiny_world / "det/train.json"
    q = tmp_path / "q"
    assert main(["data", "queries", "--manifest", str(ann), "--out", str(q), "--workers", "1", "--max-boxes", "20"]) == 0
    data = build_pretrain_data(_cfg("data.format=coco", f"data.manifest={ann}", f"data.queries={q}"))
    coco = json.loads(ann.read_text())
    assert data.classes == sorted(c["name"] for c in coco["categories"] if any(a["category_id"] == c["id"] for a in coco["annotations"]))
    first = coco["images"][0]
    names = {c["id"]: c["name"] for c in coco["categories"]}
    want = {names[a["category_id"]] for a in coco["annotations"] if a["image_id"] == first["id"]}
    got = {data.classes[k] for k in torch.nonzero(data.dataset.labels_of(0)).squeeze(1).tolist()}
    assert got == want
    # queries are EdgeBoxes, not the annotation boxes
    gt = [a["bbox"] for a in coco["annotations"] if a["image_id"] == first["id"]]
    assert len(data.dataset.queries_of(0)) != len(gt) or not np.allclose(data.dataset.queries_of(0)[:, :2], np.array(gt)[:, :2])
    # one reader: the same JSON as data.manifest without data.format=coco is detected and read alike
    again = build_pretrain_data(_cfg(f"data.manifest={ann}", f"data.queries={q}"))
    assert again.classes == data.classes and torch.equal(again.dataset.labels_of(0), data.dataset.labels_of(0))
    with pytest.raises(UserError, match="is not a COCO JSON"):
        build_pretrain_data(_cfg("data.format=coco", f"data.manifest={tiny_world / 'pretrain/manifest.jsonl'}"))


def test_shards_round_trip_and_split_across_workers(tiny_world: Path, tiny_queries: Path, tmp_path: Path) -> None:
    lines = (tiny_world / "pretrain/manifest.jsonl").read_text().splitlines()[:40]
    m = tmp_path / "m.jsonl"
    m.write_text("\n".join(lines) + "\n")
    (tmp_path / "images").symlink_to(tiny_world / "pretrain/images")
    (tmp_path / "synonyms.json").write_text((tiny_world / "pretrain/synonyms.json").read_text())
    out = tmp_path / "shards"
    assert main(["data", "shards", "--manifest", str(m), "--queries", str(tiny_queries), "--out", str(out), "--shard-size", "10"]) == 0
    assert len(list(out.glob("shard-*.tar"))) == 4
    # every sample holds its image's classes and its cached queries and scores (as rounded)
    import tarfile

    from predet.data.vocab import load_synonyms

    entries = read_manifest(m).entries
    vocab = build_vocab(entries, load_synonyms(tmp_path / "synonyms.json"))
    want = {e.image: sorted(lab) for e, lab in zip(entries, vocab.labels) if lab}
    cache, metas = QueryCache(tiny_queries), []
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            metas += [json.loads(tar.extractfile(t).read()) for t in tar.getmembers() if t.name.endswith(".json")]
    assert sorted(x["image"] for x in metas) == sorted(i for i in want if not cache.is_failed(i))
    for meta in metas:
        boxes, scores = cache.get(meta["image"])
        assert sorted(meta["labels"]) == want[meta["image"]]
        assert meta["queries"] == np.round(boxes, 2).tolist() and meta["scores"] == np.round(scores, 4).tolist()
    data = build_pretrain_data(_cfg("data.format=shards", f"data.shards={out}"))
    ds = data.dataset
    ds.resampled = False  # one pass: every image exactly once
    from torch.utils.data import DataLoader

    seen = [s["seed"] for s in DataLoader(ds, batch_size=None, num_workers=2)]
    manifest_data = build_pretrain_data(_cfg(f"data.manifest={m}", f"data.queries={tiny_queries}"))
    assert len(seen) == len(set(seen)) == manifest_data.counts["used"]  # split, no duplicates
    assert data.classes == manifest_data.classes
    # the endless stream keeps going past one pass
    ds.resampled = True
    it = iter(ds)
    assert len([next(it) for _ in range(60)]) == 60 > len(seen)
