"""``predet data vocab``: the paper's IG-50M recipe (§4.1) for any tagged images.

Tags are normalised (:func:`normalize_tag`), mapped to classes through a
synonyms file ``{class: [tag, ...]}``, unique images are counted per class, and classes with fewer
than ``min_images`` images are dropped. Writes ``OUT/vocab.json`` =
``{"classes": [...], "counts": {class: images}, "dropped": {class: images}}`` and
``OUT/manifest.jsonl`` with ``labels`` (images left without any class are not written). An output
is never one of the input files, and existing outputs are replaced only with ``--overwrite``.
``predet pretrain`` applies exactly :func:`build_vocab` when its manifest carries only tags.
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from predet.data.manifest import ManifestEntry, is_coco, iter_manifest, read_coco_as_manifest
from predet.errors import UserError

__all__ = [
    "Vocab", "build_vocab", "normalize_tag", "load_synonyms", "tag_to_classes", "resolve_labels", "LabelResolver",
    "ClassCounter", "file_key", "write_vocab",
]  # fmt: skip


# --------------------------------------------------------------------------------------------
# Tags -> classes
# --------------------------------------------------------------------------------------------
def normalize_tag(tag: str) -> str:
    """``"  #Dogs "`` -> ``"dogs"``: Unicode NFKC, case-folded, leading ``#`` and whitespace removed."""
    t = unicodedata.normalize("NFKC", tag).strip().casefold()
    return t.lstrip("#").strip()


def load_synonyms(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read a synonyms file ``{class: [tag, ...]}``; raises UserError naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"synonyms file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))  # a BOM is allowed
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path}: expected a non-empty JSON object {{class: [tag, ...]}}")
    for cls, tags in data.items():
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise UserError(f"{path}: class '{cls}' must map to a list of tag strings")
    return data


def tag_to_classes(synonyms: dict[str, list[str]]) -> dict[str, list[str]]:
    """Normalised tag -> classes it names. A class's own name is one of its tags (paper §4.1:
    "dog" expands to "#dogs", "#canine", ...); a tag listed under two classes names both."""
    out: dict[str, list[str]] = {}
    for cls, tags in synonyms.items():
        for t in [cls, *tags]:
            key = normalize_tag(t)
            if key and cls not in out.setdefault(key, []):
                out[key].append(cls)
    return out


class LabelResolver:
    """An entry's class names: its ``labels`` if given, else its tags mapped through ``synonyms``
    (sorted, unique). ``unknown`` counts the normalised tags no class lists (memory: one counter per
    distinct unknown tag, none per image)."""

    def __init__(self, synonyms: Optional[dict[str, list[str]]]) -> None:
        self.t2c = tag_to_classes(synonyms) if synonyms else {}
        self.unknown: dict[str, int] = {}

    def __call__(self, entry: ManifestEntry) -> list[str]:
        if entry.labels is not None:
            return sorted(set(entry.labels))
        classes: set[str] = set()
        for t in entry.tags:
            key = normalize_tag(t)
            if key in self.t2c:
                classes.update(self.t2c[key])
            elif key:
                self.unknown[key] = self.unknown.get(key, 0) + 1
        return sorted(classes)

    def unknown_by_count(self) -> dict[str, int]:
        """``unknown``, most frequent first (ties by name)."""
        return dict(sorted(self.unknown.items(), key=lambda kv: (-kv[1], kv[0])))


def resolve_labels(
    entries: Iterable[ManifestEntry], synonyms: Optional[dict[str, list[str]]]
) -> tuple[list[list[str]], dict[str, int]]:
    """Class names of each entry (:class:`LabelResolver`) and the count of unseen normalised tags."""
    resolver = LabelResolver(synonyms)
    out = [resolver(e) for e in entries]
    return out, resolver.unknown


