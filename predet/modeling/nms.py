"""Exact greedy NMS for many groups in one batched pass (issue 11).

``torchvision.ops.nms`` resolves one set of boxes per call, and its CUDA kernel finishes with a
serial one-thread-block pass (``gather_keep_from_mask``) and a ``masked_select`` (a host sync):
proposal selection called it for every chunk of (view, level) groups. ``grouped_nms`` takes all
groups at once as ``[G, K]`` tensors:

1. sort each group by score, descending, with a *stable* sort (ties keep their input order), as
   both torchvision kernels do (checked against torchvision 0.29's CPU and CUDA sources; older
   CUDA builds sorted with an unstable sort, so tied scores could be ordered differently there);
2. the suppression matrix ``S[g, i, j] = IoU(i, j) > t`` for ``i < j`` in that order, with
   torchvision's IoU formula term by term (``inter / (area_i + area_j - inter)``), in chunks of
   groups so that the ``[g, K, K]`` float temporaries stay bounded;
3. the greedy result as the fixed point of ``keep = valid & ~any_i(keep_i & S[i, :])`` (the
   Cluster-NMS iteration): greedy NMS satisfies that equation and is its only solution (the
   equation decides box j from boxes i < j alone), and starting from ``keep = valid`` the
   iterate is right at position n after n steps, so it converges in at most K - 1 steps, in
   practice in a handful. Steps run in rounds (4, 8, 16, ... steps) with one host sync per
   round to test convergence, not one per step.

The threshold is compared as torchvision does: the CPU kernel compares the IoU (in the boxes'
dtype) with the threshold as a double; the CUDA kernel with the threshold rounded to float.
On CPU the IoU is the same IEEE expression evaluated the same way, so the result is identical
bit for bit. nvcc may fuse the CUDA kernel's multiply-adds (FMA), so on CUDA a pair whose IoU is
within a rounding error of the threshold can be decided differently by the two (either answer is
a correct rounding of the same formula); small integer coordinates (exact products) agree.

Cost: ``G * K^2`` for the IoU block and for each step, where torchvision's CPU kernel tests
only the pairs whose first box is kept: all groups in a few launches and no serial pass, which
is what a GPU wants; on a CPU it is slower for large K. Boxes must be finite, XYXY, float32 or
float64.
"""

from __future__ import annotations

import math

import torch
import torchvision
from torch import Tensor

__all__ = ["grouped_nms", "nms_threshold", "DEFAULT_MAX_ELEMENTS"]

# elements of one [g, K, K] float temporary while building the suppression matrix (256 MB)
DEFAULT_MAX_ELEMENTS = 1 << 26


# on CPU, groups this large run torchvision's kernel one by one (measured: K=1000, G=640 takes
# 2.9 s that way against 23 s for the matrix rounds; K=48 is 4x faster as a matrix)
CPU_LOOP_MIN_K = 256


def nms_threshold(iou_threshold: float, dtype: torch.dtype, device: torch.device) -> float:
    """The Python float ``t`` for which ``iou > t`` evaluated by PyTorch on ``dtype`` tensors
    decides as torchvision's nms kernel on ``device`` does.

    PyTorch compares a float32 tensor with a Python float in float32 (the scalar rounded to
    nearest). torchvision's CPU kernel compares the float32 IoU with the threshold as a double,
    so where rounding moved the threshold up, ``t`` is the float32 just below it; its CUDA kernel
    rounds the threshold to float (as PyTorch does) and, for float64 boxes, compares the double
    IoU with that rounded value.
    """
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"grouped_nms: boxes must be float32 or float64, got {dtype}")
    rounded = float(torch.tensor(iou_threshold, dtype=torch.float32))
    if device.type == "cuda" or (dtype == torch.float32 and rounded <= iou_threshold):
        return rounded
    if dtype == torch.float64:
        return iou_threshold
    return float(torch.nextafter(torch.tensor(rounded), torch.tensor(-math.inf)))  # float32


