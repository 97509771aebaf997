"""CRPN: batched scores/regressions vs naive loops; anchor matching and sampling vs a box_iou
reference; regression targets through BoxCoder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_iou

from predet.config import CRPNConfig
from predet.modeling.crpn import (
    ContrastiveRPN,
    CRPNHead,
    JitterProposals,
    match_anchors,
    sample_anchors,
)
from predet.modeling.proposals import jitter_query_boxes

B, Q, C, A, D, E = 2, 3, 8, 3, 4, 16
SHAPES = [(5, 4), (3, 2), (1, 1)]  # three levels, the last one 1x1


@pytest.fixture
def head_and_inputs():
    torch.manual_seed(0)
    head = CRPNHead(in_channels=C, num_anchors=A, query_dim=E, embed_dim=D, conv_dim=6)
    for p in head.parameters():  # the 0.01-std init would make every number tiny
        torch.nn.init.normal_(p, std=0.3)
    feats = [torch.randn(B, C, h, w) for h, w in SHAPES]
    queries = torch.randn(B, Q, E)
    return head, feats, queries


def _naive(head, feats, queries):
    """Per view, per query, per level, per location, per anchor: the paper's dot products."""
    scores, deltas = [], []
    for b in range(B):
        sb, rb = [], []
        for q in range(Q):
            f_q = queries[b, q] / queries[b, q].pow(2).mean().sqrt()  # unit-RMS query feature
            q_cls = head.query_cls(f_q).view(A, D)
            q_reg = head.query_reg(f_q).view(A, 4, D)
            s_list, r_list = [], []
            for x in feats:
                h = torch.relu(head.conv(x[b : b + 1]))[0]  # [C, H, W]
                f_cls = head.cls_embed(h[None])[0]  # [A*D, H, W]
                f_reg = head.reg_embed(h[None])[0]  # [4*A*D, H, W]
                for y in range(h.shape[1]):
                    for xx in range(h.shape[2]):
                        for a in range(A):
                            v = f_cls[a * D : (a + 1) * D, y, xx]
                            s_list.append(torch.dot(q_cls[a], v))
                            r = f_reg[a * 4 * D : (a + 1) * 4 * D, y, xx].view(4, D)
                            r_list.append((q_reg[a] * r).sum(1))
            sb.append(torch.stack(s_list))
            rb.append(torch.stack(r_list))
        scores.append(torch.stack(sb))
        deltas.append(torch.stack(rb))
    return torch.stack(scores), torch.stack(deltas)  # [B, Q, T], [B, Q, T, 4]