def file_key(path: str | os.PathLike) -> int:
    """A 64-bit key of an image file's path string: the distinct files of a class are counted by
    key, 8 bytes each instead of a set of strings (a collision among 10^8 files: p < 3e-4)."""
    data = str(path).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class ClassCounter:
    """Distinct image files per class, fed one image at a time: 8 bytes per (image, class) pair
    (a repeated line's file counts once)."""

    def __init__(self) -> None:
        self._keys: dict[str, array] = {}

    def add(self, classes: Iterable[str], key: int) -> None:
        for c in classes:
            self._keys.setdefault(c, array("Q")).append(key)

    def counts(self) -> dict[str, int]:
        return {c: int(np.unique(np.frombuffer(k, np.uint64)).size) for c, k in self._keys.items()}

    def split(self, min_images: int) -> tuple[list[str], dict[str, int], dict[str, int]]:
        """(kept classes sorted by name, their counts, dropped classes' counts)."""
        counts = self.counts()
        kept = sorted(c for c, n in counts.items() if n >= min_images)
        dropped = {c: n for c, n in sorted(counts.items()) if n < min_images}
        return kept, {c: counts[c] for c in kept}, dropped


@dataclass
class Vocab:
    """Result of the tag -> class mapping.

    ``labels[i]`` are the kept classes of entry ``i`` (empty: the image has no class left);
    ``unknown_tags`` counts normalised tags that no class lists.
    """

    classes: list[str]
    counts: dict[str, int]
    dropped: dict[str, int]
    labels: list[list[str]]
    unknown_tags: dict[str, int]

    @property
    def num_no_class(self) -> int:
        return sum(1 for lab in self.labels if not lab)

    def to_json(self) -> dict:
        return {"classes": self.classes, "counts": self.counts, "dropped": self.dropped}


def check_min_images(min_images: int) -> None:
    if min_images < 1:
        raise UserError(f"--min-images / data.min_images must be >= 1, got {min_images}")


def build_vocab(
    entries: Sequence[ManifestEntry],
    synonyms: Optional[dict[str, list[str]]],
    min_images: int = 1,
) -> Vocab:
    """Map each entry's tags (or its ``labels``) to classes and drop rare classes.

    Classes are sorted by name, so the class index of a name does not depend on the data order.
    """
    check_min_images(min_images)
    resolver, counter = LabelResolver(synonyms), ClassCounter()
    raw = []
    for e in entries:
        raw.append(resolver(e))
        counter.add(raw[-1], file_key(e.path))
    kept, counts, dropped = counter.split(min_images)
    keep = set(kept)
    labels = [[c for c in classes if c in keep] for classes in raw]
    return Vocab(classes=kept, counts=counts, dropped=dropped, labels=labels, unknown_tags=resolver.unknown_by_count())


def _image_string(entry: ManifestEntry, out_dir: Path) -> str:
    """The entry's path as seen from ``out_dir`` (resolved; relative when it can be, like the input)."""
    if os.path.isabs(entry.image):
        return entry.image
    try:
        return os.path.relpath(entry.path.resolve(), out_dir)
    except ValueError:  # other drive on Windows
        return str(entry.path.resolve())


def _labelled_line(e: ManifestEntry, labels: list[str], out_dir: Path) -> str:
    obj: dict = {"image": _image_string(e, out_dir), "labels": labels}
    if e.tags:
        obj["tags"] = e.tags
    if e.queries is not None:
        obj["queries"] = e.queries.round(2).tolist()
    return json.dumps(obj)


def write_labelled_manifest(
    entries: Iterable[ManifestEntry], resolver: LabelResolver, classes: Sequence[str], out_dir: Path
) -> tuple[int, int]:
    """Stream ``out_dir/manifest.jsonl``: the entries with at least one of ``classes`` (labels
    from ``resolver``), written to a temporary file renamed at the end. Returns (lines written,
    entries left without a class)."""
    keep, resolved_out = set(classes), out_dir.resolve()
    target = out_dir / "manifest.jsonl"
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    kept = no_class = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for e in entries:
                labels = [c for c in resolver(e) if c in keep]
                if not labels:
                    no_class += 1
                    continue
                f.write(_labelled_line(e, labels, resolved_out) + "\n")
                kept += 1
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return kept, no_class


OUTPUTS = ("vocab.json", "manifest.jsonl")


