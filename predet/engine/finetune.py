"""Fine-tuning torchvision detectors: ``predet finetune --config CFG --init FILE|scratch [--out RUN]``.

The shared step loop (:func:`predet.engine.loop.train`, one batch per step, no epochs to count):
SGD with linear warm-up and x0.1 steps, the mask head at ``model.mask_head_lr_mult`` x the
learning rate (the paper's 4x), multi-scale
training (shortest side drawn per image from ``model.train_sizes`` by torchvision's transform) and
horizontal flips, bf16 autocast on CUDA, DDP under ``torchrun`` (same code path as one CPU).

Schedules: ``train.schedule`` ``Nx`` is N times a 1x schedule; 1x is COCO's 90k iterations at 16
images (~12.2 epochs of COCO's 118,287 train images), i.e. for another data set the same number of
epochs at this global batch, unless ``train.iters_per_x`` says otherwise. ``train.steps`` overrides
the total; the learning rate drops x0.1 at 2/3 and 8/9 of it unless ``train.lr_steps`` is given.
The learning rate follows the global batch (linear scaling rule, after a linear warm-up):
``train.base_lr`` x global batch / ``train.base_batch`` (0.02 at 16 images by default, so 0.01 at 8),
unless ``train.lr`` is given; the resolved value is the run's ``config.yaml`` ``train.lr``.

Batches are a pure function of the step: step ``s`` takes global items ``s*B*W .. (s+1)*B*W`` of the
stream of per-epoch permutations (seeded by ``seed`` and the epoch), rank ``r`` its ``B``-slice; item
``i`` of epoch ``e`` flips with a generator seeded by ``(seed, e, i)``. Resuming from
``checkpoints/last.pt`` (model, optimizer, scheduler, step, RNG states) therefore continues exactly.

A ``predet export`` file's ``F.json`` sidecar is checked against ``model.backbone``,
``model.fpn_channels`` and ``model.norm`` first (a mismatch stops the run with a one-line error).

The run folder gets ``config.yaml``, ``init.json`` (the init's name and the tensors loaded / not
loaded / unused), ``log.txt``, ``metrics.jsonl``, ``tb/``, ``checkpoints/`` and, when the config has
a val split, ``predictions.json`` + ``results.json`` (see :mod:`predet.engine.evaluate`).
"""

from __future__ import annotations

import copy
import functools
import math
import re
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader

from predet import distributed
from predet.config import FinetuneConfig, save_config, to_dict
from predet.config.finetune import SCHEDULE
from predet.data.detection import DetectionDataset, collate_detection, load_gt, resolve_split
from predet.data.stream import StepBatchSampler
from predet.engine import trainer
from predet.engine.common import (
    MetricLogger,
    build_lr_scheduler,
    check_state_fits,
    config_changes,
    resolve_device,
    restore_scheduler,
)
from predet.engine.evaluate import evaluate_run, format_results
from predet.engine.loop import Checkpointer, restore_log_window, restore_rng
from predet.engine.preemption import ignore_stop_signals
from predet.engine.trainer import Resume
from predet.errors import UserError
from predet.export import check_init_sidecar
from predet.modeling.detectors import build_detector, init_widths, load_init
from predet.utils import absolute_path, seed_everything, write_json

__all__ = ["finetune", "resolve_init_widths", "resolve_lr", "schedule", "StepBatchSampler",
           "build_optimizer", "default_run_folder"]  # fmt: skip

COCO_TRAIN_IMAGES = 118_287
COCO_1X_ITERS, COCO_1X_BATCH = 90_000, 16


# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------
def schedule(cfg: FinetuneConfig, num_images: int, world_size: int = 1) -> tuple[int, list[int]]:
    """(total steps, lr-drop steps) for ``cfg.train`` on ``num_images`` training images."""
    t = cfg.train
    global_batch = trainer.global_batch(t, world_size)  # accumulated micro-batches included
    if t.steps is not None:
        total = t.steps
    else:
        m = re.fullmatch(SCHEDULE, t.schedule)  # load_config checked it
        per_x = t.iters_per_x or math.ceil(
            COCO_1X_ITERS * COCO_1X_BATCH / COCO_TRAIN_IMAGES * num_images / global_batch
        )  # same epochs as COCO's 1x
        total = round(float(m.group(1)) * per_x)
    if total <= 0:
        raise UserError(f"train.steps={total}: must be positive")
    steps = list(t.lr_steps) if t.lr_steps is not None else [round(total * 2 / 3), round(total * 8 / 9)]
    return total, sorted(steps)


