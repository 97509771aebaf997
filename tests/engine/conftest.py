"""Small stand-ins for the PreDet model and pre-training data, used by the engine's loop tests.

They honour the interfaces the engine codes against (DESIGN / issue 5): a map-style dataset with
``set_epoch`` whose item ``i`` at epoch ``e`` draws its randomness from a generator seeded by
``(seed, e, i)``, a picklable collate, and a model returning weighted ``loss_*`` terms plus
detached metrics. The model uses dropout, so the global RNG state matters for exact resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from predet.engine import pretrain as pretrain_mod

SIZE = 16  # S: view side
NUM_CLASSES = 3  # K


class ToyTwoViewDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 24, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_000 + self.epoch * 1000 + i)
        label = i % NUM_CLASSES
        img = torch.randn(3, SIZE, SIZE, generator=g) * 0.5
        img[label] += 1.0  # class signal in one channel
        labels = torch.zeros(NUM_CLASSES)
        labels[label] = 1.0
        noise = torch.randn(3, SIZE, SIZE, generator=g) * 0.1
        return {"view1": img, "view2": img + noise, "labels": labels, "seed": i}


def toy_collate(samples: list[dict]) -> dict:
    return {
        "view1": torch.stack([s["view1"] for s in samples]),
        "view2": torch.stack([s["view2"] for s in samples]),
        "labels": torch.stack([s["labels"] for s in samples]),
    }


@dataclass
class ToyData:
    dataset: torch.utils.data.Dataset
    classes: list = field(default_factory=lambda: ["a", "b", "c"])
    collate_fn: object = toy_collate
    num_skipped: int = 0


class ToyPreDet(nn.Module):
    """conv -> BN -> GAP -> dropout -> linear; loss_cls (softmax CE) and loss_info (view agreement)."""

    def __init__(self, num_classes: int, nan_at_call: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(8, num_classes)
        self.nan_at_call = nan_at_call  # 1-based forward call that returns a NaN loss_info
        self.calls = 0

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.bn(self.conv(x)).relu().mean(dim=(2, 3)))  # (N, 8)

    def forward(self, batch: dict) -> dict:
        self.calls += 1
        e1, e2 = self.embed(batch["view1"]), self.embed(batch["view2"])
        logits = self.fc(e1)
        loss_cls = -(batch["labels"] * logits.log_softmax(-1)).sum(-1).mean()
        loss_info = 0.1 * (e1 - e2).pow(2).sum(-1).mean()
        if self.calls == self.nan_at_call:
            loss_info = loss_info * float("nan")
        top1 = (logits.argmax(-1) == batch["labels"].argmax(-1)).float().mean()
        return {
            "loss_cls": loss_cls,
            "loss_info": loss_info,
            "lookup_top1": top1.detach(),
            "valid_queries": torch.tensor(4.0),
        }


@pytest.fixture
def toy_engine(monkeypatch):
    """Swap the engine's data/model builders for the stand-ins; returns a settings dict."""
    settings = {"n": 24, "nan_at_call": 0}

    def build_data(cfg):
        return ToyData(dataset=ToyTwoViewDataset(settings["n"], seed=cfg.seed))

    def build_model(cfg, num_classes):
        return ToyPreDet(num_classes, nan_at_call=settings["nan_at_call"])

    monkeypatch.setattr(pretrain_mod, "_build_data", build_data)
    monkeypatch.setattr(pretrain_mod, "_build_model", build_model)
    return settings


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory):
    """``$PREDET_CACHE`` pointing at a per-session folder, so ``builtin:tiny`` is generated there."""
    cache = tmp_path_factory.mktemp("predet_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREDET_CACHE", str(cache))
        yield cache
