"""CROI head: InfoNCE vs the paper's formula, candidate assignment, similarity and regression."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_iou

from predet.config import CROIConfig
from predet.modeling.croi_head import ContrastiveROIHead, append_queries, assign_candidates
from predet.modeling.losses import info_nce, multilabel_softmax_ce


def test_info_nce_equals_paper_formula_with_masked_negatives():
    g = torch.Generator().manual_seed(0)
    B, Q, P, tau = 3, 4, 9, 0.07
    sim = torch.rand(B, Q, P, generator=g) * 2 - 1
    pos = torch.randint(0, P, (B, Q), generator=g)
    neg = torch.rand(B, P, generator=g) < 0.5
    valid = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 1, 1]], dtype=torch.bool)
    got = info_nce(sim, pos, neg.unsqueeze(1).expand(B, Q, P), valid, tau)
    terms = []
    for b in range(B):
        for q in range(Q):
            if not valid[b, q]:
                continue
            e_pos = math.exp(sim[b, q, pos[b, q]].item() / tau)
            e_neg = sum(math.exp(sim[b, q, p].item() / tau) for p in range(P) if neg[b, p])
            terms.append(-math.log(e_pos / (e_pos + e_neg)))
    assert abs(got.item() - sum(terms) / len(terms)) < 1e-4
    # no negative at all: the loss is 0 (log 1), no NaN
    zero = info_nce(sim, pos, torch.zeros(B, Q, P, dtype=torch.bool), valid, tau)
    assert zero.item() == 0.0


def test_assign_candidates():
    g = torch.Generator().manual_seed(0)
    queries = torch.tensor([[[10.0, 10, 30, 30], [40, 40, 60, 60], [0, 0, 0, 0]]])  # [1, 3, 4]
    mask = torch.tensor([[True, True, False]])
    proposals = torch.tensor(
        [[[11.0, 11, 31, 31], [9, 9, 29, 29], [41, 41, 59, 61], [0, 30, 20, 60], [50, 0, 64, 20],
          [12, 12, 28, 28], [0, 0, 0, 0]]]
    )  # fmt: skip
    prop_valid = torch.tensor([[True] * 6 + [False]])
    cands = torch.cat([proposals, queries], 1)  # queries appended: P = 7 + 3
    cvalid = torch.cat([prop_valid, mask], 1)
    picks = []
    for _ in range(40):
        iou, pos, neg = assign_candidates(
            cands, cvalid, queries, mask, fg_iou=0.5, num_negatives=5, generator=g
        )
        picks.append(pos[0, :2].tolist())
        ref = box_iou(queries[0], cands[0])
        ref[2] = 0
        ref[:, ~cvalid[0]] = 0
        torch.testing.assert_close(iou[0], ref)
        for q in (0, 1):  # a positive has IoU > 0.5 with its query
            assert iou[0, q, pos[0, q]] > 0.5
        for q in range(3):  # P_neg: IoU < 0.5 with both valid queries, the same for all
            assert neg[0, q].nonzero().flatten().tolist() == [3, 4]
    firsts = {p[0] for p in picks}
    assert firsts == {0, 1, 5, 7}  # every IoU>0.5 candidate of query 0 is drawn, its own box too
    # a degenerate query box: only its appended self can be its positive, and always is
    queries2 = torch.tensor([[[5.0, 5, 5, 9]]])
    c2 = torch.cat([torch.tensor([[[5.0, 5, 9, 9]]]), queries2], 1)
    _, pos2, neg2 = assign_candidates(
        c2, torch.ones(1, 2, dtype=torch.bool), queries2, torch.ones(1, 1, dtype=torch.bool),
        fg_iou=0.5, num_negatives=5,
    )  # fmt: skip
    assert pos2.tolist() == [[1]] and neg2.tolist() == [[[True, False]]]


def test_negatives_are_capped_at_random():
    g = torch.Generator().manual_seed(0)
    queries = torch.tensor([[[0.0, 0, 4, 4]]])
    far = torch.tensor([50.0, 50, 60, 60]).repeat(1, 30, 1)
    cands = torch.cat([far, queries], 1)
    _, _, neg = assign_candidates(
        cands, torch.ones(1, 31, dtype=torch.bool), queries, torch.ones(1, 1, dtype=torch.bool),
        fg_iou=0.5, num_negatives=12, generator=g,
    )  # fmt: skip
    assert int(neg.sum()) == 12 and not neg[0, 0, 30]


def test_similarity_and_regression_formulas():
    torch.manual_seed(0)
    head = ContrastiveROIHead(in_dim=10, cfg=CROIConfig(embed_dim=6, reg_dim=3))
    b_q, b_p = torch.randn(2, 4, 10), torch.randn(2, 5, 10)
    sim = head.similarity(b_q, b_p)
    ref = F.cosine_similarity(head.embed(b_q)[:, :, None], head.embed(b_p)[:, None], dim=-1)
    torch.testing.assert_close(sim, ref, atol=1e-6, rtol=1e-5)
    d = head.regression(b_q[0], b_p[0, :4])
    def unit(x):
        return x / x.norm(dim=-1, keepdim=True)

    rq = head.query_reg(unit(b_q[0])).view(4, 4, 3)
    rp = head.proposal_reg(unit(b_p[0, :4]))
    torch.testing.assert_close(d, torch.einsum("mkd,md->mk", rq, rp))
    # regression targets of the ROI box coder round-trip, and a query's own box has target 0
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    q = torch.tensor([[10.0, 12, 30, 40]])
    p = torch.tensor([[8.0, 15, 33, 38]])
    torch.testing.assert_close(coder.decode_single(coder.encode_single(q, p), p), q)
    assert coder.encode_single(q, q).abs().max() < 1e-6


def test_multilabel_softmax_ce():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]]])  # [L=1, B=2, K=3]
    labels = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # second image: no label
    lse = math.log(math.exp(2) + 1 + math.exp(-1))
    want = 0.5 * (lse - 2) + 0.5 * (lse - 0)
    assert abs(multilabel_softmax_ce(logits, labels).item() - want) < 1e-6


def test_query_negatives_include_other_queries_boxes():
    queries = torch.tensor([[[10.0, 10, 30, 30], [40, 40, 60, 60], [0, 0, 0, 0]]])
    mask = torch.tensor([[True, True, False]])
    proposals = torch.tensor([[[11.0, 11, 31, 31], [41, 41, 59, 61], [0, 30, 20, 60]]])
    cands = torch.cat([proposals, queries], 1)  # 3 proposals, then the 3 query slots
    cvalid = torch.cat([torch.ones(1, 3, dtype=torch.bool), mask], 1)
    _, pos, neg = assign_candidates(
        cands, cvalid, queries, mask, fg_iou=0.5, num_negatives=10, query_negatives=True
    )
    assert neg[0, 0].nonzero().flatten().tolist() == [1, 2, 4]  # q1's proposal and box, far one
    assert neg[0, 1].nonzero().flatten().tolist() == [0, 2, 3]
    assert not neg[0, 2].any()  # an invalid query has nothing
    _, _, capped = assign_candidates(
        cands, cvalid, queries, mask, fg_iou=0.5, num_negatives=2, query_negatives=True
    )
    assert capped[0, :2].sum(1).tolist() == [2, 2] and not (capped & ~neg).any()


def test_croi_regression_loss_sums_over_valid_queries_only():
    """loss_croi_reg written out query by query (the head computes every slot and masks the
    invalid ones, issue 11): an invalid query with a zero box adds nothing, not even a NaN."""
    torch.manual_seed(0)
    head = ContrastiveROIHead(in_dim=10, cfg=CROIConfig(embed_dim=6, reg_dim=3, num_negatives=8))
    B, Q, P0 = 2, 3, 5
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(B, Q, 2, generator=g) * 20
    queries = torch.cat([xy, xy + 5 + torch.rand(B, Q, 2, generator=g) * 10], dim=2)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    queries[~mask] = 0.0  # padded slots hold zero boxes, as the collate pads them
    xy = torch.rand(B, P0, 2, generator=g) * 20
    props = torch.cat([xy, xy + 5 + torch.rand(B, P0, 2, generator=g) * 10], dim=2)
    candidates = torch.cat([props, queries], dim=1)  # [B, P0 + Q, 4], queries appended
    cand_valid = torch.cat([torch.ones(B, P0, dtype=torch.bool), mask], dim=1)
    b_q = torch.randn(B, Q, 10, requires_grad=True)
    b_p = torch.randn(B, P0 + Q, 10, requires_grad=True)
    torch.manual_seed(3)  # assign_candidates draws its positives from the global RNG
    losses, _ = head(query_features=b_q, query_boxes=queries, query_mask=mask, query_box_features=b_p[:, P0:],
                     proposals=props, proposal_valid=cand_valid[:, :P0], proposal_features=b_p[:, :P0])  # fmt: skip
    torch.manual_seed(3)
    _, pos_index, _ = assign_candidates(candidates, cand_valid, queries, mask, fg_iou=head.cfg.fg_iou,
                                        num_negatives=head.cfg.num_negatives,
                                        query_negatives=head.cfg.query_negatives)  # fmt: skip
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    ref = 0.0
    for b, q in mask.nonzero().tolist():
        p = int(pos_index[b, q])
        d = head.regression(b_q[b, q][None], b_p[b, p][None])[0]
        t = coder.encode_single(queries[b, q][None], candidates[b, p][None])[0]
        ref = ref + F.smooth_l1_loss(d, t, beta=1 / 9, reduction="sum")
    torch.testing.assert_close(losses["loss_croi_reg"], ref / int(mask.sum()), atol=1e-6, rtol=1e-5)
    losses["loss_croi_reg"].backward()
    assert torch.isfinite(b_q.grad).all() and torch.isfinite(b_p.grad).all()
    assert b_q.grad[~mask].abs().max() == 0  # invalid queries get no gradient from the regression


def test_a_valid_zero_area_query_adds_no_regression_loss_and_no_nan():
    """A zero-width query (valid: the data filters them, a direct caller may not) has no log-size
    target: its slot counts 0, the other query's loss is unchanged, every gradient stays finite
    (before: log 0/0 made loss_croi_reg and every gradient NaN)."""
    torch.manual_seed(0)
    head = ContrastiveROIHead(in_dim=8, cfg=CROIConfig())
    good = torch.tensor([[[5.0, 5.0, 25.0, 25.0]]])
    flat = torch.tensor([[[10.0, 10.0, 10.0, 30.0], [5.0, 5.0, 25.0, 25.0]]])  # query 0: zero width
    props, pv = torch.tensor([[[50.0, 50.0, 60.0, 60.0]]]), torch.tensor([[True]])
    b_q = torch.randn(1, 2, 8, requires_grad=True)
    b_p = torch.randn(1, 3, 8)
    m2 = torch.tensor([[True, True]])
    torch.manual_seed(1)
    losses, _ = head(query_features=b_q, query_boxes=flat, query_mask=m2, query_box_features=b_p[:, 1:],
                     proposals=props, proposal_valid=pv, proposal_features=b_p[:, :1])  # fmt: skip
    assert torch.isfinite(losses["loss_croi_reg"])
    losses["loss_croi_reg"].backward()
    assert torch.isfinite(b_q.grad).all() and b_q.grad[0, 0].abs().max() == 0
    # the good query alone (same features for it and its own box), normalised by 1 instead of 2
    torch.manual_seed(1)
    alone, _ = head(query_features=b_q[:, 1:].detach(), query_boxes=good, query_mask=torch.tensor([[True]]),
                    query_box_features=b_p[:, 2:], proposals=props, proposal_valid=pv,
                    proposal_features=b_p[:, :1])  # fmt: skip
    torch.testing.assert_close(losses["loss_croi_reg"].detach() * 2, alone["loss_croi_reg"], atol=1e-6, rtol=1e-5)


def test_the_head_appends_the_query_boxes_and_counts_them_in_lookup_top1():
    """With no valid proposal a valid query's only candidate is its own box, which the head
    appends after the proposals (candidate P + q): InfoNCE has no negative (0) and training's
    lookup_top1 counts the find (1.0), where ``analyze lookup`` (proposals only) would find none."""
    torch.manual_seed(0)
    head = ContrastiveROIHead(in_dim=8, cfg=CROIConfig())
    queries = torch.tensor([[[5.0, 5, 25, 25], [0, 0, 0, 0]]])  # one valid query, one padded slot
    mask = torch.tensor([[True, False]])
    props = torch.tensor([[[6.0, 6, 24, 24], [40, 40, 60, 60], [0, 0, 30, 30]]])
    f_q, f_own, f_p = torch.randn(1, 2, 8), torch.randn(1, 2, 8), torch.randn(1, 3, 8)
    losses, metrics = head(query_features=f_q, query_boxes=queries, query_mask=mask, query_box_features=f_own,
                           proposals=props, proposal_valid=torch.zeros(1, 3, dtype=torch.bool),
                           proposal_features=f_p)  # fmt: skip
    assert losses["loss_info"].item() == 0.0 and metrics["lookup_top1"].item() == 1.0
    # the layout append_queries makes: the proposals, then the query slots
    cands, valid, feats = append_queries(props, torch.ones(1, 3, dtype=torch.bool), f_p, queries, mask, f_own)
    assert torch.equal(cands, torch.cat([props, queries], 1)) and valid.tolist() == [[True] * 4 + [False]]
    assert torch.equal(feats[:, 3:], f_own) and torch.equal(feats[:, :3], f_p)
    _, pos, _ = assign_candidates(cands, valid, queries, mask, fg_iou=0.5, num_negatives=8)
    assert pos[0, 0].item() in (0, 3)  # the proposal of IoU 0.81, or its own appended box