@torch.no_grad()
def grouped_nms(
    boxes: Tensor,
    scores: Tensor,
    valid: Tensor,
    iou_threshold: float,
    max_keep: int | None = None,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    first_round: int = 4,
    method: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Greedy NMS inside each of G groups, all groups at once.

    Args:
        boxes: ``[G, K, 4]`` XYXY (float32 or float64, finite).
        scores: ``[G, K]``. valid: ``[G, K]`` bool; invalid entries are not part of their group
            (padding, filtered boxes): they are never kept and never suppress.
        iou_threshold: a box is suppressed by a kept, higher-ranked box of its group with
            IoU > ``iou_threshold``.
        max_keep: keep at most this many per group (the first ones in score order); None: K.
        max_elements: bound on one ``[g, K, K]`` float temporary (chunks of g groups); the
            suppression matrix of all groups (``G * K^2`` half floats on CUDA, floats on CPU)
            stays allocated while the greedy result is resolved.
        first_round: iterations before the first convergence test (later rounds double).
        method: ``matrix`` (the batched pass above), ``loop`` (torchvision's kernel group by
            group) or ``auto``: ``loop`` for CPU tensors with ``K >= CPU_LOOP_MIN_K`` (there the
            ``O(K^2)`` matrix rounds cost more than the serial kernel), else ``matrix``. Both give
            the same result.
    Returns:
        ``index [G, M]`` (int64, -1 where unused) and ``kept [G, M]`` bool, M = min(max_keep, K):
        row g lists what ``torchvision.ops.nms(boxes[g][valid[g]], scores[g][valid[g]], t)``
        keeps, as indices into the K slots of group g, in the same order (score descending,
        ties in slot order), then -1 padding.
    """
    if boxes.dim() != 3 or boxes.shape[2] != 4 or boxes.shape[:2] != scores.shape:
        raise ValueError(
            f"grouped_nms: boxes [G, K, 4] and scores [G, K] expected, got "
            f"{tuple(boxes.shape)} and {tuple(scores.shape)}"
        )
    if valid.shape != scores.shape or valid.dtype != torch.bool:
        raise ValueError(
            f"grouped_nms: valid must be a bool [G, K], got {valid.dtype} {tuple(valid.shape)}"
        )
    if method not in ("auto", "matrix", "loop"):
        raise ValueError(f"grouped_nms: method must be auto, matrix or loop, got {method!r}")
    G, K = scores.shape
    M = K if max_keep is None else max(0, min(max_keep, K))
    thresh = nms_threshold(iou_threshold, boxes.dtype, boxes.device)
    index = torch.full((G, M), -1, dtype=torch.long, device=boxes.device)
    if G == 0 or M == 0:
        return index, index >= 0
    if method == "loop" or (method == "auto" and not boxes.is_cuda and K >= CPU_LOOP_MIN_K):
        for g in range(G):  # torchvision's kernel: the reference semantics, by definition
            slots = valid[g].nonzero().squeeze(1)
            kept = torchvision.ops.nms(boxes[g, slots], scores[g, slots], iou_threshold)[:M]
            index[g, : len(kept)] = slots[kept]
        return index, index >= 0
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # [G, K]
    sorted_boxes = boxes.gather(1, order.unsqueeze(2).expand(G, K, 4))
    sorted_valid = valid.gather(1, order)
    # matmul dtype of the 0/1 suppression matrix: exact for 0/1 entries, and a sum of 0/1
    # products is > 0 exactly when one product is 1, in any precision
    mm_dtype = torch.float16 if boxes.is_cuda else torch.float32
    upper = torch.ones(K, K, dtype=torch.bool, device=boxes.device).triu_(1)  # i < j
    per_chunk = max(1, max_elements // (K * K))
    chunks = [
        _suppression(sorted_boxes[s : s + per_chunk], thresh, upper, mm_dtype)
        for s in range(0, G, per_chunk)
    ]
    keep = _greedy(chunks, sorted_valid, first_round)  # [G, K] in score order
    rank = keep.cumsum(1) - 1  # [G, K] position among the kept of the group
    col = torch.where(keep & (rank < M), rank, M)  # slot M collects the rest, then is dropped
    out = torch.full((G, M + 1), -1, dtype=torch.long, device=boxes.device)
    out.scatter_(1, col, torch.where(col < M, order, -1))
    index = out[:, :M]
    return index, index >= 0


def _suppression(boxes: Tensor, thresh: float, upper: Tensor, dtype: torch.dtype) -> Tensor:
    """``[g, K, 4]`` boxes in score order -> ``S [g, K, K]`` (``dtype`` 0/1): IoU(i, j) > thresh
    and i < j. Each operation is the one of torchvision's CPU kernel, in its order."""
    x1, y1, x2, y2 = boxes.unbind(2)  # [g, K] each
    area = (x2 - x1) * (y2 - y1)
    w = torch.minimum(x2[:, :, None], x2[:, None, :])
    w = w.sub_(torch.maximum(x1[:, :, None], x1[:, None, :])).clamp_(min=0)  # [g, K, K]
    h = torch.minimum(y2[:, :, None], y2[:, None, :])
    h = h.sub_(torch.maximum(y1[:, :, None], y1[:, None, :])).clamp_(min=0)
    inter = w.mul_(h)
    del h
    union = (area[:, :, None] + area[:, None, :]).sub_(inter)  # (area_i + area_j) - inter
    over = inter.div_(union).gt_(thresh)  # 0/1 in the boxes' dtype; 0/0 (NaN) -> 0
    del union
    return over.mul_(upper).to(dtype)


def _greedy(chunks: list[Tensor], valid: Tensor, first_round: int) -> Tensor:
    """The fixed point of ``keep = valid & ~any_i(keep_i & S[i, :])``, ``valid [G, K]`` in score
    order, S split into chunks of groups. Exact after K - 1 steps at the latest; stops earlier
    when a step changes nothing (tested once per round of steps)."""
    K = valid.shape[1]
    keep, steps, round_len = valid, 0, max(1, first_round)
    while steps < K - 1:
        for _ in range(min(round_len, K - 1 - steps)):
            prev, keep, start = keep, [], 0
            for s in chunks:
                g = s.shape[0]
                hit = torch.bmm(prev[start : start + g].to(s.dtype).unsqueeze(1), s)  # [g, 1, K]
                keep.append(valid[start : start + g] & (hit.squeeze(1) == 0))
                start += g
            keep = torch.cat(keep) if len(keep) > 1 else keep[0]
            steps += 1
        if torch.equal(keep, prev):  # one host sync per round: a fixed point is the answer
            break
        round_len *= 2
    return keep