def test_batched_scores_and_regressions_equal_naive_loop(head_and_inputs):
    head, feats, queries = head_and_inputs
    with torch.no_grad():
        scores, hidden = head(feats, queries)
        full = head.full_regression(feats, queries)
        ref_s, ref_r = _naive(head, feats, queries)
        T = sum(h * w * A for h, w in SHAPES)
        assert scores.shape == (B, Q, T) and full.shape == (B, Q, T, 4)
        torch.testing.assert_close(scores, ref_s, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(full, ref_r, atol=1e-5, rtol=1e-5)
        # the gathered form used in training == the full map, at every (view, anchor, query)
        view, query, anchor = torch.meshgrid(
            torch.arange(B), torch.arange(Q), torch.arange(T), indexing="ij"
        )
        q_reg = head.query_regression(queries)
        got = head.regression(hidden, q_reg, view.flatten(), anchor.flatten(), query.flatten())
        torch.testing.assert_close(got.view(B, Q, T, 4), ref_r, atol=1e-5, rtol=1e-5)


def _random_boxes(n, size, g):
    wh = 4 + torch.rand(n, 2, generator=g) * size / 2
    xy = torch.rand(n, 2, generator=g) * (size - wh)
    return torch.cat([xy, xy + wh], 1)


def _reference_match(anchors, boxes, mask, fg, bg):
    """Per-view loop on torchvision's box_iou: (labels, matched or -2 for 'any valid query')."""
    labels, matched = [], []
    for b in range(boxes.shape[0]):
        valid = mask[b].nonzero().squeeze(1).tolist()
        lab = torch.full((len(anchors),), -1, dtype=torch.long)
        mat = torch.full((len(anchors),), -2, dtype=torch.long)
        if valid:
            iou = box_iou(boxes[b, valid], anchors)  # [V, T]
            best, arg = iou.max(0)
            for t in range(len(anchors)):
                if best[t] > 0:
                    mat[t] = valid[arg[t]]
                lab[t] = 1 if best[t] > fg else (0 if best[t] < bg else -1)
            for v in range(len(valid)):  # Faster R-CNN: each query's best anchor(s) are positives
                if iou[v].max() > 0:
                    lab[iou[v] == iou[v].max()] = 1
        labels.append(lab)
        matched.append(mat)
    return torch.stack(labels), torch.stack(matched)


def test_matching_equals_box_iou_reference():
    g = torch.Generator().manual_seed(3)
    anchors = torch.cat([_random_boxes(300, 64, g), torch.tensor([[200.0, 200, 210, 210]])])
    boxes = torch.stack([_random_boxes(5, 64, g) for _ in range(4)])  # [4, 5, 4]
    boxes[0, 1] = boxes[0, 0]  # two identical queries: ties
    mask = torch.tensor(
        [[1, 1, 1, 0, 1], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool
    )
    boxes[1, 0] = torch.tensor([0.0, 0, 60, 60])  # a big box, masked out: must be ignored
    labels, matched = match_anchors(anchors, boxes, mask, fg_iou=0.7, bg_iou=0.3, generator=g)
    ref_labels, ref_matched = _reference_match(anchors, boxes, mask, 0.7, 0.3)
    assert torch.equal(labels, ref_labels)
    fixed = ref_matched >= 0
    # ties between identical queries may pick either: compare their IoUs, not their indices
    ious = torch.stack([box_iou(boxes[b], anchors) for b in range(4)])  # [4, 5, T]
    got_iou = ious.gather(1, matched.unsqueeze(1)).squeeze(1)
    ref_iou = ious.gather(1, ref_matched.clamp(min=0).unsqueeze(1)).squeeze(1)
    assert torch.equal(got_iou[fixed], ref_iou[fixed])
    # all-IoU-zero anchors (the far one, index 300) take a random *valid* query, are negatives
    for b in (0, 1, 3):
        zero = ~fixed[b]
        assert zero[300] and zero.sum() > 0
        assert mask[b, matched[b, zero]].all()
        assert (labels[b, zero] == 0).all()
    assert (labels[2] == -1).all()  # no valid query: nothing to learn in this view
    assert (labels == 1).sum() > 0 and (labels == 0).sum() > 0 and (labels == -1).sum() > 0


def test_best_anchor_rule_makes_low_iou_positive():
    anchors = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 80, 80]])
    boxes = torch.tensor([[[0.0, 0, 20, 20], [60.0, 60, 64, 64]]])  # IoUs 0.25 and 0.01
    labels, matched = match_anchors(
        anchors, boxes, torch.ones(1, 2, dtype=torch.bool), fg_iou=0.7, bg_iou=0.3
    )
    assert labels.tolist() == [[1, 0, 1]]
    assert matched[0, 0] == 0 and matched[0, 2] == 1


def test_sampling_counts_and_subsets():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(-1, 2, (5, 1000), generator=g)
    labels[1, :] = torch.where(labels[1] == 1, 0, labels[1])  # no positive
    labels[2, 5:] = -1  # almost nothing to sample
    labels[3, :] = 1  # positives only
    pos, neg = sample_anchors(labels, batch_per_view=256, positive_fraction=0.5, generator=g)
    for b in range(5):
        n_pos, n_neg = int((labels[b] == 1).sum()), int((labels[b] == 0).sum())
        want_pos = min(n_pos, 128)
        assert int(pos[b].sum()) == want_pos
        assert int(neg[b].sum()) == min(n_neg, 256 - want_pos)
    assert (labels[pos] == 1).all() and (labels[neg] == 0).all()
    assert not (pos & neg).any()
    pos2, _ = sample_anchors(labels, batch_per_view=256, positive_fraction=0.5, generator=g)
    assert not torch.equal(pos, pos2)  # random subsets


def test_regression_targets_round_trip_through_box_coder():
    g = torch.Generator().manual_seed(1)
    anchors, queries = _random_boxes(50, 96, g), _random_boxes(50, 96, g)
    coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    deltas = coder.encode_single(queries, anchors)
    torch.testing.assert_close(coder.decode_single(deltas, anchors), queries, atol=1e-4, rtol=0)


