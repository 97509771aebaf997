"""The pre-training config (``predet pretrain``; DESIGN §2, §6): one dataclass per section, each
with the ``check()`` of its values beside its fields."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import List, Optional

from predet.config import rules
from predet.config.common import CkptConfig, check_distributed, check_sgd
from predet.errors import UserError

__all__ = [
    "AugConfig", "PretrainDataConfig", "ClsConfig", "CRPNConfig", "JitterConfig", "CROIConfig",
    "PretrainModelConfig", "LossConfig", "LOSS_SWITCHES", "PretrainTrainConfig", "PretrainConfig",
    "QUERY_REGIONS", "MIN_INPUT_SIZE",
]  # fmt: skip

# how a query box is clipped to the two views (data.aug.query_region, TwoViewTransform)
QUERY_REGIONS = ("each", "common")
# predet.data.transforms.TwoViewTransform's smallest view side
MIN_INPUT_SIZE = 8


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

    def check(self) -> None:
        """As ``TwoViewTransform`` needs them (a bad one failed in the loader, after the run
        folder was made, or silently disabled every query)."""
        # fractions of the area
        rules.span("data.aug.crop_scale", self.crop_scale, positive=True, upper=1)
        # aspect ratios (log-uniform)
        rules.span("data.aug.crop_ratio", self.crop_ratio, positive=True)
        rules.span("data.aug.blur_sigma", self.blur_sigma, positive=True)  # 0 would mean "no blur"
        rules.probability(
            "data.aug", self, ("flip_p", "jitter_p", "grayscale_p", "blur_p", "min_visible")
        )
        if self.query_region not in QUERY_REGIONS:
            raise UserError(
                f"data.aug.query_region: must be one of {', '.join(QUERY_REGIONS)}, "
                f"got '{self.query_region}'"
            )
        rules.non_negative("data.aug", self, ("brightness", "contrast", "saturation"))
        if not 0 <= self.hue <= 0.5:  # a shift in turns, drawn from [-hue, hue]
            raise UserError(f"data.aug.hue: must be in [0, 0.5], got {self.hue}")


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

    def check(self) -> None:
        rules.one_of("data.format", self.format, ("manifest", "shards", "coco"))
        rules.positive("data", self, ("queries_per_image", "min_images"))
        rules.non_negative("data", self, ("num_workers", "heldout"))
        if self.max_images is not None and self.max_images < 1:
            raise UserError(
                f"data.max_images: must be >= 1 (or null for all), got {self.max_images}"
            )
        self.aug.check()


@dataclass
class ClsConfig:
    """The classification head (``ClsHead``)."""

    loss: str = "softmax"  # softmax (multi-label softmax CE) | bce

    def check(self) -> None:
        from predet.modeling.cls_head import CLS_LOSSES  # torch: only when checking

        rules.one_of("model.cls.loss", self.loss, CLS_LOSSES, "loss")


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

    def check(self) -> None:
        if len(self.anchor_sizes) != 5:
            raise UserError(
                "model.crpn.anchor_sizes: need one size per FPN level P2-P6 (5), "
                f"got {list(self.anchor_sizes)}"
            )
        if not self.aspect_ratios or min(self.aspect_ratios) <= 0:
            raise UserError(
                f"model.crpn.aspect_ratios: need positive ratios, got {list(self.aspect_ratios)}"
            )
        rules.positive("model.crpn", self, ("dim", "conv_dim", "batch_per_view"))
        rules.positive("model.crpn", self, ("pre_nms_top_n", "post_nms_top_n"))
        rules.fraction("model.crpn", self, ("fg_iou", "bg_iou", "nms_thresh", "positive_fraction"))
        if self.bg_iou > self.fg_iou:
            raise UserError(
                f"model.crpn.bg_iou ({self.bg_iou}) must not exceed "
                f"model.crpn.fg_iou ({self.fg_iou})"
            )


@dataclass
class JitterConfig:
    """CRPN off (paper Table 1): ``JitterProposals``, boxes jittered around each query."""

    boxes_per_query: int = 16

    def check(self) -> None:
        rules.positive("model.jitter", self, ("boxes_per_query",))


@dataclass
class CROIConfig:
    """The contrastive ROI head (``ContrastiveROIHead``)."""

    embed_dim: int = 256
    reg_dim: int = 64  # D'
    num_negatives: int = 512
    tau: float = 0.07
    fg_iou: float = 0.5
    query_negatives: bool = False  # True: q's negatives = all candidates with IoU < 0.5 to q

    def check(self) -> None:
        rules.positive("model.croi", self, ("embed_dim", "reg_dim", "num_negatives", "tau"))
        rules.fraction("model.croi", self, ("fg_iou",))


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

    def check(self) -> None:
        from predet.modeling.backbone import BACKBONES, NORMS  # torchvision: only when checking

        rules.one_of("model.backbone", self.backbone, BACKBONES, "backbone")
        rules.one_of("model.norm", self.norm, NORMS, "norm")
        rules.positive("model", self, ("fpn_channels", "num_classes", "box_head_dim"))
        rules.positive("model", self, ("roi_sampling_ratio", "roi_canonical_scale"))
        if self.input_size < MIN_INPUT_SIZE:
            raise UserError(
                f"model.input_size: must be >= {MIN_INPUT_SIZE} (the smallest view the "
                f"augmentations render), got {self.input_size}"
            )
        for head in (self.cls, self.crpn, self.jitter, self.croi):
            head.check()


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

    def check(self) -> None:
        if not any(getattr(self, s) for s in LOSS_SWITCHES):
            raise UserError(
                "every loss is switched off (" + ", ".join(f"loss.{s}" for s in LOSS_SWITCHES) + ")"
            )
        rules.non_negative("loss", self, [f"{s}_weight" for s in LOSS_SWITCHES])


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
    # cls_map on the held-out slice every N steps; None: ckpt.every
    eval_every: Optional[int] = None
    device: str = "auto"  # auto | cpu | cuda
    # stop (with a checkpoint) after this step; schedule keeps `steps`
    stop_at: Optional[int] = None
    find_unused_parameters: Optional[bool] = None  # DDP; None: True when a loss is switched off
    # gradient accumulation: micro-batches of `batch_size` per optimizer step (the step's batch is
    # batch_size * accum_steps images per process; lr scaling counts them all)
    accum_steps: int = 1
    # seconds a torch.distributed collective may wait for the other ranks before it fails
    # (init_process_group's timeout): a rank that died or hangs ends the run instead of stalling it
    dist_timeout_s: float = 600

    def check(self) -> None:
        for key in ("steps", "batch_size", "log_every"):
            if getattr(self, key) < 1:
                raise UserError(f"config key 'train.{key}' must be >= 1, got {getattr(self, key)}")
        check_sgd(self)
        if self.stop_at is not None and not 1 <= self.stop_at <= self.steps:
            raise UserError(
                f"train.stop_at={self.stop_at} must lie in [1, train.steps={self.steps}]"
            )
        if self.amp_dtype not in ("bfloat16", "float16"):
            raise UserError(f"train.amp_dtype={self.amp_dtype!r}: expected bfloat16 or float16")
        self._check_schedule()
        rules.positive("train", self, ("clip_grad",))
        rules.device("train.device", self.device)
        if self.eval_every is not None and self.eval_every < 1:
            raise UserError(
                f"train.eval_every: must be >= 1 (or null for ckpt.every), got {self.eval_every}"
            )
        check_distributed(self)

    def _check_schedule(self) -> None:
        """Warm-up, then the lr drops (``lr_steps`` or ``decay_steps``) or the cosine."""
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise UserError("train.warmup_steps and train.decay_steps must be >= 0")
        rules.one_of("train.lr_schedule", self.lr_schedule, ("step", "cosine"))
        if self.lr_schedule == "cosine" and self.lr_steps is not None:
            raise UserError(
                f"train.lr_steps={list(self.lr_steps)} with train.lr_schedule=cosine: the cosine "
                "decays smoothly to 0 at train.steps; drop one of the two"
            )
        if self.lr_schedule == "cosine" and self.warmup_steps >= self.steps:
            raise UserError(
                f"train.warmup_steps={self.warmup_steps} with train.lr_schedule=cosine: must be "
                f"below train.steps={self.steps}"
            )
        if self.lr_steps is not None:
            m = list(self.lr_steps)
            if any(a >= b for a, b in zip(m, m[1:])) or not all(1 <= s < self.steps for s in m):
                raise UserError(
                    f"train.lr_steps={m}: must be strictly increasing steps in "
                    f"[1, {self.steps - 1}] (train.steps={self.steps})"
                )


@dataclass
class PretrainConfig:
    seed: int = 0
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: PretrainTrainConfig = field(default_factory=PretrainTrainConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)

    def check(self) -> None:
        """Every section's rules (``seed`` is checked with every other seed key at load)."""
        self.model.check()
        self.loss.check()
        self.train.check()
        if self.ckpt.every < 1:  # ckpt.check()'s rule, worded as train.steps' above
            raise UserError(f"config key 'ckpt.every' must be >= 1, got {self.ckpt.every}")
        self.ckpt.check()
        self.data.check()
