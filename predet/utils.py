"""Small shared helpers: atomic writes, checkpoint I/O, run folders, seeding."""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch

from predet.errors import UserError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def remove_numbered(folder: str | Path, prefix: str, *, keep: int, what: str) -> int:
    """Delete every file ``folder/<prefix><k>.*`` numbered ``k >= keep`` (all files of a shard:
    ``shard-000003.tar`` with its ``.entries.json`` and ``.failed.jsonl``), left by an earlier run
    over a longer manifest or with a smaller ``--shard-size``: the readers read every shard of the
    folder. Returns how many shard numbers were removed (said on stdout, naming ``what``)."""
    folder, removed = Path(folder), set()
    for path in sorted(folder.glob(f"{prefix}*")):
        number = path.name[len(prefix) :].split(".", 1)[0]
        if number.isdigit() and int(number) >= keep:
            path.unlink()
            removed.add(number)
    if removed:
        print(f"{folder}: removed {len(removed)} {what} numbered beyond the manifest's {keep} (an earlier run "
              "over a longer manifest or with a smaller --shard-size)", flush=True)  # fmt: skip
    return len(removed)


@contextlib.contextmanager
def folder_lock(folder: str | Path, name: str = ".lock") -> Iterator[None]:
    """An exclusive ``flock`` on ``folder/name`` for the ``with`` block: processes that each
    rewrite a summary of the folder (ranks merging their shards' records) take turns, so the one
    that finishes last reads every other's finished work."""
    try:
        import fcntl
    except ImportError:  # no POSIX locks (Windows): one process at a time is the caller's affair
        yield
        return
    with open(Path(folder) / name, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        yield


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """``obj`` as strict JSON (a NaN or infinite float is written as ``null``: Python's ``NaN`` is
    not JSON, and other readers reject the whole file), atomically."""
    try:  # the common case without a copy (predictions.json can hold millions of objects)
        text = json.dumps(obj, indent=indent, allow_nan=False)
    except ValueError:
        text = json.dumps(_finite_or_none(obj), indent=indent, allow_nan=False)
    atomic_write_text(path, text + "\n")


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def save_checkpoint(obj: dict, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync'ed, renamed over ``path``, and
    the folder fsync'ed: a crash or a power cut never leaves half a file under ``path``.

    On any failure the temporary file is removed and ``path`` is as it was; a full disk (ENOSPC,
    which torch's zip writer reports as a RuntimeError) is a one-line :class:`UserError` naming
    the folder, the space the file needs and the space left.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # KeyboardInterrupt included: no partial file stays behind
        with contextlib.suppress(OSError):
            tmp.unlink()
        if _is_disk_full(e):
            raise UserError(_disk_full_message(path, obj)) from None
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some file systems refuse fsync on a folder
            os.fsync(fd)
    finally:
        os.close(fd)


def _is_disk_full(e: BaseException) -> bool:
    """ENOSPC / EDQUOT, raised as OSError by Python or as RuntimeError by torch's zip writer."""
    import errno

    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(e)
    return isinstance(e, RuntimeError) and (
        "No space left" in text or "unexpected pos" in text or "file write failed" in text
    )


def tensor_bytes(obj: Any) -> int:
    """The bytes of every tensor in a nested dict/list (what ``torch.save`` must write, about)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _disk_full_message(path: Path, obj: Any) -> str:
    free = shutil.disk_usage(path.parent).free
    need = tensor_bytes(obj)
    return (
        f"no space left on the device of {path.parent} to write {path.name}: it needs about "
        f"{need / 2**20:.0f} MB, {free / 2**20:.0f} MB are free; the earlier checkpoints are intact "
        "(free space, then resume the run)"
    )


# what ``torch.save`` files start with: a zip archive (the default since torch 1.6), or the
# legacy format's pickled magic number (weights_only loading reads protocol 2 only; others get
# torch's own reason)
_ZIP_MAGIC = b"PK"
_LEGACY_MAGIC = tuple(
    pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=p)
    for p in range(2, pickle.HIGHEST_PROTOCOL + 1)
)


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:  # a multi-byte character cut at the end of `head` still counts
        return e.start >= len(head) - 3 and b"\0" not in head
    return b"\0" not in head


def _not_a_checkpoint(path: Path, head: bytes) -> str:
    """Why a file that ``torch.save`` did not write is refused, as one line."""
    if not head:
        what = "an empty file"
    elif head.startswith(b"\x80") or path.suffix.lower() in (".pkl", ".pickle"):
        what = "a plain pickle, e.g. a detectron2 .pkl, not a torch.save file"
    elif _is_text(head):
        what = "a text file"
    else:
        what = "neither a torch.save zip nor a legacy torch file"
    return f"{path}: not a PyTorch checkpoint ({what})"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """``torch.load(weights_only=True)``; a missing, foreign or unreadable file is a UserError.

    A file that does not start as ``torch.save`` writes it (a detectron2 ``.pkl``, a YAML file, ...)
    is refused before unpickling, by name and kind.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    with path.open("rb") as f:
        head = f.read(64)
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_LEGACY_MAGIC)):
        raise UserError(_not_a_checkpoint(path, head))
    try:
        with warnings.catch_warnings():  # a legacy file pickled with protocol > 2
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle of forbidden types, ...
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def prepare_run_dir(out: str | Path, resume: bool = False, overwrite: bool = False, *, resumable: bool = True) -> Path:
    """Create a run folder; an existing non-empty one needs ``resume`` or ``overwrite``
    (``resumable=False``: a command without ``--resume``, whose error names ``--overwrite`` only)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"run folder {out} is a file, not a folder; choose another --out")
    if out.exists() and any(out.iterdir()):
        if resume:
            return out
        if not overwrite:
            how = "--resume to continue it or --overwrite to replace it" if resumable else "--overwrite to replace it"
            raise UserError(f"run folder {out} exists; pass {how}")
        shutil.rmtree(out)
    elif resume and out.exists():
        raise UserError(
            f"--resume given but run folder {out} is empty: it holds no run (no checkpoint) "
            "to resume; drop --resume to start one there"
        )
    elif resume:
        raise UserError(f"--resume given but run folder {out} does not exist")
    out.mkdir(parents=True, exist_ok=True)
    return out


def absolute_path(path: Optional[str]) -> Optional[str]:
    """A data path as ``config.yaml`` records it: absolute, so that the run folder works from any
    directory. ``None``, ``""``, ``builtin:...`` specs and URLs (``scheme://``, ``pipe:``) are kept."""
    if not path or path.startswith(("builtin:", "pipe:")) or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def flatten_keys(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"a.b.c": leaf}`` (dotted keys, depth first); an empty mapping is a
    leaf (``{"a": {}}`` stays ``{"a": {}}``: a config's ``a: {}`` is still a key given)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
