"""Fixtures for the modeling tests: a tiny model config and synthetic two-view batches."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from predet.config import PretrainConfig, load_config

# independent of configs/pretrain/tiny_cpu.yaml so that golden values do not move with it
TINY = [
    "model.backbone=resnet18",
    "model.input_size=64",
    "model.fpn_channels=32",
    "model.crpn.anchor_sizes=[8,16,32,64,128]",
    "model.crpn.dim=8",
    "model.crpn.batch_per_view=64",
    "model.crpn.pre_nms_top_n=24",
    "model.crpn.post_nms_top_n=12",
    "model.box_head_dim=64",
    "model.croi.embed_dim=32",
    "model.croi.reg_dim=8",
    "model.croi.num_negatives=16",
    "model.jitter.boxes_per_query=4",
    "model.roi_sampling_ratio=1",
    "data.queries_per_image=4",
]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these sizes gain nothing from more, and the CI box is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_cfg() -> Callable[..., PretrainConfig]:
    """``tiny_cfg("loss.info=false", ...)``: the tiny model config plus overrides."""

    def make(*overrides: str) -> PretrainConfig:
        return load_config(PretrainConfig, None, TINY + list(overrides))

    return make


def random_boxes(g: torch.Generator, n: int, q: int, size: int) -> torch.Tensor:
    """``[n, q, 4]`` XYXY boxes with sides in [0.15, 0.6] of ``size``, inside the image."""
    wh = (0.15 + 0.45 * torch.rand(n, q, 2, generator=g)) * size
    xy = torch.rand(n, q, 2, generator=g) * (size - wh)
    return torch.cat([xy, xy + wh], dim=2)


@pytest.fixture
def make_batch() -> Callable[..., dict]:
    """``make_batch(n, q, size, k, seed, mask=None)``: a collated two-view batch of noise."""

    def make(n=2, q=4, size=64, k=5, seed=0, mask=None) -> dict:
        g = torch.Generator().manual_seed(seed)
        labels = (torch.rand(n, k, generator=g) < 0.4).float()
        labels[:, 0] = 1.0
        return {
            "view1": torch.randn(n, 3, size, size, generator=g),
            "view2": torch.randn(n, 3, size, size, generator=g),
            "boxes1": random_boxes(g, n, q, size),
            "boxes2": random_boxes(g, n, q, size),
            "query_mask": torch.ones(n, q, dtype=torch.bool) if mask is None else mask,
            "labels": labels,
        }

    return make
