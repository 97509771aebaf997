"""``predet export``: a pre-trained backbone + FPN in torchvision or detectron2 format (DESIGN §4).

- ``torchvision``: a plain state dict with ``body.*`` / ``fpn.*`` keys, which loads with
  ``strict=True`` into ``.backbone`` of torchvision's ``maskrcnn_resnet50_fpn(weights=None,
  weights_backbone=None)`` (same depth/width as the run's ``model.backbone``). ``fine-tune --init``
  takes this file.
- ``detectron2``: a ``.pkl`` with ``{"model": {name: numpy}, "__author__": "predet",
  "matching_heuristics": True}`` and detectron2's names (``backbone.bottom_up.stem.*``,
  ``backbone.bottom_up.res{2..5}.*``, ``backbone.fpn_lateral{2..5}.*``,
  ``backbone.fpn_output{2..5}.*``).
  torchvision's ResNet strides in the 3x3 conv and takes RGB input normalised with ImageNet's
  mean/std, so use it with ``MODEL.RESNETS.STRIDE_IN_1X1=False``, ``INPUT.FORMAT=RGB``,
  ``MODEL.PIXEL_MEAN=[123.675,116.28,103.53]``, ``MODEL.PIXEL_STD=[58.395,57.12,57.375]``
  (and ``NUM_GROUPS``/``WIDTH_PER_GROUP`` for ResNeXt).

With ``box_head=True`` the box-head MLP is exported too: torchvision's ``TwoMLPHead`` names
``fc6.*``/``fc7.*`` in a sibling file ``<out stem>_box_head<suffix>`` (loads with ``strict=True``
into ``model.roi_heads.box_head``, keeping the backbone file loadable on its own), detectron2's
``roi_heads.box_head.fc1/fc2`` inside the same ``.pkl``.
"""

from __future__ import annotations

import argparse
import io
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from predet.errors import UserError
from predet.utils import atomic_write_bytes, load_checkpoint

__all__ = ["run", "export_backbone", "extract_backbone", "extract_box_head", "to_detectron2"]

FORMATS = ("torchvision", "detectron2")

# torchvision name (under body./fpn./fc6/fc7) -> detectron2 name; first match wins
_D2_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^body\.conv1\.weight$"), r"backbone.bottom_up.stem.conv1.weight"),
    (re.compile(r"^body\.bn1\.(\w+)$"), r"backbone.bottom_up.stem.conv1.norm.\1"),
    (re.compile(r"^body\.layer(\d)\.(\d+)\.conv(\d)\.weight$"), r"RES\1.\2.conv\3.weight"),
    (re.compile(r"^body\.layer(\d)\.(\d+)\.bn(\d)\.(\w+)$"), r"RES\1.\2.conv\3.norm.\4"),
    (re.compile(r"^body\.layer(\d)\.(\d+)\.downsample\.0\.weight$"), r"RES\1.\2.shortcut.weight"),
    (re.compile(r"^body\.layer(\d)\.(\d+)\.downsample\.1\.(\w+)$"), r"RES\1.\2.shortcut.norm.\3"),
    (re.compile(r"^fpn\.inner_blocks\.(\d)\.0\.(\w+)$"), r"LATERAL\1.\2"),
    (re.compile(r"^fpn\.layer_blocks\.(\d)\.0\.(\w+)$"), r"OUTPUT\1.\2"),
    (re.compile(r"^fc6\.(\w+)$"), r"roi_heads.box_head.fc1.\1"),
    (re.compile(r"^fc7\.(\w+)$"), r"roi_heads.box_head.fc2.\1"),
]


def run(args: argparse.Namespace) -> int:
    src = Path(args.run) / "checkpoints" / "last.pt" if args.run else Path(args.ckpt)
    written = export_backbone(src, args.format, args.out, box_head=args.box_head)
    for path in written:
        print(path)
    return 0


