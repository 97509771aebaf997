"""The fine-tuning config (``predet finetune`` / ``evaluate``; DESIGN §6): one dataclass per
section, each with the ``check()`` of its values beside its fields."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional

from predet.config import rules
from predet.config.common import CkptConfig, check_distributed, check_sgd
from predet.errors import UserError

__all__ = [
    "SplitConfig", "FinetuneDataConfig", "FinetuneModelConfig", "FinetuneTrainConfig",
    "FinetuneConfig", "SCHEDULE",
]  # fmt: skip

# train.schedule: a multiple of detectron2's 1x (1x, 2x, 0.5x, ...); group 1 is the multiple
SCHEDULE = r"(\d+(?:\.\d+)?)x"


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
    # VOC: class names in label order (default: VOC's 20, else sorted)
    classes: Optional[List[str]] = None
    eval_batch_size: int = 2  # images per inference batch

    def check(self) -> None:
        rules.one_of("data.format", self.format, ("coco", "lvis", "voc"))
        rules.positive("data", self, ("subset", "eval_batch_size", "val_subset"))
        rules.non_negative("data", self, ("num_workers",))


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
    # None: the --init file's FPN width (256 for scratch / a ResNet)
    fpn_channels: Optional[int] = None
    # None: the init's box head (<init stem>_box_head file) or 1024
    box_head_dim: Optional[int] = None

    def check(self) -> None:
        from predet.modeling.backbone import BACKBONES, NORMS  # torchvision: only when checking
        from predet.modeling.detectors import ARCHS

        rules.one_of("model.arch", self.arch, ARCHS, "detector")
        rules.one_of("model.backbone", self.backbone, BACKBONES, "backbone")
        rules.one_of("model.norm", self.norm, NORMS, "norm")
        if not 0 <= self.trainable_layers <= 5:
            raise UserError(f"model.trainable_layers={self.trainable_layers}: must be in 0..5")
        if self.anchor_sizes is not None and len(self.anchor_sizes) != 5:
            raise UserError(
                f"model.anchor_sizes={list(self.anchor_sizes)}: give one size per FPN level (5)"
            )
        keys = ("num_classes", "test_size", "max_size", "fpn_channels", "box_head_dim",
                "mask_head_dim", "roi_canonical_scale", "detections_per_img", "proposals_train",
                "proposals_test", "roi_batch_size_per_image", "mask_head_lr_mult")  # fmt: skip
        rules.positive("model", self, keys)
        if not self.train_sizes or any(int(v) <= 0 for v in self.train_sizes):
            raise UserError(
                f"model.train_sizes={list(self.train_sizes)}: give one or more positive sizes"
            )
        rules.probability("model", self, ("score_thresh",))


@dataclass
class FinetuneTrainConfig:
    schedule: str = "1x"  # 1x, 2x, 3x, 6x, 9x ...
    steps: Optional[int] = None  # overrides the schedule
    # iterations of a 1x schedule; None: COCO's 90k scaled to data
    iters_per_x: Optional[int] = None
    lr_steps: Optional[List[int]] = None  # lr x0.1 at these steps; None: at 2/3 and 8/9 of the run
    # torch CPU threads (None: torch's default); 1 is fastest on a busy CPU
    num_threads: Optional[int] = None
    batch_size: int = 16  # images per process per step
    # None: base_lr * global batch / base_batch (linear scaling, with warm-up)
    lr: Optional[float] = None
    # lr at base_batch images per step (detectron2's 0.02 at 16, Goyal et al.)
    base_lr: float = 0.02
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

    def check(self) -> None:
        if self.steps is None and not re.fullmatch(SCHEDULE, self.schedule):
            raise UserError(
                f"train.schedule='{self.schedule}': expected a multiple of 1x such as 1x, 2x, 9x"
            )
        keys = ("steps", "iters_per_x", "batch_size", "log_every", "clip_grad", "num_threads")
        rules.positive("train", self, keys)
        rules.probability("train", self, ("flip_p",))
        rules.non_negative("train", self, ("warmup_steps",))
        check_sgd(self)
        if self.lr_steps is not None:
            ms = [int(v) for v in self.lr_steps]
            if any(v < 1 for v in ms) or any(b <= a for a, b in zip(ms, ms[1:])):
                raise UserError(f"train.lr_steps={ms}: must be strictly increasing steps >= 1")
        rules.device("train.device", self.device)
        check_distributed(self)


@dataclass
class FinetuneConfig:
    seed: int = 0
    # row name in `predet compare`; None: 'scratch' or the init file's stem
    name: Optional[str] = None
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)

    def check(self) -> None:
        """Every section's rules (``seed`` and ``data.subset_seed`` are checked at load)."""
        self.model.check()
        self.data.check()
        self.train.check()
        self.ckpt.check()