def resolve_lr(cfg: FinetuneConfig, world_size: int = 1) -> float:
    """The run's lr: :func:`predet.engine.trainer.resolve_lr` of ``cfg.train`` (``train.lr``, or
    ``train.base_lr`` x global batch / ``train.base_batch``; detectron2's ``REFERENCE_WORLD_SIZE``)."""
    return trainer.resolve_lr(cfg.train, world_size)


def build_optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.SGD:
    """SGD at :func:`resolve_lr`; the mask head's parameters in their own group at
    ``mask_head_lr_mult`` x lr."""
    mask, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (mask if ".mask_head." in f".{name}" or ".mask_predictor." in f".{name}" else rest).append(p)
    lr = resolve_lr(cfg, distributed.world_size())
    groups = [{"params": rest, "lr": lr}]
    if mask:
        groups.append({"params": mask, "lr": lr * cfg.model.mask_head_lr_mult})
    return trainer.build_sgd(groups, cfg.train, lr)


# --------------------------------------------------------------------------------------------
# Data order
# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------
class _RunLog:
    """``log.txt`` (rank 0), plus ``metrics.jsonl`` and TensorBoard through the shared
    :class:`~predet.engine.common.MetricLogger`."""

    def __init__(self, out: Path, *, enabled: bool) -> None:
        self.enabled = enabled
        self.out = out
        self.metric_logger = MetricLogger(out, enabled=enabled)

    def text(self, msg: str, *, echo: bool = True) -> None:
        if not self.enabled:
            return
        with open(self.out / "log.txt", "a") as f:
            f.write(msg + "\n")
        if echo:
            from tqdm import tqdm

            tqdm.write(msg)

    def close(self) -> None:
        self.metric_logger.close()


def _device_setup(model: nn.Module, cfg: FinetuneConfig, device: torch.device) -> nn.Module:
    """SyncBatchNorm for ``model.norm=syncbn`` under torchrun (CUDA only: see
    :func:`predet.engine.trainer.check_syncbn`), the model on ``device``, channels-last on CUDA."""
    if cfg.model.norm == "syncbn" and distributed.is_initialized():
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        trainer.check_syncbn(model, device)
    model.to(device)
    if cfg.train.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
def resolve_init_widths(cfg: FinetuneConfig, init: str) -> FinetuneConfig:
    """A copy of ``cfg`` with ``builtin:`` data resolved and ``model.fpn_channels`` / ``box_head_dim``
    taken from ``init`` where None."""
    cfg = copy.deepcopy(cfg)
    for split in ("train", "val"):  # builtin:<preset> -> the world's files (resolved in config.yaml)
        sc = cfg.data[split]
        sc.ann, sc.images = map(absolute_path, resolve_split(sc.ann, sc.images, split))
    widths = init_widths(init)
    if cfg.model.fpn_channels is None:
        cfg.model.fpn_channels = widths.get("fpn_channels", 256)
    if cfg.model.box_head_dim is None:
        cfg.model.box_head_dim = widths.get("box_head_dim", 1024)
    return cfg