@pytest.mark.parametrize("padded", [False, True])
def test_crpn_losses_golden(head_and_inputs, padded):
    """The losses equal the pair-by-pair sums; with padded query slots (zero boxes, as the
    collate pads them) too, and their NaN-prone targets reach neither the loss nor the grads
    (the losses run over fixed slots, without nonzero(), issue 11)."""
    head, feats, queries = head_and_inputs
    queries = queries.detach().requires_grad_(True)
    scores, hidden = head(feats, queries)
    q_reg = head.query_regression(queries)
    T = scores.shape[2]
    g = torch.Generator().manual_seed(0)
    anchors = _random_boxes(T, 32, g)
    boxes = torch.stack([_random_boxes(Q, 32, g) for _ in range(B)])
    mask = torch.ones(B, Q, dtype=torch.bool)
    if padded:
        mask[0, -1] = False
        boxes[0, -1] = 0.0
    labels, matched = match_anchors(anchors, boxes, mask, fg_iou=0.5, bg_iou=0.3, generator=g)
    pos, neg = sample_anchors(labels, batch_per_view=16, positive_fraction=0.5, generator=g)
    coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    rpn = _rpn()
    rpn.head = head
    losses = rpn.losses(scores, hidden, q_reg, anchors, boxes, matched, pos, neg)
    assert set(losses) == {"loss_crpn_cls", "loss_crpn_reg"}
    loss_cls, loss_reg = losses["loss_crpn_cls"], losses["loss_crpn_reg"]
    # the same numbers written out pair by pair
    n = int((pos | neg).sum())
    bce, reg = 0.0, 0.0
    full = head.full_regression(feats, queries)
    for b, t in (pos | neg).nonzero().tolist():
        q = int(matched[b, t])
        y = float(pos[b, t])
        bce += F.binary_cross_entropy_with_logits(scores[b, q, t], torch.tensor(y))
        if y:
            target = coder.encode_single(boxes[b, q][None], anchors[t][None])[0]
            reg += F.smooth_l1_loss(full[b, q, t], target, beta=1 / 9, reduction="sum")
    torch.testing.assert_close(loss_cls, bce / n, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_reg, reg / n, atol=1e-5, rtol=1e-5)
    assert int(pos.sum()) > 0
    (loss_cls + loss_reg).backward()
    assert torch.isfinite(queries.grad).all()


def _rpn(**cfg) -> ContrastiveRPN:
    """A ContrastiveRPN of the fixture's sizes (3 levels)."""
    c = CRPNConfig(anchor_sizes=[4, 8, 16], aspect_ratios=[0.5, 1.0, 2.0], dim=D, conv_dim=6, **cfg)
    return ContrastiveRPN(in_channels=C, query_dim=E, cfg=c)


def test_contrastive_rpn_forward(head_and_inputs):
    """One call: proposals per view from the module's own head, anchors and coder; its losses;
    crpn_recall; nothing for a view without valid queries."""
    head, feats, queries = head_and_inputs
    rpn = _rpn(batch_per_view=16, pre_nms_top_n=5, post_nms_top_n=7, fg_iou=0.5)
    rpn.head = head
    g = torch.Generator().manual_seed(4)
    boxes = torch.stack([_random_boxes(Q, 16, g) for _ in range(B)])  # [B, Q, 4]
    mask = torch.tensor([[True, True, False], [False, False, False]])
    torch.manual_seed(0)
    props, valid, losses, metrics = rpn(feats, queries, boxes, mask, (20, 16))
    assert props.shape == (B, 7, 4) and valid.shape == (B, 7) and not props.requires_grad
    assert valid[0].any() and not valid[1].any()
    assert set(losses) == {"loss_crpn_cls", "loss_crpn_reg"} and set(metrics) == {"crpn_recall"}
    assert all(torch.isfinite(v) and v.requires_grad for v in losses.values())
    assert 0.0 <= metrics["crpn_recall"].item() <= 1.0
    # the proposals are the selection over the full regression map (CRPNHead.full_regression)
    with torch.no_grad():
        scores, hidden = head(feats, queries)
        anchors, per_level = rpn.anchors(feats, (20, 16))
        assert anchors.shape[0] == sum(h * w * A for h, w in SHAPES) and len(per_level) == 3
        q_reg = head.query_regression(queries)
        again = rpn.select_proposals(scores, hidden, q_reg, mask, anchors, per_level, (20, 16))
    torch.testing.assert_close(again[0], props)
    assert torch.equal(again[1], valid)
    assert rpn.anchors(feats, (20, 16))[0] is anchors  # cached
    # propose(): the same proposals without the query boxes (predet analyze lookup)
    proposed = rpn.propose(feats, queries, torch.full_like(boxes, float("nan")), mask, (20, 16))
    assert torch.equal(proposed[0], props) and torch.equal(proposed[1], valid)  # boxes unread
    # crpn_recall is the recall of those proposals: each valid query's best IoU > 0.5, by hand
    iou = box_iou(boxes[0][mask[0]], props[0][valid[0]])  # view 1 has no valid query
    want = (iou.max(dim=1).values > 0.5).float().mean()
    torch.testing.assert_close(metrics["crpn_recall"], want)
    # the losses are those of the module's matching and sampling (same RNG draw), not of others
    with torch.no_grad():
        torch.manual_seed(0)  # the forward's draws, in its order: matching, then sampling
        labels, matched = match_anchors(anchors, boxes, mask, fg_iou=0.5, bg_iou=rpn.cfg.bg_iou)
        pos, neg = sample_anchors(labels, batch_per_view=16, positive_fraction=rpn.cfg.positive_fraction)
        ref = rpn.losses(scores, hidden, q_reg, anchors, boxes, matched, pos, neg)
    for k in ref:
        torch.testing.assert_close(losses[k].detach(), ref[k])


