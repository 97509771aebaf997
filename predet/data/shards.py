"""``predet data shards``: WebDataset tar shards (``KEY.jpg`` + ``KEY.json`` per image).

``KEY.json`` = ``{"image": <manifest string>, "labels": [class, ...], "queries": [[x1, y1, x2, y2],
...], "scores": [...]}`` with boxes in the stored JPEG's pixels. The stored JPEG is the original
file when it is a plain RGB JPEG without EXIF rotation, else the decoded RGB image re-encoded
(quality 95), so every reader sees the pixel frame the queries were computed in.

Shard ``k`` (``OUT/shard-<k>.tar``) holds manifest entries ``[k * N, (k + 1) * N)``; rank ``r`` of a
torchrun launch writes the shards with ``k % WORLD_SIZE == r``. ``OUT/shard-<k>.entries.json``
records what the shard was written for (its entries' ``image`` strings and classes): on re-runs a
shard whose record matches is skipped, any other (the manifest, the classes or ``--shard-size``
changed, or a shard written before the record existed) is rewritten, and shards numbered beyond
the manifest's last (an earlier run over a longer manifest) are removed.
``OUT/vocab.json`` carries the classes, ``OUT/failed.jsonl`` the unreadable images.
Reading is :class:`predet.data.datasets.ShardDataset` (``data.format=shards``, ``data.shards=OUT``).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from predet.data.images import BadImage, load_image
from predet.data.manifest import ManifestEntry, read_manifest
from predet.data.queries import QueryCache
from predet.data.vocab import build_vocab, load_synonyms
from predet.distributed import env_rank
from predet.errors import UserError
from predet.utils import atomic_write_text, folder_lock, remove_numbered, write_json

__all__ = ["encode_sample", "write_shards", "shard_manifest"]


def _stored_jpeg(entry: ManifestEntry) -> tuple[bytes, tuple[int, int]]:
    """JPEG bytes of the image as the queries see it, and its size. Raises BadImage."""
    img, full = load_image(entry.path)
    raw = entry.path.read_bytes()
    with Image.open(io.BytesIO(raw)) as src:
        plain = src.format == "JPEG" and src.mode == "RGB" and src.getexif().get(0x0112, 1) == 1
    if plain:
        return raw, full
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue(), full


def encode_sample(
    entry: ManifestEntry, key: str, labels: Sequence[str], queries: Optional[tuple[np.ndarray, np.ndarray]]
) -> dict:
    """One WebDataset sample dict (``__key__``, ``jpg``, ``json``). Raises BadImage."""
    jpg, _ = _stored_jpeg(entry)
    boxes, scores = queries if queries is not None else (np.zeros((0, 4), np.float32), np.zeros(0, np.float32))
    meta = {
        "image": entry.image,
        "labels": list(labels),
        "queries": np.round(boxes, 2).tolist(),
        "scores": np.round(scores, 4).tolist(),
    }
    return {"__key__": key, "jpg": jpg, "json": json.dumps(meta).encode()}


def write_shards(
    entries: Sequence[ManifestEntry],
    labels: Sequence[Sequence[str]],
    out: str | os.PathLike,
    *,
    cache: Optional[QueryCache] = None,
    shard_size: int = 1000,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, int]:
    """Write this rank's missing or stale shards; returns counts (written, failed, shards
    written/skipped/rewritten, and on rank 0 shards removed beyond the manifest's last)."""
    import webdataset as wds

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"written": 0, "failed": 0, "no_class": 0, "shards_written": 0, "shards_skipped": 0,
              "shards_rewritten": 0}  # fmt: skip
    for k, start in enumerate(range(0, len(entries), shard_size)):
        if k % world_size != rank:
            continue
        path = out / f"shard-{k:06d}.tar"
        stop = min(start + shard_size, len(entries))
        record = {"images": [e.image for e in entries[start:stop]], "labels": [list(x) for x in labels[start:stop]]}
        if path.exists():
            if _read_record(out / f"shard-{k:06d}.entries.json") == record:
                counts["shards_skipped"] += 1
                continue
            counts["shards_rewritten"] += 1
            print(f"{path}: written for other images or classes than the manifest's entries {start}..{stop - 1} "
                  "(or before shards recorded them): rewriting it", flush=True)  # fmt: skip
        failed: list[dict] = []
        tmp = out / f".shard-{k:06d}.tar.tmp{os.getpid()}"
        with wds.TarWriter(str(tmp)) as sink:
            for i in range(start, stop):
                e = entries[i]
                if not labels[i]:
                    counts["no_class"] += 1
                    continue
                if e.queries is not None:
                    queries = (e.queries, np.ones(len(e.queries), np.float32))
                elif cache is not None and cache.is_failed(e.image, e.path):
                    failed.append({"image": e.image, "reason": cache.failed_reason(e.image, e.path)})
                    continue
                else:
                    queries = cache.get(e.image, e.path) if cache is not None else None
                try:
                    sink.write(encode_sample(e, f"{i:09d}", labels[i], queries))
                except BadImage as err:
                    failed.append({"image": e.image, "reason": err.reason})
                    continue
                counts["written"] += 1
        # the shard's failures and record first, then the shard: a finished shard always has both
        atomic_write_text(out / f"shard-{k:06d}.failed.jsonl", "".join(json.dumps(f) + "\n" for f in failed))
        atomic_write_text(out / f"shard-{k:06d}.entries.json", json.dumps(record) + "\n")
        os.replace(tmp, path)
        counts["shards_written"] += 1
        counts["failed"] += len(failed)
    with folder_lock(out, ".merge.lock"):  # ranks take turns: the last to finish reads every shard
        if rank == 0:
            n_shards = -(-len(entries) // shard_size)
            counts["shards_removed"] = remove_numbered(out, "shard-", keep=n_shards, what="shards")
        _merge_failed(out)
    return counts


def _read_record(path: Path) -> Optional[dict]:
    """A shard's ``entries.json`` record; None when absent or unreadable (the shard is rewritten)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _merge_failed(out: Path) -> None:
    text = "".join(p.read_text() for p in sorted(out.glob("shard-*.failed.jsonl")))
    atomic_write_text(out / "failed.jsonl", text)


def shard_manifest(
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    *,
    queries: Optional[str | os.PathLike] = None,
    synonyms: Optional[str | os.PathLike] = None,
    shard_size: int = 1000,
) -> dict:
    """:func:`write_shards` of a manifest into ``out`` (this process's share under torchrun), with
    ``out/vocab.json``. The query boxes come from the cache folder ``queries`` or the manifest's
    lines; the classes from the lines' labels, or their tags mapped by ``synonyms`` (default:
    ``synonyms.json`` beside the manifest). Prints one summary line and the first failed images;
    returns the counts."""
    m = read_manifest(manifest)
    entries = m.entries
    tags = None
    if not all(e.labels is not None for e in entries):
        path = Path(synonyms) if synonyms else m.path.parent / "synonyms.json"
        if not path.is_file():
            raise UserError(f"{m.path}: lines carry tags but no labels; give --synonyms (not found: {path})")
        tags = load_synonyms(path)
    vocab = build_vocab(entries, tags, 1)
    cache = QueryCache(queries) if queries else None
    if cache is None and not any(e.queries is not None for e in entries):
        raise UserError(f"{m.path}: no query boxes: pass --queries DIR from `predet data queries`")
    rank, world = env_rank()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        write_json(out / "vocab.json", vocab.to_json())
    counts = write_shards(entries, vocab.labels, out, cache=cache, shard_size=shard_size, rank=rank, world_size=world)
    print(
        f"rank {rank}/{world}: {counts['written']} images in {counts['shards_written']} new shards "
        f"({counts['shards_skipped']} finished shards skipped"
        + (f", {counts['shards_rewritten']} stale ones rewritten" if counts["shards_rewritten"] else "")
        + f"), {counts['failed']} failed, "
        f"{counts['no_class']} without a class -> {out}"
    )
    failed_path = out / "failed.jsonl"
    for line in failed_path.read_text().splitlines()[:10]:
        rec = json.loads(line)
        print(f"  failed: {rec['image']}: {rec['reason']}")
    return counts
