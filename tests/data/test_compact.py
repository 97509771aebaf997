"""The pre-training set in flat arrays (issue 25): the same images, labels, queries and samples
as a plain per-entry reference, memory bounded by array sizes, the query cache memory-mapped."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from predet.config import PretrainConfig, load_config
from predet.data.compact import Ragged, StringArray
from predet.data.datasets import WeakLabelDataset, build_pretrain_data
from predet.data.heldout import heldout_indices
from predet.data.manifest import count_entries, read_manifest, sample_indices
from predet.data.queries import BoxFiles, QueryCache, QueryParams, cache_queries
from predet.data.vocab import build_vocab, load_synonyms


@pytest.fixture(scope="module")
def world(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny world's 200 lines (a few with inline queries, one naming a file by its absolute
    path) with a query cache of the first 60 images."""
    root = tmp_path_factory.mktemp("compact")
    (root / "images").symlink_to(tiny_world / "pretrain/images")
    (root / "synonyms.json").write_text((tiny_world / "pretrain/synonyms.json").read_text())
    (root / "truth.jsonl").write_text((tiny_world / "pretrain/truth.jsonl").read_text())
    lines = (tiny_world / "pretrain/manifest.jsonl").read_text().splitlines()
    objs = [json.loads(x) for x in lines]
    for k in (70, 71, 150):  # inline boxes win over the cache
        objs[k]["queries"] = [[1, 2, 30, 40], [5, 5, 20, 25.5]][: k % 2 + 1]
    objs[5]["image"] = str(root / objs[5]["image"])  # through the link: found in the cache by resolved path
    (root / "m.jsonl").write_text("".join(json.dumps(o) + "\n" for o in objs))
    (root / "orig.jsonl").write_text("\n".join(lines) + "\n")  # the cache names the images as the world does
    entries = read_manifest(root / "orig.jsonl").entries[:60]
    cache_queries(entries, root / "q", QueryParams(max_boxes=20), progress=False, shard_size=25)
    return root


def _cfg(world: Path, *overrides: str):
    return load_config(PretrainConfig, None, ["model.input_size=48", f"data.manifest={world / 'm.jsonl'}",
                                              f"data.queries={world / 'q'}", *overrides])  # fmt: skip


def _reference(world: Path, cfg) -> tuple[list[str], list[list[int]], list[np.ndarray], dict, list[str]]:
    """The pre-training set built entry by entry, as predet did before the flat arrays."""
    entries = read_manifest(world / "m.jsonl").entries
    n = len(entries)
    entries = [entries[i] for i in sample_indices(n, cfg.data.max_images)]
    vocab = build_vocab(entries, load_synonyms(world / "synonyms.json"), cfg.data.min_images)
    index = {c: k for k, c in enumerate(vocab.classes)}
    cache, held = QueryCache(world / "q"), set(heldout_indices(len(entries), cfg.data.heldout).tolist())
    counts = {"images": len(entries), "no_class": 0, "excluded_unreadable": 0, "without_queries": 0}
    paths, labels, queries, held_paths = [], [], [], []
    for i, (e, classes) in enumerate(zip(entries, vocab.labels)):
        if i in held:
            held_paths.append(str(e.path))
        elif not classes:
            counts["no_class"] += 1
        else:
            hit = cache.get(e.image, e.path)
            q = e.queries if e.queries is not None else (hit[0] if hit else np.zeros((0, 4), np.float32))
            counts["without_queries"] += len(q) == 0
            paths.append(str(e.path))
            labels.append([index[c] for c in classes])
            queries.append(q)
    counts.update(used=len(paths), heldout=len(held_paths))
    if len(entries) < n:
        counts = {"manifest_images": n, **counts}
    return paths, labels, queries, counts, held_paths


@pytest.mark.parametrize("overrides", [
    ["data.heldout=0"],
    ["data.heldout=30"],
    ["data.max_images=120", "data.heldout=10", "data.min_images=25"],
])  # fmt: skip
def test_flat_set_equals_the_per_entry_reference(world: Path, overrides: list[str]) -> None:
    cfg = _cfg(world, *overrides)
    data = build_pretrain_data(cfg)
    paths, labels, queries, counts, held = _reference(world, cfg)
    ds = data.dataset
    assert data.counts == counts and list(data.counts) == list(counts)  # the same figures, in the same order
    assert list(ds.paths) == paths and (data.heldout.paths if data.heldout else []) == held
    assert counts["without_queries"] > 0 and any(len(q) == 2 for q in queries)  # cache misses and inline boxes
    for i in range(len(ds)):
        want = torch.zeros(len(data.classes))
        want[labels[i]] = 1.0
        assert torch.equal(ds.labels_of(i), want), i
        got = ds.queries_of(i)
        assert got.dtype == np.float32 and np.array_equal(got, np.asarray(queries[i], np.float32).reshape(-1, 4)), i
    # the samples: a list-built dataset with the same items gives the same views and boxes
    ref = WeakLabelDataset.from_lists(paths=paths, labels=labels, queries=queries, num_classes=len(data.classes),
                                      transform=ds.transform, seed=cfg.seed)  # fmt: skip
    for i in (0, 7, len(ds) - 1):
        a, b = ds[i], ref[i]
        for k in ("view1", "view2", "boxes1", "boxes2", "valid", "labels"):
            assert torch.equal(a[k], b[k]), (i, k)


