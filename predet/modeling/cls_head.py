"""Multi-label classification head shared over the FPN levels (paper §3.1).

Shape legend:
    B: views, C: FPN channels, L: FPN levels, K: classes, Hl/Wl: size of level l.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn
from torch import Tensor

from predet.modeling.losses import multilabel_bce, multilabel_softmax_ce

__all__ = ["ClsHead", "CLS_LOSSES"]

CLS_LOSSES = ("softmax", "bce")


class ClsHead(nn.Module):
    """Global-average-pool each level, then one linear classifier shared by all levels."""

    def __init__(self, *, in_channels: int, num_classes: int, loss: str = "softmax") -> None:
        super().__init__()
        if loss not in CLS_LOSSES:
            raise ValueError(f"unknown classification loss '{loss}' (choose from {CLS_LOSSES})")
        self.loss_type = loss
        self.fc = nn.Linear(in_channels, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        """``features``: L maps ``[B, C, Hl, Wl]`` -> logits ``[L, B, K]``."""
        pooled = torch.stack([f.mean(dim=(2, 3)) for f in features.values()])  # [L, B, C]
        return self.fc(pooled)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """``logits [L, B, K]``, ``labels [B, K]`` -> the loss averaged over the levels."""
        if self.loss_type == "softmax":
            return multilabel_softmax_ce(logits, labels)
        return multilabel_bce(logits, labels)
