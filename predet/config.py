"""Typed configs: defaults <- YAML file <- ``key=value`` overrides (OmegaConf structured configs).

Every run writes its fully resolved config to ``RUN/config.yaml``. An unknown key, or a value of the
wrong type, is a :class:`~predet.errors.UserError` naming the key (and the closest valid key).

Example::

    cfg = load_config(PretrainConfig, "configs/pretrain/tiny_cpu.yaml", ["train.steps=50"])
    cfg.train.steps  # 50
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, TypeVar

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from predet.errors import UserError

__all__ = [
    "PretrainConfig",
    "FinetuneConfig",
    "load_config",
    "save_config",
    "to_dict",
    "MISSING",
]

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Pre-training schema (DESIGN §2, §6)
# --------------------------------------------------------------------------------------------
@dataclass
class AugConfig:
    """MoCo-v2 two-view augmentations; each one switchable."""

    crop: bool = True
    crop_scale: List[float] = field(default_factory=lambda: [0.2, 1.0])
    crop_ratio: List[float] = field(default_factory=lambda: [0.75, 1.3333])
    flip_p: float = 0.5
    color_jitter: bool = True
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: List[float] = field(default_factory=lambda: [0.1, 2.0])
    min_visible: float = 0.5  # a query is valid if >= this fraction of its area is in both views
    # each: each view clips a query box to its own crop (DESIGN, the paper's "q in view-1's
    # coordinate system"; the views may hold different parts of it); common: the part both hold
    query_region: str = "each"


@dataclass
class PretrainDataConfig:
    manifest: str = ""  # JSONL manifest (DESIGN §4); "" only when `shards` is given
    synonyms: Optional[str] = None  # tag -> class map; default: synonyms.json beside the manifest
    queries: Optional[str] = None  # query cache dir from `predet data queries`
    shards: Optional[str] = None  # WebDataset shard pattern, e.g. "out/shard-{000000..000009}.tar"
    format: str = "manifest"  # manifest | shards | coco (a COCO JSON used as weak labels)
    images: Optional[str] = None  # image root for format=coco
    min_images: int = 1  # classes with fewer images are dropped (as `predet data vocab`)
    num_workers: int = 2
    queries_per_image: int = 16  # Q
    # a fixed slice of the manifest never trained on; the classification head is scored on it
    # (cls_map, and cls_map_true when truth.jsonl is beside the manifest). 0: none
    heldout: int = 256
    # use a fixed sample of this many manifest entries (a function of the manifest's length alone,
    # like the held-out slice); None: all of them. E.g. a run that sees fewer images than the
    # manifest holds needs query boxes for the sample only (`predet demo --world`)
    max_images: Optional[int] = None
    aug: AugConfig = field(default_factory=AugConfig)


@dataclass
class ClsConfig:
    """The classification head (``ClsHead``)."""

    loss: str = "softmax"  # softmax (multi-label softmax CE) | bce


@dataclass
class CRPNConfig:
    """The contrastive RPN (``ContrastiveRPN``): anchors, widths, matching, sampling, proposals."""

    anchor_sizes: List[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])  # P2..P6
    aspect_ratios: List[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    dim: int = 64  # D
    conv_dim: Optional[int] = None  # the shared 3x3 conv's width; None: C (as Faster R-CNN's RPN)
    batch_per_view: int = 256  # anchors sampled per view
    positive_fraction: float = 0.5
    fg_iou: float = 0.7
    bg_iou: float = 0.3
    pre_nms_top_n: int = 1000  # K, per level
    post_nms_top_n: int = 256  # K_nms, per view
    nms_thresh: float = 0.7


@dataclass
class JitterConfig:
    """CRPN off (paper Table 1): ``JitterProposals``, boxes jittered around each query."""

    boxes_per_query: int = 16


@dataclass
class CROIConfig:
    """The contrastive ROI head (``ContrastiveROIHead``)."""

    embed_dim: int = 256
    reg_dim: int = 64  # D'
    num_negatives: int = 512
    tau: float = 0.07
    fg_iou: float = 0.5
    query_negatives: bool = False  # True: q's negatives = all candidates with IoU < 0.5 to q


@dataclass
class PretrainModelConfig:
    """``model.*``: the trunk (backbone, FPN, box head) here, each head in its own section."""

    backbone: str = "resnet50"  # one of predet.modeling.backbone.BACKBONES
    norm: str = "bn"  # bn | syncbn | gn | frozenbn
    input_size: int = 480
    fpn_channels: int = 256  # C
    num_classes: Optional[int] = None  # taken from the data's vocabulary when None
    box_head_dim: int = 1024  # TwoMLPHead, shared by the CRPN's queries and the CROI head
    roi_sampling_ratio: int = 2  # RoIAlign sampling points per bin side (torchvision: 2)
    # box side pooled from P4 (FPN paper eq. 1: level = floor(4 + log2(sqrt(wh) / this))); 224 is
    # for ~800-px images: scaled with the input, boxes spread over P2-P5 as they would there (at the
    # CPU configs' 64-128 px, P2 for every box measured as good or better: see small_cpu.yaml)
    roi_canonical_scale: int = 224
    cls: ClsConfig = field(default_factory=ClsConfig)
    crpn: CRPNConfig = field(default_factory=CRPNConfig)
    jitter: JitterConfig = field(default_factory=JitterConfig)
    croi: CROIConfig = field(default_factory=CROIConfig)


@dataclass
class LossConfig:
    cls: bool = True
    crpn: bool = True
    info: bool = True
    croi_reg: bool = True
    cls_weight: float = 1.0
    crpn_weight: float = 1.0
    info_weight: float = 1.0
    croi_reg_weight: float = 1.0


# the on/off switches: a loss is a bool field here plus a float <switch>_weight
LOSS_SWITCHES = tuple(f.name for f in fields(LossConfig) if f.type in (bool, "bool"))


@dataclass
class PretrainTrainConfig:
    steps: int = 1000
    batch_size: int = 8  # images per process per step; each gives two views
    lr: Optional[float] = None  # None: base_lr * global_batch / base_batch (linear scaling)
    base_lr: float = 0.2
    base_batch: int = 1024
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    warmup_factor: float = 0.001  # lr multiplier at step 0, rising linearly to 1 at warmup_steps
    decay_steps: int = 4  # lr x0.1 at `decay_steps` uniform points of the schedule
    # lr x0.1 after each of these steps instead of decay_steps' uniform points ([]: no decay)
    lr_steps: Optional[List[int]] = None
    lr_schedule: str = "step"  # step (x0.1 at lr_steps / decay_steps) | cosine (to 0 at `steps`)
    clip_grad: Optional[float] = None
    amp: bool = True  # autocast on CUDA (ignored on CPU)
    amp_dtype: str = "bfloat16"  # bfloat16 | float16 (float16 uses a GradScaler; pre-Ampere GPUs)
    channels_last: bool = True  # on CUDA
    log_every: int = 10
    eval_every: Optional[int] = None  # cls_map on the held-out slice every N steps; None: ckpt.every
    device: str = "auto"  # auto | cpu | cuda
    stop_at: Optional[int] = None  # stop (with a checkpoint) after this step; schedule keeps `steps`
    find_unused_parameters: Optional[bool] = None  # DDP; None: True when a loss is switched off
    # gradient accumulation: micro-batches of `batch_size` per optimizer step (the step's batch is
    # batch_size * accum_steps images per process; lr scaling counts them all)
    accum_steps: int = 1
    # seconds a torch.distributed collective may wait for the other ranks before it fails
    # (init_process_group's timeout): a rank that died or hangs ends the run instead of stalling it
    dist_timeout_s: float = 600


@dataclass
class CkptConfig:
    every: int = 1000
    keep_last: int = 0  # 0 keeps every periodic checkpoint


@dataclass
class PretrainConfig:
    seed: int = 0
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: PretrainTrainConfig = field(default_factory=PretrainTrainConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)


# --------------------------------------------------------------------------------------------
# Fine-tuning schema (DESIGN §6)
# --------------------------------------------------------------------------------------------
@dataclass
class SplitConfig:
    ann: str = ""
    images: str = ""


@dataclass
class FinetuneDataConfig:
    format: str = "coco"  # coco | lvis | voc
    train: SplitConfig = field(default_factory=SplitConfig)
    val: SplitConfig = field(default_factory=SplitConfig)
    subset: Optional[int] = None  # number of training images, drawn with `subset_seed`
    # None: the run's `seed` (each seed its own subset); an int: one subset for every seed and
    # init, so that seeds vary only the order, augmentation and head init
    subset_seed: Optional[int] = None
    # evaluate on at most this many val images: one fixed draw (not the run's seed), so every
    # seed and init is scored on the same images; None: all
    val_subset: Optional[int] = None
    num_workers: int = 2
    classes: Optional[List[str]] = None  # VOC: class names in label order (default: VOC's 20, else sorted)
    eval_batch_size: int = 2  # images per inference batch


@dataclass
class FinetuneModelConfig:
    arch: str = "mask_rcnn"  # mask_rcnn | faster_rcnn | retinanet
    backbone: str = "resnet50"
    norm: str = "frozenbn"  # frozenbn | bn | syncbn | gn
    trainable_layers: int = 5
    num_classes: Optional[int] = None  # from the data when None (background excluded)
    train_sizes: List[int] = field(default_factory=lambda: [640, 672, 704, 736, 768, 800])
    test_size: int = 800
    max_size: int = 1333
    mask_head_lr_mult: float = 4.0
    detections_per_img: int = 100
    score_thresh: float = 0.05
    anchor_sizes: Optional[List[int]] = None  # one per FPN level; None: torchvision's 32..512
    proposals_train: int = 2000  # RPN proposals kept per image (pre- and post-NMS), training
    proposals_test: int = 1000  # same, inference
    roi_batch_size_per_image: int = 512  # RoIs sampled per image for the box head
    mask_head_dim: int = 256  # channels of the mask head's 4 convs (torchvision: 256)
    roi_canonical_scale: int = 224  # box side pooled from P4 (see PretrainModelConfig)
    fpn_channels: Optional[int] = None  # None: the --init file's FPN width (256 for scratch / a ResNet)
    box_head_dim: Optional[int] = None  # None: the init's box head (<init stem>_box_head file) or 1024


@dataclass
class FinetuneTrainConfig:
    schedule: str = "1x"  # 1x, 2x, 3x, 6x, 9x ...
    steps: Optional[int] = None  # overrides the schedule
    iters_per_x: Optional[int] = None  # iterations of a 1x schedule; None: COCO's 90k scaled to data
    lr_steps: Optional[List[int]] = None  # lr x0.1 at these steps; None: at 2/3 and 8/9 of the run
    num_threads: Optional[int] = None  # torch CPU threads (None: torch's default); 1 is fastest on a busy CPU
    batch_size: int = 16  # images per process per step
    lr: Optional[float] = None  # None: base_lr * global batch / base_batch (linear scaling, with warm-up)
    base_lr: float = 0.02  # lr at base_batch images per step (detectron2's 0.02 at 16, Goyal et al.)
    base_batch: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 1000
    warmup_factor: float = 0.001
    flip_p: float = 0.5
    clip_grad: Optional[float] = None
    amp: bool = True
    channels_last: bool = False
    log_every: int = 20
    device: str = "auto"
    # gradient accumulation: micro-batches of `batch_size` per optimizer step (the step's batch is
    # batch_size * accum_steps images per process; lr scaling counts them all)
    accum_steps: int = 1
    # seconds a torch.distributed collective may wait for the other ranks before it fails
    # (init_process_group's timeout): a rank that died or hangs ends the run instead of stalling it
    dist_timeout_s: float = 600


@dataclass
class FinetuneConfig:
    seed: int = 0
    name: Optional[str] = None  # row name in `predet compare`; None: 'scratch' or the init file's stem
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def _valid_keys(schema: Any, prefix: str = "") -> list[str]:
    """All dotted keys of a dataclass schema, e.g. ``["seed", "data", "data.manifest", ...]``."""
    keys = []
    for f in fields(schema):
        name = f"{prefix}{f.name}"
        keys.append(name)
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            if is_dataclass(default):
                keys.extend(_valid_keys(default, name + "."))
    return keys


def _closest(key: str, valid: Sequence[str]) -> str:
    """The valid key most like ``key``: the better of the whole key against every key and its leaf
    name against every nested leaf (`lr` under the wrong section; `tau` with no section at all)."""
    leaf = key.rsplit(".", 1)[-1]
    leaves = {k.rsplit(".", 1)[-1]: k for k in valid if "." in k}
    candidates = []  # (similarity, suggestion); on a tie the whole-key match
    m = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    if m:
        candidates.append((difflib.SequenceMatcher(None, key, m[0]).ratio(), m[0]))
    m = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
    if m:
        candidates.append((difflib.SequenceMatcher(None, leaf, m[0]).ratio(), leaves[m[0]]))
    if not candidates:
        return ""
    return f" (did you mean '{max(candidates, key=lambda c: c[0])[1]}'?)"


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            name = f"{prefix}{k}"
            if isinstance(v, dict) and v:
                out.update(_flatten(v, name + "."))
            else:
                out[name] = v
    return out


# keys of earlier versions: the error names the new key
RENAMED = {
    **{f"model.{k}": f"model.crpn.{k}" for k in (
        "anchor_sizes", "aspect_ratios", "pre_nms_top_n", "post_nms_top_n", "nms_thresh")},
    **{f"model.crpn_{k}": f"model.crpn.{k}" for k in (
        "dim", "conv_dim", "batch_per_view", "positive_fraction", "fg_iou", "bg_iou")},
    **{f"model.croi_{k}": f"model.croi.{k}" for k in (
        "embed_dim", "reg_dim", "fg_iou", "query_negatives")},
    "model.num_negatives": "model.croi.num_negatives",
    "model.tau": "model.croi.tau",
    "model.cls_loss": "model.cls.loss",
    "model.jitter_boxes_per_query": "model.jitter.boxes_per_query",
}  # fmt: skip


def _check_keys(given: dict[str, Any], valid: Sequence[str], source: str) -> None:
    valid_set = set(valid)
    sections = {k.rsplit(".", 1)[0] for k in valid if "." in k}
    for key, value in given.items():
        if key in RENAMED and RENAMED[key] in valid_set:
            raise UserError(f"{source}: config key '{key}' is now '{RENAMED[key]}'")
        if key not in valid_set:
            # a dict given for a leaf, or a leaf below a leaf, is an unknown key
            raise UserError(f"{source}: unknown config key '{key}'{_closest(key, valid)}")
        if key in sections and not isinstance(value, dict):
            raise UserError(
                f"{source}: config key '{key}' is a section: expected a mapping of its keys, "
                f"got {value!r}"
            )


def _check_kind(schema: type, given: dict[str, Any], valid: Sequence[str], path: Path) -> None:
    """A fine-tuning config given where a pre-training one is expected (or the reverse) is named
    as such, rather than as its first key that the other kind lacks ("did you mean ...")."""
    kinds = {PretrainConfig: ("pre-training", "pretrain"), FinetuneConfig: ("fine-tuning", "finetune")}
    if schema not in kinds:
        return
    valid_set = set(valid)
    unknown = [k for k in given if k not in valid_set and k not in RENAMED]
    (other,) = [k for k in kinds if k is not schema]
    other_valid = set(_valid_keys(other))
    if unknown and all(k in other_valid for k in given):
        (this_name, this_dir), (other_name, _) = kinds[schema], kinds[other]
        raise UserError(
            f"{path}: a {other_name} config (its key '{unknown[0]}'), where a {this_name} one is "
            f"expected (configs/{this_dir}/*.yaml, or a {this_name} run's config.yaml)"
        )


def _merge_one(base: DictConfig, update: dict, source: str, valid: Sequence[str]) -> DictConfig:
    _check_keys(_flatten(update), valid, source)
    try:
        return OmegaConf.merge(base, update)  # type: ignore[return-value]
    except (ValidationError, ConfigKeyError, OmegaConfBaseException) as e:
        key = getattr(e, "full_key", None)
        value = getattr(e, "value", None)
        msg = str(e).splitlines()[0]
        if not key:  # not expected after _check_keys; never print "key '?'"
            raise UserError(f"{source}: {msg}") from None
        raise UserError(f"{source}: bad value {value!r} for config key '{key}': {msg}") from None


def _key_type(schema: Any, key: str) -> Any:
    """The annotated type of the dotted ``key`` of a dataclass schema; None for an unknown key."""
    t = schema
    for part in key.split("."):
        if not (isinstance(t, type) and is_dataclass(t)):
            return None
        t = typing.get_type_hints(t).get(part)
    return t


# YAML's null: sets an Optional[str] key to None (every other raw string is kept as given)
_NULL = ("null", "Null", "NULL", "~")


def _parse_override(item: str, schema: Any = None) -> tuple[str, Any]:
    """``key=value`` -> ``(key, value)``: YAML-parsed, but verbatim for a str-typed key (so that
    ``name=1.10``, ``name=off`` or ``data.manifest=0123`` stay those strings)."""
    if "=" not in item:
        raise UserError(f"override '{item}' is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"override '{item}' has an empty key")
    kind = _key_type(schema, key) if schema is not None else None
    if kind is str:
        return key, raw
    if kind == Optional[str]:
        return key, None if raw in _NULL else raw
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        if raw.lstrip().startswith(("[", "{")):  # `k=[1, 2]` unquoted: the shell split it
            raise UserError(f"override '{item}': not valid YAML; quote the whole override, e.g. "
                            f"'{key}=[1, 2]'") from None  # fmt: skip
        value = raw
    return key, value


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def load_config(
    schema: type[T], path: Optional[str | Path] = None, overrides: Sequence[str] = ()
) -> T:
    """Build a config: ``schema`` defaults <- YAML at ``path`` <- ``key=value`` overrides.

    Returns an OmegaConf structured config (attribute access, typed; readonly-safe to pass around).
    Raises :class:`UserError` on a missing/unparsable file, an unknown key or a mistyped value.
    """
    valid = _valid_keys(schema)
    cfg = OmegaConf.structured(schema)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
        except UnicodeDecodeError as e:
            byte = f"byte 0x{e.object[e.start]:02x} at offset {e.start}"
            raise UserError(f"{p}: not UTF-8 text ({byte})") from None
        except yaml.YAMLError as e:
            raise UserError(f"{p}: not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise UserError(f"{p}: expected a mapping of config keys at the top level")
        _check_kind(schema, _flatten(data), valid, p)
        cfg = _merge_one(cfg, data, str(p), valid)
    for item in overrides:
        key, value = _parse_override(item, schema)
        cfg = _merge_one(cfg, _nest(key, value), f"override '{item}'", valid)
    try:  # a ${...} in a value is an OmegaConf reference: resolved now, not when first read
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise UserError(f"config key '{key}': {str(e).splitlines()[0]} (a literal '${{' needs an escape: '\\${{')") from None
    _check_finite(cfg)
    _check_seeds(cfg, valid)
    for check in _CHECKS.get(schema, ()):
        check(cfg)
    return cfg  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Value checks: every one runs in load_config, so a bad value stops a command before it writes
# anything. (Checks that need the data, e.g. model.num_classes against its vocabulary, or files
# on disk, run where the data is read, still before a run folder is created.)
# --------------------------------------------------------------------------------------------
def _check_finite(cfg: DictConfig) -> None:
    """No config number is NaN or infinite (every range check below is passed by a NaN)."""
    for key, value in _flatten(OmegaConf.to_container(cfg)).items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise UserError(f"{key}: must be a finite number, got {value}")


def _positive(section: str, obj: Any, keys: Sequence[str]) -> None:
    for key in keys:
        value = getattr(obj, key)
        if value is not None and value <= 0:
            raise UserError(f"{section}.{key}: must be positive, got {value}")


def _fraction(section: str, obj: Any, keys: Sequence[str]) -> None:
    for key in keys:
        value = getattr(obj, key)
        if not 0 < value <= 1:
            raise UserError(f"{section}.{key}: must be in (0, 1], got {value}")


def _probability(section: str, obj: Any, keys: Sequence[str]) -> None:
    for key in keys:
        value = getattr(obj, key)
        if not 0 <= value <= 1:
            raise UserError(f"{section}.{key}: must be in [0, 1], got {value}")


def _range(key: str, value: Any, *, positive: bool = False, upper: Optional[float] = None) -> None:
    """``value`` is ``[lo, hi]`` with lo <= hi (and 0 < lo, hi <= upper when asked)."""
    v = list(value)
    ok = len(v) == 2 and v[0] <= v[1] and (not positive or v[0] > 0)
    if not ok or (upper is not None and v[1] > upper):
        bounds = ("0 < " if positive else "") + "lo <= hi" + ("" if upper is None else f" <= {upper:g}")
        raise UserError(f"{key}={v}: expected [lo, hi] with {bounds}")


SEED_MAX = 2**32 - 1  # numpy's and torch's generators take seeds in [0, 2**32 - 1]


def _check_seeds(cfg: Any, valid: Sequence[str]) -> None:
    """Every ``seed`` / ``*_seed`` key is None or in [0, SEED_MAX]."""
    for key in valid:
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "seed" or leaf.endswith("_seed"):
            value = OmegaConf.select(cfg, key)
            if value is not None and not 0 <= value <= SEED_MAX:
                raise UserError(f"{key}={value}: a seed must be in [0, 2**32 - 1 = {SEED_MAX}]")


def _one_of(key: str, value: Any, choices: Sequence[str], what: str = "value") -> None:
    if value not in choices:
        raise UserError(f"{key}: unknown {what} '{value}' (choose from {', '.join(choices)})")


def _check_device(key: str, name: str) -> None:
    if not (name in ("auto", "cpu") or name.startswith("cuda")):
        raise UserError(f"{key}={name!r}: expected auto, cpu or cuda")


def _check_pretrain_model(cfg: Any) -> None:
    from predet.modeling.backbone import BACKBONES, NORMS  # torchvision: only when checking
    from predet.modeling.cls_head import CLS_LOSSES

    m = cfg.model
    _one_of("model.backbone", m.backbone, BACKBONES, "backbone")
    _one_of("model.norm", m.norm, NORMS, "norm")
    _one_of("model.cls.loss", m.cls.loss, CLS_LOSSES, "loss")
    keys = ("fpn_channels", "num_classes", "box_head_dim", "roi_sampling_ratio",
            "roi_canonical_scale")  # fmt: skip
    _positive("model", m, keys)
    if m.input_size < MIN_INPUT_SIZE:
        raise UserError(
            f"model.input_size: must be >= {MIN_INPUT_SIZE} (the smallest view the augmentations "
            f"render), got {m.input_size}"
        )
    c = m.crpn
    if len(c.anchor_sizes) != 5:
        raise UserError(
            f"model.crpn.anchor_sizes: need one size per FPN level P2-P6 (5), "
            f"got {list(c.anchor_sizes)}"
        )
    if not c.aspect_ratios or min(c.aspect_ratios) <= 0:
        raise UserError(f"model.crpn.aspect_ratios: need positive ratios, got {list(c.aspect_ratios)}")
    keys = ("dim", "conv_dim", "batch_per_view", "pre_nms_top_n", "post_nms_top_n")
    _positive("model.crpn", c, keys)
    _fraction("model.crpn", c, ("fg_iou", "bg_iou", "nms_thresh", "positive_fraction"))
    if c.bg_iou > c.fg_iou:
        raise UserError(
            f"model.crpn.bg_iou ({c.bg_iou}) must not exceed model.crpn.fg_iou ({c.fg_iou})"
        )
    _positive("model.jitter", m.jitter, ("boxes_per_query",))
    _positive("model.croi", m.croi, ("embed_dim", "reg_dim", "num_negatives", "tau"))
    _fraction("model.croi", m.croi, ("fg_iou",))


def _check_pretrain_rest(cfg: Any) -> None:
    if not any(getattr(cfg.loss, s) for s in LOSS_SWITCHES):
        raise UserError(
            "every loss is switched off (" + ", ".join(f"loss.{s}" for s in LOSS_SWITCHES) + ")"
        )
    for s in LOSS_SWITCHES:
        if getattr(cfg.loss, f"{s}_weight") < 0:
            raise UserError(f"loss.{s}_weight: must be >= 0, got {getattr(cfg.loss, f'{s}_weight')}")
    t = cfg.train
    for key, value in (
        ("train.steps", t.steps),
        ("train.batch_size", t.batch_size),
        ("train.log_every", t.log_every),
        ("ckpt.every", cfg.ckpt.every),
    ):
        if value < 1:
            raise UserError(f"config key '{key}' must be >= 1, got {value}")
    _check_keep_last(cfg.ckpt)
    _check_sgd(t)
    if t.stop_at is not None and not 1 <= t.stop_at <= t.steps:
        raise UserError(f"train.stop_at={t.stop_at} must lie in [1, train.steps={t.steps}]")
    if t.amp_dtype not in ("bfloat16", "float16"):
        raise UserError(f"train.amp_dtype={t.amp_dtype!r}: expected bfloat16 or float16")
    if t.warmup_steps < 0 or t.decay_steps < 0:
        raise UserError("train.warmup_steps and train.decay_steps must be >= 0")
    _one_of("train.lr_schedule", t.lr_schedule, ("step", "cosine"))
    if t.lr_schedule == "cosine" and t.lr_steps is not None:
        raise UserError(
            f"train.lr_steps={list(t.lr_steps)} with train.lr_schedule=cosine: the cosine decays "
            "smoothly to 0 at train.steps; drop one of the two"
        )
    if t.lr_schedule == "cosine" and t.warmup_steps >= t.steps:
        raise UserError(
            f"train.warmup_steps={t.warmup_steps} with train.lr_schedule=cosine: must be below "
            f"train.steps={t.steps}"
        )
    if t.lr_steps is not None:
        m = list(t.lr_steps)
        if any(a >= b for a, b in zip(m, m[1:])) or not all(1 <= s < t.steps for s in m):
            raise UserError(
                f"train.lr_steps={m}: must be strictly increasing steps in [1, {t.steps - 1}] "
                f"(train.steps={t.steps})"
            )
    _positive("train", t, ("lr", "base_lr", "base_batch", "clip_grad"))
    _check_device("train.device", t.device)
    d = cfg.data
    _one_of("data.format", d.format, ("manifest", "shards", "coco"))
    _positive("data", d, ("queries_per_image", "min_images"))
    if d.num_workers < 0:
        raise UserError(f"data.num_workers: must be >= 0, got {d.num_workers}")
    if d.heldout < 0:
        raise UserError(f"data.heldout: must be >= 0, got {d.heldout}")
    if d.max_images is not None and d.max_images < 1:
        raise UserError(f"data.max_images: must be >= 1 (or null for all), got {d.max_images}")
    if t.eval_every is not None and t.eval_every < 1:
        raise UserError(f"train.eval_every: must be >= 1 (or null for ckpt.every), got {t.eval_every}")
    _check_distributed(t)


# how a query box is clipped to the two views (data.aug.query_region, TwoViewTransform)
QUERY_REGIONS = ("each", "common")
# predet.data.transforms.TwoViewTransform's smallest view side
MIN_INPUT_SIZE = 8


def _check_pretrain_aug(cfg: Any) -> None:
    """``data.aug.*`` as ``TwoViewTransform`` needs them (a bad one failed in the loader, after the
    run folder was made, or silently disabled every query)."""
    a = cfg.data.aug
    _range("data.aug.crop_scale", a.crop_scale, positive=True, upper=1)  # fractions of the area
    _range("data.aug.crop_ratio", a.crop_ratio, positive=True)  # aspect ratios (log-uniform)
    _range("data.aug.blur_sigma", a.blur_sigma, positive=True)  # 0 would mean "no blur"
    _probability("data.aug", a, ("flip_p", "jitter_p", "grayscale_p", "blur_p", "min_visible"))
    if a.query_region not in QUERY_REGIONS:
        raise UserError(f"data.aug.query_region: must be one of {', '.join(QUERY_REGIONS)}, got '{a.query_region}'")
    for key in ("brightness", "contrast", "saturation"):
        if getattr(a, key) < 0:
            raise UserError(f"data.aug.{key}: must be >= 0, got {getattr(a, key)}")
    if not 0 <= a.hue <= 0.5:  # a shift in turns, drawn from [-hue, hue]
        raise UserError(f"data.aug.hue: must be in [0, 0.5], got {a.hue}")


def _check_finetune(cfg: Any) -> None:
    from predet.modeling.backbone import BACKBONES, NORMS
    from predet.modeling.detectors import ARCHS

    m, t = cfg.model, cfg.train
    _one_of("model.arch", m.arch, ARCHS, "detector")
    _one_of("model.backbone", m.backbone, BACKBONES, "backbone")
    _one_of("model.norm", m.norm, NORMS, "norm")
    if not 0 <= m.trainable_layers <= 5:
        raise UserError(f"model.trainable_layers={m.trainable_layers}: must be in 0..5")
    if m.anchor_sizes is not None and len(m.anchor_sizes) != 5:
        raise UserError(f"model.anchor_sizes={list(m.anchor_sizes)}: give one size per FPN level (5)")
    keys = ("num_classes", "test_size", "max_size", "fpn_channels", "box_head_dim", "mask_head_dim",
            "roi_canonical_scale")  # fmt: skip
    _positive("model", m, keys)
    _positive("model", m, ("detections_per_img", "proposals_train", "proposals_test", "roi_batch_size_per_image",
                           "mask_head_lr_mult"))  # fmt: skip
    if not m.train_sizes or any(int(v) <= 0 for v in m.train_sizes):
        raise UserError(f"model.train_sizes={list(m.train_sizes)}: give one or more positive sizes")
    _probability("model", m, ("score_thresh",))
    _one_of("data.format", cfg.data.format, ("coco", "lvis", "voc"))
    _positive("data", cfg.data, ("subset", "eval_batch_size", "val_subset"))
    if cfg.data.num_workers < 0:
        raise UserError(f"data.num_workers: must be >= 0, got {cfg.data.num_workers}")
    if t.steps is None and not re.fullmatch(r"\d+(?:\.\d+)?x", t.schedule):
        raise UserError(f"train.schedule='{t.schedule}': expected a multiple of 1x such as 1x, 2x, 9x")
    _positive("train", t, ("steps", "iters_per_x", "batch_size", "log_every", "clip_grad", "num_threads"))
    _probability("train", t, ("flip_p",))
    if t.warmup_steps < 0:
        raise UserError(f"train.warmup_steps: must be >= 0, got {t.warmup_steps}")
    _check_sgd(t)
    if t.lr_steps is not None:
        ms = [int(v) for v in t.lr_steps]
        if any(v < 1 for v in ms) or any(b <= a for a, b in zip(ms, ms[1:])):
            raise UserError(f"train.lr_steps={ms}: must be strictly increasing steps >= 1")
    _positive("ckpt", cfg.ckpt, ("every",))
    _check_keep_last(cfg.ckpt)
    _check_device("train.device", t.device)
    _check_distributed(t)


def _check_sgd(t: Any) -> None:
    """``train.*`` of SGD shared by both configs: lr / base_lr / base_batch > 0, momentum in
    [0, 1), weight decay >= 0, warm-up factor in (0, 1]."""
    _positive("train", t, ("lr", "base_lr", "base_batch"))
    if not 0 <= t.momentum < 1:
        raise UserError(f"train.momentum: must be in [0, 1), got {t.momentum}")
    if t.weight_decay < 0:
        raise UserError(f"train.weight_decay: must be >= 0, got {t.weight_decay}")
    _fraction("train", t, ("warmup_factor",))


def _check_distributed(t: Any) -> None:
    """``train.accum_steps`` >= 1 and ``train.dist_timeout_s`` > 0, shared by both configs."""
    if t.accum_steps < 1:
        raise UserError(f"train.accum_steps: must be >= 1, got {t.accum_steps}")
    _positive("train", t, ("dist_timeout_s",))


def _check_keep_last(ckpt: Any) -> None:
    if ckpt.keep_last < 0:
        raise UserError(f"ckpt.keep_last: must be >= 0 (0 keeps every periodic checkpoint), got {ckpt.keep_last}")


_CHECKS: dict[type, tuple[Callable[[Any], None], ...]] = {
    PretrainConfig: (_check_pretrain_model, _check_pretrain_rest, _check_pretrain_aug),
    FinetuneConfig: (_check_finetune,),
}


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the fully resolved config as YAML (atomically)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)
