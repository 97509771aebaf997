"""The built-in synthetic world as a data source: ``data.manifest: builtin:<preset>[:<seed>]``.

DESIGN §3 makes the synthetic world the embedded default of every command. ``builtin:tiny``
resolves to a world cached under ``$PREDET_CACHE/worlds/tiny-seed0`` (``$PREDET_CACHE`` defaults
to ``~/.cache/predet``), generated together with its query cache on first use. A file lock
makes concurrent users (the ranks of one ``torchrun`` launch, parallel tests) wait for one
generator instead of all writing the same folder; a ``.complete`` marker, written last, tells a
finished world from one whose generation was interrupted (which is regenerated). The marker
records a fingerprint of the generating code (synthesis and query caching): a world cached by an
older ``predet`` is regenerated rather than silently reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from predet.errors import UserError
from predet.utils import folder_lock

__all__ = ["BuiltinWorld", "cache_root", "parse_builtin", "ensure_world", "resolve_builtin"]

PRESETS = ("tiny", "small", "base")
MARKER = ".complete"


@dataclass(frozen=True)
class BuiltinWorld:
    """Paths of a generated world (layout of DESIGN §6, plus the query cache)."""

    root: Path
    preset: str
    seed: int

    @property
    def manifest(self) -> Path:
        return self.root / "pretrain" / "manifest.jsonl"

    @property
    def queries(self) -> Path:
        return self.root / "queries"

    @property
    def det_train(self) -> Path:
        return self.root / "det" / "train.json"

    @property
    def det_val(self) -> Path:
        return self.root / "det" / "val.json"

    @property
    def det_images(self) -> Path:
        return self.root / "det" / "images"


def cache_root() -> Path:
    """``$PREDET_CACHE/worlds``, or ``~/.cache/predet/worlds``."""
    base = os.environ.get("PREDET_CACHE") or Path.home() / ".cache" / "predet"
    return Path(base) / "worlds"


def parse_builtin(spec: str) -> tuple[str, int]:
    """``"builtin:tiny"`` -> ``("tiny", 0)``; ``"builtin:small:3"`` -> ``("small", 3)``."""
    parts = spec.split(":")
    if parts[0] != "builtin" or len(parts) not in (2, 3) or parts[1] not in PRESETS:
        raise UserError(
            f"data.manifest={spec!r}: expected builtin:<{'|'.join(PRESETS)}>[:<seed>]"
        )
    try:
        seed = int(parts[2]) if len(parts) == 3 else 0
    except ValueError:
        raise UserError(f"data.manifest={spec!r}: the seed must be an integer") from None
    return parts[1], seed


def generator_fingerprint() -> str:
    """sha1 of the source of the modules that make a world (synthesis, rendering, query boxes)."""
    from predet.data import queries, synth, synth_render

    h = hashlib.sha1()
    for module in (synth, synth_render, queries):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()


def _is_complete(world: BuiltinWorld, fingerprint: str) -> bool:
    try:
        marker = json.loads((world.root / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return marker.get("fingerprint") == fingerprint


def ensure_world(
    preset: str = "tiny", seed: int = 0, *, root: Optional[Path] = None, progress: bool = True
) -> BuiltinWorld:
    """The cached world ``(preset, seed)``, generated with its query cache if not there yet."""
    root = Path(root) if root is not None else cache_root()
    world = BuiltinWorld(root / f"{preset}-seed{seed}", preset, seed)
    fingerprint = generator_fingerprint()
    if _is_complete(world, fingerprint):
        return world
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        msg = f"cannot create the world cache {root}: {e.strerror} (set PREDET_CACHE)"
        raise UserError(msg) from None
    with folder_lock(root, f".{world.root.name}.lock"):  # one process generates, the others wait
        if not _is_complete(world, fingerprint):  # another process may have finished meanwhile
            if world.root.exists():  # left by an interrupted generation or older code
                shutil.rmtree(world.root)
            _generate(world, progress=progress)
            marker = json.loads((world.root / MARKER).read_text())
            marker["fingerprint"] = fingerprint
            (world.root / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return world


def _generate(world: BuiltinWorld, *, progress: bool) -> None:
    from predet.data.manifest import read_manifest
    from predet.data.queries import cache_queries
    from predet.data.synth import generate_world

    if progress:
        print(f"predet: generating the built-in world '{world.preset}' (seed {world.seed}) "
              f"in {world.root} (once)", flush=True)
    info = generate_world(world.root, world.preset, world.seed, progress=progress)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    counts = cache_queries(
        read_manifest(world.manifest).entries,
        world.queries,
        workers=max(1, cores or 1),
        progress=progress,
    )
    marker = {
        "preset": world.preset, "seed": world.seed, "counts": info.get("counts"), "queries": counts
    }
    (world.root / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def resolve_builtin(spec: str, *, progress: bool = True) -> BuiltinWorld:
    """``builtin:<preset>[:<seed>]`` -> the world, generated on first use."""
    preset, seed = parse_builtin(spec)
    return ensure_world(preset, seed, progress=progress)