def test_memory_is_the_arrays_and_the_cache_is_mapped(world: Path, tmp_path: Path) -> None:
    lines = (world / "m.jsonl").read_text().splitlines()
    big = tmp_path / "m.jsonl"
    big.write_text("".join(lines[i % len(lines)] + "\n" for i in range(5000)))
    for name in ("images", "synonyms.json"):
        (tmp_path / name).symlink_to(world / name)
    cfg = load_config(PretrainConfig, None, ["model.input_size=48", f"data.manifest={big}",
                                             f"data.queries={world / 'q'}", "data.heldout=0"])  # fmt: skip
    ds = build_pretrain_data(cfg).dataset
    n = len(ds)
    path_bytes = sum(len(p.encode()) for p in ds.paths)
    labels = sum(len(ds.labels[i]) for i in range(n))
    # per image: its path's bytes + offset (8), its labels (4 each) + offset (8), one query row (24)
    inline = sum(len(json.loads(x).get("queries", [])) for x in big.read_text().splitlines())
    bound = path_bytes + 8 * (n + 1) + 4 * labels + 8 * (n + 1) + 24 * n + 16 * inline  # + the lines' own boxes
    assert ds.nbytes <= bound
    assert (ds.nbytes - path_bytes - 16 * inline) / n <= 41 + 4 * labels / n
    # nothing per image beyond the arrays: the pickled dataset (what a spawned worker receives)
    assert len(pickle.dumps(ds)) < ds.nbytes + 64_000
    files = ds.queries.files
    assert isinstance(files, BoxFiles) and all(isinstance(b, np.memmap) for b, _ in files.arrays)
    again = pickle.loads(pickle.dumps(files))  # maps its files again
    assert again._arrays is None and np.array_equal(again.get(0, 3, 9)[0], files.get(0, 3, 9)[0])


def test_string_array_and_ragged() -> None:
    strings = ["a", "", "bé/ü.jpg", "\ud800x"]  # a lone surrogate, as JSON allows
    s = StringArray.from_strings(strings)
    assert list(s) == strings and s == strings and len(s) == 4 and s[2] == "bé/ü.jpg"
    keep = np.array([True, False, True, True])
    assert list(s.select(keep)) == ["a", "bé/ü.jpg", "\ud800x"]
    r = Ragged.from_lists([[1, 2], [], [3]])
    assert r[0].tolist() == [1, 2] and r[1].tolist() == [] and r.select(np.array([False, True, True]))[1].tolist() == [3]


def test_count_entries_matches_the_reader(tmp_path: Path) -> None:
    m = tmp_path / "m.jsonl"
    m.write_text('\ufeff{"noise": 0.1}\n\n{"image": "a.jpg"}\n   \n{"image": "b.jpg", "tags": []}\n')
    assert count_entries(m) == len(read_manifest(m).entries) == 2
    m.write_text('{"image": "a.jpg"}\n{"image": "b.jpg"}')  # no header, no final newline
    assert count_entries(m) == 2


def test_query_cache_index_finds_by_string_and_by_path(world: Path) -> None:
    cache = QueryCache(world / "q")
    entries = read_manifest(world / "m.jsonl").entries
    with np.load(sorted((world / "q").glob("queries-*.npz"))[1]) as z:
        im, off = z["images"][0], z["offsets"]
        want = z["boxes"][off[0] : off[1]]
    assert np.array_equal(cache.get(str(im))[0], want)
    e5, orig5 = entries[5], read_manifest(world / "orig.jsonl").entries[5]  # named by its absolute path
    assert cache.get(e5.image) is None and len(cache.get(orig5.image)[0]) > 0
    assert np.array_equal(cache.get(e5.image, e5.path)[0], cache.get(orig5.image)[0])
    assert cache.get("images/none.jpg") is None and cache.get("nope", "/no/such/file.jpg") is None