def _model_state(ckpt_or_state: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The model state dict (``module.`` prefixes removed) and a name for messages."""
    if isinstance(ckpt_or_state, (str, Path)):
        name = str(ckpt_or_state)
        obj = load_checkpoint(ckpt_or_state)
    else:
        name, obj = "state dict", ckpt_or_state
    if not isinstance(obj, Mapping):
        raise UserError(f"{name}: expected a checkpoint or state dict, got {type(obj).__name__}")
    state = obj["model"] if isinstance(obj.get("model"), Mapping) else obj
    return {k.removeprefix("module."): v for k, v in state.items()}, name


def extract_backbone(state: Mapping[str, Any], name: str = "state dict") -> dict[str, torch.Tensor]:
    """``backbone.body.*``/``backbone.fpn.*`` (a PreDet model) or ``body.*``/``fpn.*`` -> ``body.*``,
    ``fpn.*`` (torchvision ``BackboneWithFPN`` names).

    A BatchNorm entry without ``num_batches_tracked`` (a model trained with frozen BN) gets a
    zero counter, so the file also loads strictly into torchvision's ``BatchNorm2d`` backbone.
    """
    prefix = "backbone." if any(k.startswith("backbone.body.") for k in state) else ""
    out = {
        k[len(prefix) :]: v.detach().clone().contiguous()
        for k, v in state.items()
        if k.startswith(f"{prefix}body.") or k.startswith(f"{prefix}fpn.")
    }
    if "body.conv1.weight" not in out or not any(k.startswith("fpn.") for k in out):
        raise UserError(f"{name}: no backbone + FPN weights (keys backbone.body.*, backbone.fpn.*)")
    for key in [k for k in out if k.endswith(".running_mean")]:
        counter = key.removesuffix("running_mean") + "num_batches_tracked"
        out.setdefault(counter, torch.tensor(0, dtype=torch.long))
    return out


def extract_box_head(state: Mapping[str, Any], name: str = "state dict") -> dict[str, torch.Tensor]:
    """``box_head.fc6.*``/``box_head.fc7.*`` -> ``fc6.*``/``fc7.*`` (torchvision ``TwoMLPHead``)."""
    out = {
        k.removeprefix("box_head."): v.detach().clone().contiguous()
        for k, v in state.items()
        if k.startswith("box_head.fc6.") or k.startswith("box_head.fc7.")
    }
    if len(out) != 4:
        raise UserError(
            f"{name}: no box head (box_head.fc6/fc7); it exists only when the CROI losses are on"
        )
    return out


def _d2_name(key: str) -> str:
    for pattern, template in _D2_RULES:
        if pattern.match(key):
            name = pattern.sub(template, key)
            # torchvision layer1..4 = detectron2 res2..5; FPN block i sits on res(i+2)
            name = re.sub(r"^RES(\d)", lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}", name)
            name = re.sub(r"^LATERAL(\d)", lambda m: f"backbone.fpn_lateral{int(m[1]) + 2}", name)
            return re.sub(r"^OUTPUT(\d)", lambda m: f"backbone.fpn_output{int(m[1]) + 2}", name)
    raise UserError(f"no detectron2 name for weight '{key}'")


def to_detectron2(tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """torchvision names -> detectron2's checkpoint dict (numpy values; BN counters dropped)."""
    model = {
        _d2_name(k): v.detach().cpu().float().numpy() if v.is_floating_point() else v.cpu().numpy()
        for k, v in tensors.items()
        if not k.endswith("num_batches_tracked")
    }
    return {"model": model, "__author__": "predet", "matching_heuristics": True}


def _save_torch(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def export_backbone(
    ckpt_or_state: str | Path | Mapping[str, Any],
    fmt: str,
    out: str | Path,
    box_head: bool = False,
) -> list[Path]:
    """Export a PreDet checkpoint (path, checkpoint dict or model state dict) to ``out``.

    Args:
        ckpt_or_state: a training checkpoint (``{"model": ...}``), a PreDet model state dict, or
            a torchvision backbone state dict.
        fmt: ``torchvision`` or ``detectron2``.
        out: the file to write.
        box_head: also export the box-head MLP (see the module docstring).
    Returns:
        The files written.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}' (choose from {', '.join(FORMATS)})")
    state, name = _model_state(ckpt_or_state)
    backbone = extract_backbone(state, name)
    head = extract_box_head(state, name) if box_head else {}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "detectron2":
        atomic_write_bytes(out, pickle.dumps(to_detectron2({**backbone, **head})))
        return [out]
    _save_torch(backbone, out)
    if not head:
        return [out]
    head_path = out.with_name(f"{out.stem}_box_head{out.suffix}")
    _save_torch(head, head_path)
    return [out, head_path]
