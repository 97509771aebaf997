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

import argparse
import json
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from predet.data.manifest import ManifestEntry, read_manifest
from predet.errors import UserError
from predet.utils import atomic_write_text, write_json

__all__ = [
    "Vocab", "build_vocab", "normalize_tag", "load_synonyms", "tag_to_classes", "resolve_labels", "run"
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


def resolve_labels(
    entries: Sequence[ManifestEntry], synonyms: Optional[dict[str, list[str]]]
) -> tuple[list[list[str]], dict[str, int]]:
    """Class names of each entry: its ``labels`` if given, else its tags mapped through ``synonyms``.

    Returns the per-entry class lists (sorted, unique) and a count of unseen normalised tags.
    """
    t2c = tag_to_classes(synonyms) if synonyms else {}
    unknown: dict[str, int] = {}
    out = []
    for e in entries:
        if e.labels is not None:
            out.append(sorted(set(e.labels)))
            continue
        classes: set[str] = set()
        for t in e.tags:
            key = normalize_tag(t)
            if key in t2c:
                classes.update(t2c[key])
            elif key:
                unknown[key] = unknown.get(key, 0) + 1
        out.append(sorted(classes))
    return out, unknown


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


def build_vocab(
    entries: Sequence[ManifestEntry],
    synonyms: Optional[dict[str, list[str]]],
    min_images: int = 1,
) -> Vocab:
    """Map each entry's tags (or its ``labels``) to classes and drop rare classes.

    Classes are sorted by name, so the class index of a name does not depend on the data order.
    """
    if min_images < 1:
        raise UserError(f"--min-images / data.min_images must be >= 1, got {min_images}")
    raw, unknown = resolve_labels(entries, synonyms)
    images: dict[str, set[str]] = {}  # class -> its distinct image files (a repeated line counts once)
    for e, classes in zip(entries, raw):
        for c in classes:
            images.setdefault(c, set()).add(str(e.path))
    counts = {c: len(files) for c, files in images.items()}
    kept = sorted(c for c, n in counts.items() if n >= min_images)
    dropped = {c: n for c, n in sorted(counts.items()) if n < min_images}
    keep = set(kept)
    labels = [[c for c in classes if c in keep] for classes in raw]
    return Vocab(
        classes=kept,
        counts={c: counts[c] for c in kept},
        dropped=dropped,
        labels=labels,
        unknown_tags=dict(sorted(unknown.items(), key=lambda kv: (-kv[1], kv[0]))),
    )


def _image_string(entry: ManifestEntry, out_dir: Path) -> str:
    """The entry's path as seen from ``out_dir`` (relative when it can be, like the input)."""
    if os.path.isabs(entry.image):
        return entry.image
    try:
        return os.path.relpath(entry.path.resolve(), out_dir.resolve())
    except ValueError:  # other drive on Windows
        return str(entry.path.resolve())


def write_labelled_manifest(entries: Sequence[ManifestEntry], vocab: Vocab, out_dir: Path) -> int:
    """Write ``out_dir/manifest.jsonl`` (entries with at least one class); returns lines written."""
    lines = []
    for e, labels in zip(entries, vocab.labels):
        if not labels:
            continue
        obj: dict = {"image": _image_string(e, out_dir), "labels": labels}
        if e.tags:
            obj["tags"] = e.tags
        if e.queries is not None:
            obj["queries"] = e.queries.round(2).tolist()
        lines.append(json.dumps(obj))
    atomic_write_text(out_dir / "manifest.jsonl", "\n".join(lines) + "\n")
    return len(lines)


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


def run(args: argparse.Namespace) -> int:
    check_outputs(args.out, [args.manifest, args.synonyms], args.overwrite)
    manifest = read_manifest(args.manifest)
    synonyms = load_synonyms(args.synonyms)
    vocab = build_vocab(manifest.entries, synonyms, args.min_images)
    if not vocab.classes:
        raise UserError(
            f"no class has >= {args.min_images} images (--min-images); "
            f"{len(vocab.dropped)} classes were seen"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # check_outputs: not an existing file
    write_json(out / "vocab.json", vocab.to_json())
    kept = write_labelled_manifest(manifest.entries, vocab, out)
    n = len(manifest.entries)
    top = ", ".join(f"{t} ({c})" for t, c in list(vocab.unknown_tags.items())[:8])
    print(f"images: {n} read, {kept} kept, {vocab.num_no_class} with no class left")
    seen: dict[str, int] = {}
    repeats = [(e.line, seen[str(e.path)]) for e in manifest.entries if seen.setdefault(str(e.path), e.line) != e.line]
    if repeats:  # counted once per class; kept in the manifest as given (trained on as often)
        line, first = repeats[0]
        print(f"repeated images: {len(repeats)} lines name an image of an earlier line (first: line {line} "
              f"repeats line {first}); each counts once towards --min-images")  # fmt: skip
    print(f"classes: {len(vocab.classes)} kept, {len(vocab.dropped)} dropped (< {args.min_images} images)")
    shown = "" if len(vocab.unknown_tags) <= 8 else " (the 8 most frequent)"
    print(f"tags never seen in the synonyms: {len(vocab.unknown_tags)} distinct" + (f"{shown}: {top}" if top else ""))
    print(f"wrote {out / 'vocab.json'} and {out / 'manifest.jsonl'}")
    return 0
