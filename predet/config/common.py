"""What the pre-training and fine-tuning configs share: the ``ckpt`` section, and the rules of the
``train`` keys both have (SGD, gradient accumulation, the collective timeout)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from predet.config import rules
from predet.errors import UserError


@dataclass
class CkptConfig:
    every: int = 1000
    keep_last: int = 0  # 0 keeps every periodic checkpoint

    def check(self) -> None:
        rules.positive("ckpt", self, ("every",))
        if self.keep_last < 0:
            raise UserError(
                "ckpt.keep_last: must be >= 0 (0 keeps every periodic checkpoint), "
                f"got {self.keep_last}"
            )


def check_sgd(t: Any) -> None:
    """``train.*`` of SGD shared by both configs: lr / base_lr / base_batch > 0, momentum in
    [0, 1), weight decay >= 0, warm-up factor in (0, 1]."""
    rules.positive("train", t, ("lr", "base_lr", "base_batch"))
    if not 0 <= t.momentum < 1:
        raise UserError(f"train.momentum: must be in [0, 1), got {t.momentum}")
    rules.non_negative("train", t, ("weight_decay",))
    rules.fraction("train", t, ("warmup_factor",))


def check_distributed(t: Any) -> None:
    """``train.accum_steps`` >= 1 and ``train.dist_timeout_s`` > 0, shared by both configs."""
    if t.accum_steps < 1:
        raise UserError(f"train.accum_steps: must be >= 1, got {t.accum_steps}")
    rules.positive("train", t, ("dist_timeout_s",))
