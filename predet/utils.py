"""Small shared helpers: atomic writes, checkpoint I/O, run folders, seeding."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

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


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def save_checkpoint(obj: dict, path: str | Path) -> None:
    """``torch.save`` to a temp file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """``torch.load(weights_only=True)``; a missing or unreadable file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle of forbidden types, ...
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def prepare_run_dir(out: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    """Create a run folder; an existing non-empty one needs ``resume`` or ``overwrite``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if resume:
            return out
        if not overwrite:
            raise UserError(
                f"run folder {out} exists; pass --resume to continue it or --overwrite to replace it"
            )
        shutil.rmtree(out)
    elif resume:
        raise UserError(f"--resume given but run folder {out} does not exist")
    out.mkdir(parents=True, exist_ok=True)
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
