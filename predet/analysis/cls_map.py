"""Held-out multi-label classification mAP (``cls_map`` / ``cls_map_true`` in ``metrics.jsonl``).

The classification head of a pre-training run is scored on a fixed held-out slice of the manifest
that training never sees: per class, the average precision of the head's scores against the image
tags (``cls_map``) and, when the world ships ``truth.jsonl``, against the true labels
(``cls_map_true``); the mean is taken over the classes with at least one positive image. A
classifier that knows nothing scores a little above the classes' label frequency
(:func:`chance_map`, exact for a random ranking).

AP is the non-interpolated average precision of the ranked list (scikit-learn's
``average_precision_score``): ``sum_k P@k * rel_k / #positives``; tied scores are ranked as one
block whose precision is the block's final precision, so the number does not depend on the order
of tied images.

Shape legend:
    N: images, K: classes.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

__all__ = [
    "average_precision",
    "mean_average_precision",
    "chance_map",
    "ClsEvaluator",
]


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """AP of one class: ``scores [N]`` (higher = more confident), ``labels [N]`` (0/1).

    Returns ``nan`` when there is no positive, or when a score is not finite (a diverged head
    must not rank its NaNs into a plausible number).
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1) > 0
    npos = int(labels.sum())
    if npos == 0 or not np.isfinite(scores).all():
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    # the last index of each block of equal scores: ties count as one threshold
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp = np.cumsum(y)[last].astype(np.float64)  # true positives at each threshold
    seen = (last + 1).astype(np.float64)  # images at or above each threshold
    recall_gain = np.diff(np.r_[0.0, tp]) / npos
    return float(np.sum(recall_gain * tp / seen))


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes of :func:`average_precision`; ``scores``, ``labels`` ``[N, K]``.

    Classes without a positive image are left out; ``nan`` when no class has one or when a
    score is not finite.
    """
    scores, labels = np.asarray(scores), np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must both be [N, K]")
    if not np.isfinite(scores).all():
        return float("nan")
    aps = [average_precision(scores[:, k], labels[:, k]) for k in range(labels.shape[1])]
    aps = [a for a in aps if not np.isnan(a)]
    return float(np.mean(aps)) if aps else float("nan")


def chance_map(labels: np.ndarray) -> float:
    """Expected mAP of random scores (a uniformly random ranking), over the classes with a positive.

    For a class with n positives among N images, E[AP] = (H_N + (n - 1) / (N - 1) * (N - H_N)) / N
    with H_N = 1 + 1/2 + ... + 1/N: above the label frequency n / N when n is small (one positive
    in 10 images: 0.293, not 0.1), tending to it as n grows.
    """
    labels = np.asarray(labels) > 0
    N = labels.shape[0]
    npos = labels.sum(axis=0)
    npos = npos[npos > 0].astype(np.float64)
    if not npos.size:
        return float("nan")
    h = float(np.sum(1.0 / np.arange(1, N + 1)))
    slope = (npos - 1) / (N - 1) if N > 1 else np.zeros_like(npos)
    return float(np.mean((h + slope * (N - h)) / N))


class ClsEvaluator:
    """Scores a PreDet model's classification head on held-out images (``cls_map``,
    ``cls_map_true``).

    Each image is resized whole to ``input_size`` x ``input_size`` (no crop: every tagged object
    stays in view), normalised like the training views, and scored by the head: the softmax (or
    sigmoid, for ``bce``) of the logits, averaged over the FPN levels. The images are decoded once
    and kept as a uint8 tensor ``[H, 3, S, S]``.

    Args:
        paths: the held-out images.
        tags: multi-hot labels from the tags ``[H, K]``.
        truth: multi-hot true labels ``[H, K]`` or ``None``.
        input_size: S.
    """

    def __init__(
        self,
        paths: Sequence[str],
        tags: np.ndarray,
        truth: Optional[np.ndarray],
        *,
        input_size: int,
        batch_size: int = 64,
    ) -> None:
        from predet.data.images import BadImage, load_image

        keep, arrays = [], []
        for i, p in enumerate(paths):
            try:
                img, _ = load_image(p, draft_short_side=input_size)
            except BadImage:
                continue  # counted as skipped: the metric is over the readable images
            img = img.resize((input_size, input_size), resample=2)  # bilinear
            arrays.append(np.asarray(img, dtype=np.uint8))
            keep.append(i)
        self.skipped = len(paths) - len(keep)
        self.tags = np.asarray(tags)[keep]
        self.truth = None if truth is None else np.asarray(truth)[keep]
        self.images = (
            np.stack(arrays).transpose(0, 3, 1, 2) if arrays else np.zeros((0, 3, input_size, input_size), np.uint8)
        )
        self.batch_size = batch_size

    def __len__(self) -> int:
        return len(self.images)

    @torch.no_grad()
    def scores(self, model: Any) -> np.ndarray:
        """``[H, K]`` class scores of ``model`` (a :class:`~predet.modeling.predet.PreDet`, or a
        wrapper with ``.module``); the model's train/eval mode is restored."""
        from predet.data.transforms import IMAGENET_MEAN, IMAGENET_STD

        net = getattr(model, "module", model)
        device = next(net.parameters()).device
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
        was_training = net.training
        net.eval()
        out = []
        try:
            for i in range(0, len(self.images), self.batch_size):
                x = torch.from_numpy(self.images[i : i + self.batch_size]).to(device).float()
                logits = net.cls_head(net.backbone((x - mean) / std)).float()  # [L, b, K]
                if net.cls_head.loss_type == "bce":
                    probs = logits.sigmoid()
                else:
                    probs = logits.softmax(dim=-1)
                out.append(probs.mean(dim=0).cpu().numpy())
        finally:
            net.train(was_training)
        k = self.tags.shape[1]
        return np.concatenate(out) if out else np.zeros((0, k), np.float32)

    def __call__(self, model: Any) -> dict[str, float]:
        """``{"cls_map": ..., "cls_map_true": ...}`` (the latter only with true labels)."""
        s = self.scores(model)
        out = {"cls_map": mean_average_precision(s, self.tags)}
        if self.truth is not None:
            out["cls_map_true"] = mean_average_precision(s, self.truth)
        return out
