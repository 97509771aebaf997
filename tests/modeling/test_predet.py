"""The PreDet module end to end on tiny synthetic batches: keys, gradients, switches, degenerate
batches, a golden loss."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection.faster_rcnn import TwoMLPHead

from predet.config import LOSS_SWITCHES, PretrainConfig, load_config
from predet.errors import UserError
from predet.modeling.backbone import build_backbone
from predet.modeling.cls_head import ClsHead
from predet.modeling.croi_head import ContrastiveROIHead
from predet.modeling.crpn import ContrastiveRPN, JitterProposals
from predet.modeling.predet import (
    CLS_ONLY_OVERRIDES,
    CLS_ONLY_SWITCHES,
    LOSS_SWITCH,
    PreDet,
    build_predet,
    cls_only_config,
    loss_weight,
)
from predet.modeling.proposals import jitter_query_boxes
from predet.modeling.roi_align import MultiScaleRoIAlign

LOSSES = {"loss_cls", "loss_crpn_cls", "loss_crpn_reg", "loss_info", "loss_croi_reg"}
METRICS = {"lookup_top1", "crpn_recall", "valid_queries"}


def _total(out):
    return sum(v for k, v in out.items() if k.startswith("loss_"))


def _grad_norms(model):
    """Sum of |grad| per top-level part (backbone split into body and fpn)."""
    norms = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] == "backbone" else parts[0]
        g = 0.0 if p.grad is None else p.grad.abs().sum().item()
        norms[key] = norms.get(key, 0.0) + g
    return norms


def _finite(out, model):
    for k, v in out.items():
        assert torch.isfinite(v).all(), k
    for n, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), n


def test_keys_and_gradients_reach_every_part(tiny_cfg, make_batch):
    torch.manual_seed(0)
    model = build_predet(tiny_cfg(), num_classes=5)
    out = model(make_batch())
    assert set(out) == LOSSES | METRICS
    for k in METRICS:
        assert not out[k].requires_grad
    assert out["valid_queries"].item() == 4.0
    _total(out).backward()
    norms = _grad_norms(model)
    for part in ("backbone.body", "backbone.fpn", "cls_head", "box_head", "crpn", "croi_head"):
        assert norms[part] > 0, part
    # every CRPN and CROI parameter gets a gradient (no dead branch)
    for name, p in list(model.crpn.named_parameters()) + list(model.croi_head.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "off, absent, dead",
    [
        ("loss.info=false", {"loss_info"}, ["croi_head.embed"]),
        ("loss.croi_reg=false", {"loss_croi_reg"}, ["croi_head.query_reg", "croi_head.proposal_"]),
        ("loss.cls=false", {"loss_cls"}, ["cls_head"]),
    ],
)
def test_switched_off_loss_is_absent_and_sends_no_gradient(tiny_cfg, make_batch, off, absent, dead):
    torch.manual_seed(0)
    model = build_predet(tiny_cfg(off), num_classes=5)
    out = model(make_batch())
    assert not (absent & set(out)) and (LOSSES - absent) <= set(out)
    _total(out).backward()
    for name, p in model.named_parameters():
        if any(name.startswith(d) for d in dead):
            assert p.grad is None, name


def test_crpn_off_trains_croi_on_jittered_boxes(tiny_cfg, make_batch):
    torch.manual_seed(0)
    model = build_predet(tiny_cfg("loss.crpn=false"), num_classes=5)
    assert model.crpn is None
    out = model(make_batch())
    assert set(out) == {"loss_cls", "loss_info", "loss_croi_reg", "lookup_top1", "valid_queries"}
    _total(out).backward()
    _finite(out, model)


def test_cls_only_baseline_does_no_detection_work(tiny_cfg, make_batch):
    model = build_predet(cls_only_config(tiny_cfg()), num_classes=5)
    assert model.box_head is None and model.proposer is None and model.croi_head is None
    assert model.roi_pool is None and model.crpn is None and model.jitter is None
    out = model(make_batch())
    assert set(out) == {"loss_cls", "valid_queries"}
    # exactly the full model's classification term: same backbone + head init (built first), same batch
    torch.manual_seed(0)
    cls_only = build_predet(tiny_cfg(*CLS_ONLY_OVERRIDES), num_classes=5)
    torch.manual_seed(0)
    full = build_predet(tiny_cfg(), num_classes=5)
    batch = make_batch(seed=7)
    torch.testing.assert_close(cls_only(batch)["loss_cls"], full(batch)["loss_cls"])


def test_crpn_only(tiny_cfg, make_batch):
    torch.manual_seed(0)
    model = build_predet(tiny_cfg("loss.info=false", "loss.croi_reg=false"), num_classes=5)
    batch = make_batch(seed=7)
    torch.manual_seed(123)
    out = model(batch)
    crpn_keys = {"loss_crpn_cls", "loss_crpn_reg", "crpn_recall"}
    assert set(out) == {"loss_cls", "valid_queries"} | crpn_keys
    # the CRPN part of the full model, term for term (the CROI head is built and draws after it)
    for k in ("loss_cls", *sorted(crpn_keys)):
        assert math.isclose(out[k].item(), GOLDEN[k], rel_tol=1e-4, abs_tol=1e-6), (k, out[k].item())


def test_loss_weights(tiny_cfg, make_batch):
    outs = []
    for w in ("1.0", "2.5"):
        torch.manual_seed(0)
        model = build_predet(tiny_cfg(f"loss.cls_weight={w}", f"loss.crpn_weight={w}"), 5)
        torch.manual_seed(1)
        outs.append(model(make_batch()))
    for k in ("loss_cls", "loss_crpn_cls", "loss_crpn_reg"):
        torch.testing.assert_close(outs[1][k], 2.5 * outs[0][k])
    torch.testing.assert_close(outs[1]["loss_info"], outs[0]["loss_info"])


def test_each_loss_takes_the_weight_of_the_switch_that_owns_it(tiny_cfg):
    cfg = tiny_cfg("loss.cls_weight=2", "loss.crpn_weight=3", "loss.info_weight=5", "loss.croi_reg_weight=7")
    got = {k: loss_weight(cfg.loss, k) for k in LOSSES}
    assert got == {"loss_cls": 2, "loss_crpn_cls": 3, "loss_crpn_reg": 3, "loss_info": 5, "loss_croi_reg": 7}
    assert LOSS_SWITCHES == ("cls", "crpn", "info", "croi_reg")  # LossConfig's bool fields
    # the map names every loss the parts return, and every switch owns one
    assert set(LOSS_SWITCH) == LOSSES and set(LOSS_SWITCH.values()) == set(LOSS_SWITCHES)
    for key in ("loss_dummy", "loss_crpn_extra", "loss_cls_"):  # no prefix rule: named or refused
        with pytest.raises(ValueError, match=f"{key}: no loss switch owns it"):
            loss_weight(cfg.loss, key)


def test_the_cls_only_baseline_is_defined_once(tiny_cfg):
    """The overrides (demo, command line) and the config helper (bench) give the same switches:
    the classification loss alone."""
    assert CLS_ONLY_OVERRIDES == ("loss.cls=true", "loss.crpn=false", "loss.info=false", "loss.croi_reg=false")
    assert set(CLS_ONLY_SWITCHES) == set(LOSS_SWITCHES)
    full = tiny_cfg("loss.cls=false", "loss.info_weight=3")  # cls-only turns classification back on
    by_helper = cls_only_config(full)
    by_overrides = tiny_cfg("loss.cls=false", "loss.info_weight=3", *CLS_ONLY_OVERRIDES)
    assert by_helper == by_overrides and by_helper.loss.info_weight == 3
    assert [getattr(by_helper.loss, s) for s in LOSS_SWITCHES] == [True, False, False, False]
    assert full.loss.cls is False and full.loss.crpn is True  # a copy: the input is left as it was
    shipped = load_config(PretrainConfig, "configs/pretrain/tiny_cpu.yaml", list(CLS_ONLY_OVERRIDES))
    assert shipped == cls_only_config(load_config(PretrainConfig, "configs/pretrain/tiny_cpu.yaml"))


def _parts(cfg, num_classes=5):
    """PreDet's parts for ``cfg`` built by hand, in build_predet's order (backbone, cls head, box
    head, proposer, CROI head: the order in which they draw their initial weights)."""
    m, loss = cfg.model, cfg.loss
    backbone = build_backbone(m.backbone, norm=m.norm, fpn_channels=m.fpn_channels)
    cls_head = ClsHead(in_channels=32, num_classes=num_classes)
    roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=m.roi_sampling_ratio,
                                  canonical_scale=m.roi_canonical_scale)  # fmt: skip
    box_head = TwoMLPHead(32 * 7 * 7, m.box_head_dim)
    proposer = (ContrastiveRPN(in_channels=32, query_dim=m.box_head_dim, cfg=m.crpn) if loss.crpn
                else JitterProposals(boxes_per_query=m.jitter.boxes_per_query))  # fmt: skip
    croi_head = ContrastiveROIHead(in_dim=m.box_head_dim, cfg=m.croi, info=loss.info, reg=loss.croi_reg)
    return dict(backbone=backbone, cls_head=cls_head, roi_pool=roi_pool, box_head=box_head, proposer=proposer,
                croi_head=croi_head, loss=loss)  # fmt: skip


@pytest.mark.parametrize("crpn", ["true", "false"])
def test_parts_handed_in_make_the_model_build_predet_makes(tiny_cfg, make_batch, crpn):
    """Same seed, parts built by hand: the same parameters (names, order, values) and the same
    losses, bit for bit; the proposer sits under the name its checkpoint keys carry."""
    cfg = tiny_cfg(f"loss.crpn={crpn}")
    torch.manual_seed(0)
    built = build_predet(cfg, num_classes=5)
    torch.manual_seed(0)
    parts = _parts(cfg)
    by_hand = PreDet(**parts)
    assert by_hand.proposer is parts["proposer"] and by_hand.croi_head is parts["croi_head"]
    assert (by_hand.crpn is None) == (crpn == "false") and (by_hand.jitter is None) == (crpn == "true")
    assert list(built.state_dict()) == list(by_hand.state_dict())
    for (name, a), (_, b) in zip(built.state_dict().items(), by_hand.state_dict().items()):
        assert torch.equal(a, b), name
    tops = list(dict.fromkeys(k.split(".")[0] for k in built.state_dict()))
    assert tops == ["backbone", "cls_head", "box_head", *(["crpn"] if crpn == "true" else []), "croi_head"]
    batch = make_batch(seed=7)
    outs = []
    for model in (built, by_hand):
        torch.manual_seed(123)
        outs.append(model(batch))
    assert set(outs[0]) == set(outs[1])
    for k in outs[0]:
        assert torch.equal(outs[0][k], outs[1][k]), k


def test_parts_must_be_those_the_loss_switches_call_for(tiny_cfg):
    parts = _parts(tiny_cfg())
    cases = [
        (dict(croi_head=None), "croi_head missing"),
        (dict(proposer=JitterProposals(boxes_per_query=2)), "a ContrastiveRPN proposer missing"),
        (dict(box_head=None), "box_head missing"),
        (dict(roi_pool=None), "roi_pool missing"),
        (dict(loss=tiny_cfg("loss.crpn=false").loss), "a ContrastiveRPN proposer given, but only loss.crpn"),
        (dict(loss=tiny_cfg("loss.info=false", "loss.croi_reg=false").loss), "croi_head given, but only"),
        (dict(loss=tiny_cfg("loss.info=false").loss), r"croi_head's \(info, reg\) are not"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            PreDet(**{**parts, **change})
    cls_only = dict(parts, roi_pool=None, box_head=None, proposer=None, croi_head=None)
    with pytest.raises(ValueError, match="a proposer given, but only a detection loss"):
        PreDet(**{**cls_only, "proposer": JitterProposals(boxes_per_query=2),
                  "loss": cls_only_config(tiny_cfg()).loss})  # fmt: skip
    assert PreDet(**{**cls_only, "loss": cls_only_config(tiny_cfg()).loss}).proposer is None


@pytest.mark.parametrize("crpn", ["true", "false"])
def test_lookup_searches_as_forward_does(tiny_cfg, make_batch, crpn):
    """``lookup`` on either proposer: the proposer's proposals of the queries pooled on the other
    view (the jittered boxes from the same draw as the forward's), scored by the CROI head."""
    torch.manual_seed(0)
    model = build_predet(tiny_cfg(f"loss.crpn={crpn}"), num_classes=5).eval()
    batch = make_batch(seed=7)
    torch.manual_seed(9)
    out = model.lookup(batch)
    boxes = torch.cat([batch["boxes1"], batch["boxes2"]])
    assert torch.equal(out["boxes"], boxes) and out["mask"].shape == (4, 4) and out["mask"].all()
    with torch.no_grad():
        feats = model.backbone(torch.cat([batch["view1"], batch["view2"]]))
        b_q = model._box_features(feats, boxes, (64, 64)).roll(2, dims=0)  # view b searches for view b+N's
        if crpn == "true":
            want = model.crpn.propose(list(feats.values()), b_q, boxes, out["mask"], (64, 64))
        else:
            torch.manual_seed(9)
            want = jitter_query_boxes(boxes, out["mask"], num_per_query=4, image_size=(64, 64))
        sim = model.croi_head.similarity(b_q, model._box_features(feats, out["proposals"], (64, 64)))
    assert torch.equal(out["proposals"], want[0]) and torch.equal(out["valid"], want[1])
    P = 12 if crpn == "true" else 16  # post_nms_top_n, or 4 jittered boxes per query
    assert out["sim"].shape == (4, 4, P)  # the proposals only: no appended query box
    torch.testing.assert_close(out["sim"], sim, rtol=0, atol=0)
    with pytest.raises(ValueError, match="lookup needs the CROI head"):
        build_predet(tiny_cfg("loss.info=false", "loss.croi_reg=false"), 5).lookup(batch)


@pytest.mark.parametrize(
    "case", ["one_image_empty", "batch_empty", "one_query", "border", "tiny_input"]
)
def test_degenerate_batches(tiny_cfg, make_batch, case):
    torch.manual_seed(0)
    size = 64
    if case == "tiny_input":  # P5 and P6 are 1x1
        size = 32
    model = build_predet(tiny_cfg(f"model.input_size={size}"), num_classes=5)
    mask = torch.ones(2, 4, dtype=torch.bool)
    if case == "one_image_empty":
        mask[1] = False
    elif case == "batch_empty":
        mask[:] = False
    elif case == "one_query":
        mask[:] = False
        mask[0, 2] = True
    batch = make_batch(size=size, mask=mask)
    if case == "border":
        s = float(size)
        border = torch.tensor(
            [[0.0, 0, s, s], [0, 0, 5, s], [s - 3, s - 3, s, s], [0, s - 8, s, s]]
        )
        batch["boxes1"][:] = border
        batch["boxes2"][:] = border.flip(0)
    out = model(batch)
    if case == "batch_empty":
        assert set(out) == {"loss_cls", "valid_queries"} and out["valid_queries"].item() == 0
    else:
        assert LOSSES <= set(out)
        assert out["valid_queries"].item() == mask.sum().item() / 2
    _total(out).backward()
    _finite(out, model)
    if case == "one_query":  # one query in one direction each: lookup is 0 or 1 per direction
        assert out["lookup_top1"].item() in (0.0, 0.5, 1.0)


def test_golden_total_loss(tiny_cfg, make_batch):
    """Regression test: a fixed seed on a fixed batch gives these numbers (torch 2.x, CPU)."""
    torch.manual_seed(0)
    model = build_predet(tiny_cfg(), num_classes=5)
    batch = make_batch(seed=7)
    torch.manual_seed(123)  # the sampling inside forward
    out = model(batch)
    got = {k: v.item() for k, v in out.items()}
    for k, want in GOLDEN.items():
        assert math.isclose(got[k], want, rel_tol=1e-4, abs_tol=1e-6), (k, got)
    assert math.isclose(_total(out).item(), 5.179708, rel_tol=1e-4), got


GOLDEN = {
    "loss_cls": 1.620802,  # ~ log 5 with 1-2 labels: near-uniform logits at init
    "loss_crpn_cls": 0.693948,  # ~ log 2: CRPN scores start near 0
    "loss_crpn_reg": 0.034182,
    "loss_info": 2.830772,
    "loss_croi_reg": 0.000002,  # std-0.01 init, and most positives are the appended queries
    "lookup_top1": 0.125,
    "crpn_recall": 0.0,
    "valid_queries": 4.0,
}


def test_bad_model_config_is_user_error(tiny_cfg):
    """Value errors are raised by load_config (inside ``tiny_cfg``), before any model is built;
    the data-dependent num_classes check by ``build_predet``."""
    with pytest.raises(UserError, match="model.crpn.anchor_sizes"):
        build_predet(tiny_cfg("model.crpn.anchor_sizes=[8,16]"), num_classes=5)
    with pytest.raises(UserError, match="model.backbone: unknown backbone 'vgg16'"):
        build_predet(tiny_cfg("model.backbone=vgg16"), num_classes=5)
    with pytest.raises(UserError, match=r"model.crpn.fg_iou: must be in \(0, 1\], got 1.5"):
        build_predet(tiny_cfg("model.crpn.fg_iou=1.5"), num_classes=5)
    with pytest.raises(UserError, match="model.crpn.post_nms_top_n: must be positive, got 0"):
        build_predet(tiny_cfg("model.crpn.post_nms_top_n=0"), num_classes=5)
    with pytest.raises(UserError, match="model.num_classes: 7 given, but the data has 5 classes"):
        build_predet(tiny_cfg("model.num_classes=7"), num_classes=5)
    with pytest.raises(UserError, match="model.cls.loss"):
        build_predet(tiny_cfg("model.cls.loss=hinge"), num_classes=5)
    with pytest.raises(UserError, match="'model.crpn_dim' is now 'model.crpn.dim'"):
        tiny_cfg("model.crpn_dim=8")  # a key of the flat model section names its new place


def test_backbone_state_dict_names(tiny_cfg):
    model = build_predet(tiny_cfg(), num_classes=5)
    keys = model.backbone.state_dict().keys()
    assert {k.split(".")[0] for k in keys} == {"body", "fpn"}
    assert "fpn.inner_blocks.3.0.weight" in keys and "body.layer4.1.bn2.running_var" in keys
    assert set(dict(model.box_head.named_children())) == {"fc6", "fc7"}
    assert model.box_head.fc6.in_features == 32 * 7 * 7


def test_bf16_autocast_and_channels_last(tiny_cfg, make_batch):
    """The GPU recipe (bf16 autocast, channels_last), run on the CPU: same keys, finite, and
    the losses stay close to float32's."""
    torch.manual_seed(0)
    model = build_predet(tiny_cfg(), num_classes=5)
    batch = make_batch(seed=3)
    torch.manual_seed(5)
    ref = model(batch)
    model = model.to(memory_format=torch.channels_last)
    batch = dict(batch)
    for key in ("view1", "view2"):
        batch[key] = batch[key].contiguous(memory_format=torch.channels_last)
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    assert set(out) == set(ref)
    _total(out).backward()
    _finite(out, model)
    for k in ("loss_cls", "loss_crpn_cls", "loss_info"):
        assert out[k].dtype == torch.float32, k
        assert abs(out[k].item() - ref[k].item()) < 0.05 * abs(ref[k].item()) + 1e-3, k


def test_query_negatives_mode(tiny_cfg, make_batch):
    outs = {}
    for flag in ("false", "true"):
        torch.manual_seed(0)
        model = build_predet(tiny_cfg(f"model.croi.query_negatives={flag}"), num_classes=5)
        torch.manual_seed(1)
        outs[flag] = model(make_batch(q=4, seed=2))
    _total(outs["true"]).backward()
    _finite(outs["true"], model)
    # more negatives per query (the other queries' boxes): a larger InfoNCE at init
    assert outs["true"]["loss_info"].item() > outs["false"]["loss_info"].item()
    torch.testing.assert_close(outs["true"]["loss_cls"], outs["false"]["loss_cls"])


def test_host_flag_has_queries_replaces_the_device_check(tiny_cfg, make_batch):
    """``has_queries`` (set by the loop from the host copy of query_mask) gives the same losses
    as the device check, and is what the forward trusts: False leaves the detection terms out."""
    torch.manual_seed(0)
    model = build_predet(tiny_cfg(), num_classes=5)
    batch = make_batch(seed=7)
    torch.manual_seed(123)
    ref = model(batch)
    torch.manual_seed(123)
    flagged = model({**batch, "has_queries": True})
    assert set(flagged) == set(ref) and LOSSES <= set(ref)
    for k in ref:
        torch.testing.assert_close(flagged[k], ref[k], rtol=0, atol=0)
    out = model({**batch, "has_queries": False})
    assert set(out) == {"loss_cls", "valid_queries"}


def test_loop_inputs_carry_the_host_flag():
    from predet.engine.pretrain import _inputs

    batches = [{"query_mask": torch.zeros(2, 3, dtype=torch.bool), "num_skipped": 1},
               {"query_mask": torch.tensor([[False, True, False]]), "num_skipped": 0}]  # fmt: skip
    skipped = [0]
    got = [b for (b,) in _inputs(iter(batches), torch.device("cpu"), (), skipped)]
    assert [b["has_queries"] for b in got] == [False, True] and skipped == [1]
    assert all(isinstance(b["has_queries"], bool) for b in got)
