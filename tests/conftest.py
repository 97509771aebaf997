"""Shared fixtures: the tiny built-in world, generated once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from predet.data.synth import generate_world


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path ``W`` of ``predet data synth --out W --preset tiny --seed 0`` (read-only: don't modify).

    Holds ``W/pretrain/{manifest.jsonl,synonyms.json,truth.jsonl,meta.json,images/}`` and
    ``W/det/{train.json,val.json,images/}`` (DESIGN §6).
    """
    out = tmp_path_factory.mktemp("tiny_world") / "world"
    generate_world(out, "tiny", seed=0, workers=1, progress=False)
    return out