def check_outputs(
    out: str | os.PathLike, inputs: Sequence[str | os.PathLike], overwrite: bool = False
) -> None:
    """UserError, before any work, when an output file in ``out`` is one of the ``inputs`` (the
    input would be lost: always refused) or already exists (refused unless ``overwrite``)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    for name in OUTPUTS:
        target = out / name
        for src in map(Path, inputs):
            same = target.resolve() == src.resolve()
            if same or (target.exists() and src.exists() and os.path.samefile(target, src)):  # hard link
                raise UserError(
                    f"--out {out}: writing {name} there would overwrite the input {src}; choose another --out"
                )
        if target.exists() and not overwrite:
            raise UserError(f"{target} exists; pass --overwrite to replace it, or choose another --out")


def _write_text(path: Path, text: str) -> None:
    """Atomically (temporary file + rename), without ``predet.utils`` (it imports torch)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _entries(path: Path) -> Iterator[ManifestEntry]:
    """A manifest's entries streamed (a COCO JSON is read whole, as it is one JSON object)."""
    return iter(read_coco_as_manifest(path).entries) if is_coco(path) else iter_manifest(path)


def _first_pass(path: Path, synonyms: dict, min_images: int) -> tuple[Vocab, int, tuple[int, int, int]]:
    """Count the classes' distinct images in one streamed pass over the manifest. Returns the
    vocab (without per-entry labels), the number of entries and the repeated lines (count, first
    repeating line, the line it repeats; memory: 16 bytes per line)."""
    resolver, counter = LabelResolver(synonyms), ClassCounter()
    keys, lines = array("Q"), array("q")
    for e in _entries(path):
        key = file_key(e.path)
        counter.add(resolver(e), key)
        keys.append(key)
        lines.append(e.line)
    if not keys:
        raise UserError(f"{path}: manifest has no images")
    kept, counts, dropped = counter.split(min_images)
    vocab = Vocab(classes=kept, counts=counts, dropped=dropped, labels=[], unknown_tags=resolver.unknown_by_count())
    return vocab, len(keys), _repeats(np.frombuffer(keys, np.uint64), np.frombuffer(lines, np.int64))


def _repeats(keys: np.ndarray, lines: np.ndarray) -> tuple[int, int, int]:
    """(lines naming the file of an earlier line, the first such line, the line it repeats)."""
    order = np.argsort(keys, kind="stable")  # a file's lines in file order
    k = keys[order]
    later = np.zeros(len(k), bool)
    later[1:] = k[1:] == k[:-1]
    if not later.any():
        return 0, 0, 0
    pos = np.flatnonzero(later)
    first_rep = pos[np.argmin(lines[order[pos]])]
    start = np.searchsorted(k, k[first_rep])  # the group's first element: its first line
    return int(later.sum()), int(lines[order[first_rep]]), int(lines[order[start]])


def write_vocab(
    manifest: str | os.PathLike,
    synonyms: str | os.PathLike,
    out: str | os.PathLike,
    *,
    min_images: int = 1,
    overwrite: bool = False,
) -> dict:
    """``out/vocab.json`` (the classes with >= ``min_images`` images) and ``out/manifest.jsonl``
    (the manifest's lines labelled with them) of a manifest and its synonyms JSON. Two streamed
    passes over the manifest (classes, then the labelled manifest): memory grows with the classes
    and 16 bytes per line, not with the lines' text.

    Returns ``{"vocab": Vocab, "read", "kept", "no_class": lines, "repeats": lines naming an image
    of an earlier line, "repeat_line", "repeat_first": the first of them and the line it repeats}``.
    """
    check_outputs(out, [manifest, synonyms], overwrite)
    check_min_images(min_images)
    path = Path(manifest)
    if not path.is_file():
        raise UserError(f"manifest not found: {path}")
    tags = load_synonyms(synonyms)
    vocab, n, (repeats, line, first) = _first_pass(path, tags, min_images)
    if not vocab.classes:
        raise UserError(
            f"no class has >= {min_images} images (--min-images); "
            f"{len(vocab.dropped)} classes were seen"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)  # check_outputs: not an existing file
    _write_text(out / "vocab.json", json.dumps(vocab.to_json(), indent=2) + "\n")  # as predet.utils.write_json
    kept, no_class = write_labelled_manifest(_entries(path), LabelResolver(tags), vocab.classes, out)
    return {"vocab": vocab, "read": n, "kept": kept, "no_class": no_class, "repeats": repeats,
            "repeat_line": line, "repeat_first": first}  # fmt: skip
