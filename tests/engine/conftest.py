"""Small stand-ins for the PreDet model and pre-training data, used by the engine's loop tests.

They honour the interfaces the engine codes against (DESIGN / issue 5): a map-style dataset with
``set_epoch`` whose item ``i`` at epoch ``e`` draws its randomness from a generator seeded by
``(seed, e, i)``, a picklable collate, and a model returning weighted ``loss_*`` terms plus
detached metrics. The model uses dropout, so the global RNG state matters for exact resume.

Loop tests pass them to ``pretrain(cfg, out, data=..., model=...)``; the CLI tests, which cannot,
use ``toy_engine`` (the public builders ``predet pretrain`` calls, replaced for the test).
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


def make_toy_data(n: int = 24, seed: int = 0) -> ToyData:
    return ToyData(dataset=ToyTwoViewDataset(n, seed=seed))


def make_toy_model(
    num_classes: int = NUM_CLASSES, *, nan_at_call: int = 0, extra_loss: str = "", nan_grad_at_call: int = 0
) -> nn.Module:
    """A ToyPreDet with the same initial weights at every call."""
    torch.manual_seed(0)
    return ToyPreDet(num_classes, nan_at_call=nan_at_call, extra_loss=extra_loss, nan_grad_at_call=nan_grad_at_call)


class ToyPreDet(nn.Module):
    """conv -> BN -> GAP -> dropout -> linear; loss_cls (softmax CE) and loss_info (view agreement).

    ``extra_loss``: the name of one more ``loss_*`` term the model returns (a loss added to a model
    needs no engine edit), NaN at ``nan_at_call`` like loss_info otherwise. At ``nan_grad_at_call``
    every loss is finite but a gradient is NaN (sqrt at 0).
    """

    def __init__(self, num_classes: int, nan_at_call: int = 0, extra_loss: str = "", nan_grad_at_call: int = 0) -> None:
        super().__init__()
        self.nan_grad_at_call = nan_grad_at_call
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(8, num_classes)
        self.nan_at_call = nan_at_call  # 1-based forward call that returns a NaN loss_info
        self.extra_loss = extra_loss
        self.calls = 0

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.bn(self.conv(x)).relu().mean(dim=(2, 3)))  # (N, 8)

    def forward(self, batch: dict) -> dict:
        self.calls += 1
        e1, e2 = self.embed(batch["view1"]), self.embed(batch["view2"])
        logits = self.fc(e1)
        loss_cls = -(batch["labels"] * logits.log_softmax(-1)).sum(-1).mean()
        loss_info = 0.1 * (e1 - e2).pow(2).sum(-1).mean()
        extra = {self.extra_loss: 0.01 * logits.pow(2).mean()} if self.extra_loss else {}
        if self.calls == self.nan_at_call:
            if extra:
                extra[self.extra_loss] = extra[self.extra_loss] * float("nan")
            else:
                loss_info = loss_info * float("nan")
        if self.calls == self.nan_grad_at_call:  # value 0, gradient 0 * inf = NaN
            loss_info = loss_info + (self.fc.bias[0] * 0).sqrt()
        top1 = (logits.argmax(-1) == batch["labels"].argmax(-1)).float().mean()
        return {
            "loss_cls": loss_cls,
            "loss_info": loss_info,
            **extra,
            "lookup_top1": top1.detach(),
            "valid_queries": torch.tensor(4.0),
        }


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    the CI machine's 2 cores are shared, and OpenMP spinning costs 5-10x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def toy_data():
    """``toy_data(n=24, seed=0)``: the stand-in data."""
    return make_toy_data


@pytest.fixture
def toy_model():
    """``toy_model(num_classes=3, nan_at_call=0, extra_loss="")``: the stand-in model, seeded."""
    return make_toy_model


@pytest.fixture
def toy_engine(monkeypatch):
    """For ``predet pretrain`` through the CLI: the data and model builders it calls return the
    stand-ins; returns a settings dict."""
    settings = {"n": 24, "nan_at_call": 0}

    def build_data(cfg):
        return make_toy_data(settings["n"], seed=cfg.seed)

    def build_model(cfg, num_classes):
        return ToyPreDet(num_classes, nan_at_call=settings["nan_at_call"])

    monkeypatch.setattr(pretrain_mod, "build_pretrain_data", build_data)
    monkeypatch.setattr(pretrain_mod, "build_predet", build_model)
    return settings


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory):
    """``$PREDET_CACHE`` pointing at a per-session folder, so ``builtin:tiny`` is generated there."""
    cache = tmp_path_factory.mktemp("predet_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREDET_CACHE", str(cache))
        yield cache