def test_jitter_proposals_has_the_crpn_interface():
    g = torch.Generator().manual_seed(0)
    boxes = torch.stack([_random_boxes(Q, 32, g) for _ in range(B)])
    mask = torch.tensor([[True, False, True], [False, False, False]])
    torch.manual_seed(3)
    props, valid, losses, metrics = JitterProposals(boxes_per_query=5)(
        [], torch.zeros(B, Q, E), boxes, mask, (32, 32)
    )
    torch.manual_seed(3)
    ref, ref_valid = jitter_query_boxes(boxes, mask, num_per_query=5, image_size=(32, 32))
    assert props.shape == (B, Q * 5, 4) and losses == {} and metrics == {}
    assert torch.equal(props, ref) and torch.equal(valid, ref_valid)
    assert int(valid.sum()) == 10 and not valid[1].any()
    # propose(): the same boxes from the same draw, as ContrastiveRPN.propose (PreDet.lookup)
    torch.manual_seed(3)
    proposed = JitterProposals(boxes_per_query=5).propose([], torch.zeros(B, Q, E), boxes, mask, (32, 32))
    assert torch.equal(proposed[0], ref) and torch.equal(proposed[1], ref_valid)


@pytest.mark.parametrize("side", [96, 100, 128])
def test_anchor_cells_sit_at_the_fpn_strides(side):
    """Level l's anchors are centred every 4 * 2**l pixels, where its feature cells are (P6 is P5
    subsampled by 2: at 96 px its 2 cells are at 0 and 64, not torchvision's inferred 96 // 2 = 48);
    where the side is a multiple of 64 they equal torchvision's AnchorGenerator."""
    c = CRPNConfig(anchor_sizes=[8, 16, 32, 64, 128], aspect_ratios=[0.5, 1.0, 2.0], dim=D, conv_dim=6)
    rpn = ContrastiveRPN(in_channels=C, query_dim=E, cfg=c)
    shapes = [-(-side // 4)]  # P2; P3..P5 by ResNet's stride-2 convs, P6 = max_pool(k=1, s=2) of P5
    for _ in range(4):
        shapes.append(-(-shapes[-1] // 2))
    feats = [torch.zeros(1, 1, s, s) for s in shapes]
    anchors, per_level = rpn.anchors(feats, (side, side))
    for lvl, chunk in enumerate(anchors.split(per_level)):
        centres = ((chunk[:, 0] + chunk[:, 2]) / 2).unique()
        stride = 4 * 2**lvl
        assert centres.tolist() == pytest.approx([stride * i for i in range(shapes[lvl])]), (lvl, centres)
    if side % 64 == 0:
        from torchvision.models.detection.image_list import ImageList

        image = ImageList(torch.zeros(1, 3, side, side), [(side, side)])
        torch.testing.assert_close(anchors, rpn.anchor_generator(image, feats)[0])