def finetune(cfg: FinetuneConfig, init: str, out: Path, *, resume: Resume = False, overwrite: bool = False,
             progress: bool = True) -> Path:  # fmt: skip
    """Fine-tune ``cfg.model.arch`` from ``init`` (file or ``scratch``) into the run folder ``out``.

    ``resume``: True (``--resume``), ``"auto"`` (resume if ``out`` holds a checkpoint, else
    start) or False. Evaluates on ``cfg.data.val`` at the end when it is set. Returns ``out``.
    """
    out = Path(out)
    check_init_sidecar(init, cfg.model)  # the init's F.json vs model.backbone/fpn_channels/norm, before any file
    if cfg.train.num_threads is not None:
        torch.set_num_threads(cfg.train.num_threads)
    device = distributed.init(resolve_device(cfg.train.device),  # a GPU index this machine has
                              timeout_s=getattr(cfg.train, "dist_timeout_s", None))  # fmt: skip
    cfg = resolve_init_widths(cfg, init)
    notes: list[str] = []  # log.txt's first lines: data, model and init are checked before OUT is made
    if init == "scratch" and cfg.model.norm == "frozenbn":  # as torchvision's detectors do
        cfg.model.norm = "bn"
        notes.append("model.norm=frozenbn with --init scratch: trains BatchNorm instead (a random init "
                     "has no statistics to freeze)")  # fmt: skip
    lr_fixed = cfg.train.lr is not None
    world = distributed.world_size()
    lr_note = "train.lr" if lr_fixed else (
        f"train.base_lr {cfg.train.base_lr:g} x {trainer.global_batch(cfg.train, world)}/{cfg.train.base_batch} images")
    cfg.train.lr = resolve_lr(cfg, world)  # config.yaml records the lr the run trains at
    seed_everything(cfg.seed)
    dataset = _train_dataset(cfg)
    total, lr_steps = schedule(cfg, len(dataset), world)
    warmup = min(cfg.train.warmup_steps, total)
    notes.insert(0, f"train: {len(dataset)} images ({dataset.num_without_boxes} without boxes left out), "
                    f"{len(dataset.classes)} classes; {total} steps at {cfg.train.batch_size}x{world}"
                    + (f"x{cfg.train.accum_steps}" if _accum(cfg) > 1 else "") + " images, "
                    f"lr {cfg.train.lr:g} ({lr_note}), warm-up {warmup}, lr x0.1 at {lr_steps}")  # fmt: skip
    model = build_detector(cfg, dataset.classes)
    report = load_init(model, init, name=cfg.name)
    start = trainer.open_run(out, resume=resume, overwrite=overwrite)
    if start.resuming:
        changed = config_changes(_saved_config(out), to_dict(cfg), ["model"])
        check_state_fits(model, start.state["model"], start.path,
                         hint=f"changed since: {', '.join(changed)}" if changed else "")  # fmt: skip
        note = trainer.world_change_note(start.state.get("world_size"), world, cfg.train, lr_fixed=lr_fixed)
        notes += [note] if note else []
    model = _device_setup(model, cfg, device)
    trainer.prepare_run(out, start)
    if distributed.is_main():
        save_config(cfg, out / "config.yaml")
        write_json(out / "init.json", report.to_dict())
    log = _RunLog(out, enabled=distributed.is_main())
    for line in notes:
        log.text(line)
    _log_init(log, report)
    _fit(cfg, model, dataset, out, start, log, device=device, total=total, lr_steps=lr_steps, warmup=warmup,
         init_name=report.name, progress=progress)  # fmt: skip
    distributed.barrier()
    # rank 0 alone evaluates, with no collective: the other ranks return now instead of waiting
    # at a barrier that a long evaluation (LVIS, COCO masks) would hold past the process group's
    # timeout, killing the job after its training had finished
    if distributed.is_main() and cfg.data.val.ann:
        results = evaluate_run(out, progress=progress)
        log.text(format_results(results))
    log.close()
    return out


def _accum(cfg: FinetuneConfig) -> int:
    return int(getattr(cfg.train, "accum_steps", 1))


def _train_dataset(cfg: FinetuneConfig) -> DetectionDataset:
    """The training split (``data.subset`` images of it when set), its classes checked against
    ``model.num_classes``."""
    d = cfg.data
    train_gt = load_gt(d.format, d.train.ann, classes=d.classes)
    dataset = DetectionDataset(train_gt, d.train.images, train=True, with_masks=cfg.model.arch == "mask_rcnn",
                               flip_p=cfg.train.flip_p, seed=cfg.seed, subset=d.subset,
                               subset_seed=d.subset_seed)  # fmt: skip
    n = len(dataset.classes)
    if cfg.model.num_classes is not None and cfg.model.num_classes != n:
        raise UserError(f"model.num_classes={cfg.model.num_classes} but {d.train.ann} has {n} classes")
    return dataset


