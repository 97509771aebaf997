"""Learnability: on one fixed batch of coloured rectangles on noise, 100 SGD steps take the
query-box lookup from chance to >= 0.9."""

from __future__ import annotations

import pytest
import torch

from predet.modeling.predet import build_predet


def rectangles_batch(n: int = 4, q: int = 4, size: int = 64, seed: int = 0) -> dict:
    """Each image: q rectangles of random colours on noise; the queries are the rectangles.

    View 2 is the mirror image of view 1 with fresh noise, so a query must be found by its
    appearance, not by its position.
    """
    g = torch.Generator().manual_seed(seed)
    views, boxes = ([], []), ([], [])
    for _ in range(n):
        wh = (0.2 + 0.3 * torch.rand(q, 2, generator=g)) * size
        xy = torch.rand(q, 2, generator=g) * (size - wh)
        b = torch.cat([xy, xy + wh], 1).round()
        colours = torch.rand(q, 3, generator=g) * 4 - 2
        for v in range(2):
            img = torch.randn(3, size, size, generator=g) * 0.5
            for j in range(q):
                x1, y1, x2, y2 = b[j].int().tolist()
                patch = torch.randn(3, y2 - y1, x2 - x1, generator=g) * 0.3
                img[:, y1:y2, x1:x2] = colours[j, :, None, None] + patch
            bv = b.clone()
            if v == 1:
                img = img.flip(2)
                bv[:, [0, 2]] = size - b[:, [2, 0]]
            views[v].append(img)
            boxes[v].append(bv)
    return {
        "view1": torch.stack(views[0]),
        "view2": torch.stack(views[1]),
        "boxes1": torch.stack(boxes[0]),
        "boxes2": torch.stack(boxes[1]),
        "query_mask": torch.ones(n, q, dtype=torch.bool),
        "labels": torch.ones(n, 5),
    }


@pytest.mark.slow
def test_lookup_is_learned_on_a_fixed_batch(tiny_cfg):
    torch.manual_seed(0)
    model = build_predet(tiny_cfg(), num_classes=5)
    batch = rectangles_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    history = []
    for _ in range(100):
        out = model(batch)
        loss = sum(v for k, v in out.items() if k.startswith("loss_"))
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({k: v.item() for k, v in out.items()})
    with torch.no_grad():
        final = model(batch)
    # 4 queries + 12 proposals per view, of which ~1-3 overlap a given query: chance ~ 0.1-0.2
    assert history[0]["lookup_top1"] <= 0.3
    assert final["lookup_top1"].item() >= 0.9
    assert final["crpn_recall"].item() >= 0.7  # the CRPN learns to propose the queries too
    assert final["loss_info"].item() < 0.25 * history[0]["loss_info"]