def _log_init(log: "_RunLog", report: Any) -> None:
    log.text(report.summary())
    log.text("init loaded: " + " ".join(report.loaded), echo=False)
    log.text("init not loaded: " + (" ".join(report.missing) or "-"), echo=0 < len(report.missing) <= 12)
    log.text("init unused: " + (" ".join(report.unused) or "-"), echo=False)


def _fit(cfg: FinetuneConfig, model: nn.Module, dataset: DetectionDataset, out: Path, start: trainer.RunStart,
         log: "_RunLog", *, device: torch.device, total: int, lr_steps: list[int], warmup: int, init_name: str,
         progress: bool) -> None:  # fmt: skip
    """Optimizer, schedule, resume, DDP, data order, then the shared loop."""
    rank, world, accum = distributed.rank(), distributed.world_size(), _accum(cfg)
    opt = build_optimizer(model, cfg)
    sched = build_lr_scheduler(opt, warmup_steps=warmup, milestones=lr_steps, warmup_factor=cfg.train.warmup_factor)
    scaler = trainer.build_scaler(device, cfg.train)
    step, state = 0, start.state
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        restore_scheduler(sched, opt, state["scheduler"])  # the config's schedule, the checkpoint's step
        scaler.load_state_dict(state.get("scaler", {}))
        step = int(state["step"])
        restore_rng(state["rng"], seed=cfg.seed)
        log.metric_logger.resume_from(step)  # rows logged after that checkpoint are redone
        log.text(f"resumed from {start.path} at step {step}")
    sampler = StepBatchSampler(num_items=len(dataset), batch_size=cfg.train.batch_size, seed=cfg.seed,
                               start=step * accum, total=total * accum, rank=rank, world_size=world)  # fmt: skip
    loader = DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers, collate_fn=collate_detection,
        pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals,
        generator=torch.Generator().manual_seed(cfg.seed),  # iterators must not draw from the global RNG
    )  # fmt: skip
    checkpointer = Checkpointer(
        out, model=model, optimizer=opt, scheduler=sched, scaler=scaler,
        every=cfg.ckpt.every, keep_last=cfg.ckpt.keep_last, last_good=start.path,
        extra_state=functools.partial(dict, classes=dataset.classes, init=init_name, world_size=world),
    )  # fmt: skip
    trainer.run_loop(
        _LossNames(trainer.wrap_ddp(model, device)), _on_device(loader, device), opt, sched, start=step,
        stop=total, logger=log.metric_logger, checkpointer=checkpointer, log_every=cfg.train.log_every,
        images_per_step=trainer.global_batch(cfg.train, world), clip_grad=cfg.train.clip_grad,
        progress=progress and rank == 0, scaler=scaler, autocast=trainer.autocast_factory(device, cfg.train),
        log_window=restore_log_window(state.get("log_window")) if state is not None else None,
        accum_steps=accum,
    )  # fmt: skip


def _saved_config(out: Path) -> dict:
    """``OUT/config.yaml`` as a dict (the config a checkpoint there was written under), or {}."""
    import yaml

    try:
        return yaml.safe_load((out / "config.yaml").read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}


class _LossNames(nn.Module):
    """A torchvision detector in training mode, every loss named ``loss_*`` (RetinaNet's are
    ``classification``/``bbox_regression``) and in float32 (the shared loop sums ``loss_*``)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: list[torch.Tensor], targets: list[dict]) -> dict[str, torch.Tensor]:
        losses = self.detector(images, targets)
        return {(k if k.startswith("loss_") else f"loss_{k}"): v.float() for k, v in losses.items()}


def _on_device(loader: DataLoader, device: torch.device) -> Iterator[tuple[list, list]]:
    """``(images, targets)`` of each step, moved to ``device``."""
    for images, targets in loader:
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in tg.items()} for tg in targets]
        yield images, targets


def default_run_folder(config: str | Path, init: str | Path) -> Path:
    """``runs/finetune-<config>-<init>``: the run folder of ``predet finetune`` without ``--out``."""
    return Path("runs") / f"finetune-{Path(config).stem}-{'scratch' if init == 'scratch' else Path(init).stem}"
