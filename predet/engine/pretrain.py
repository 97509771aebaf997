"""``predet pretrain``: the PreDet pre-training loop (MAE / torchvision-references style).

One code path for CPU, one GPU and ``torchrun`` (DDP; gloo on CPU, nccl on CUDA): single process
when ``RANK`` is unset. Per step: ``losses = model(batch)`` (a dict of already weighted
``loss_*`` terms plus detached metrics), ``loss = sum(losses)``, SGD step, per-step lr schedule
(linear warm-up, x0.1 at four uniform points; lr linearly scaled from 0.2 at batch 1024).

Run folder (DESIGN §4): ``config.yaml``, ``metrics.jsonl``, ``tb/``, ``checkpoints/last.pt`` and
``checkpoints/step_<step>.pt`` every ``ckpt.every`` steps; under DDP also ``ranks.json``
(every rank's parameter digest at the end, which must all be equal).

A checkpoint holds model, optimizer, scheduler, grad scaler, step, every rank's RNG states and
the data position, so ``--resume`` continues bit-for-bit where the run stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from predet import distributed as dist_utils
from predet.config import PretrainConfig, load_config, save_config, to_dict
from predet.engine.common import (
    MetricLogger,
    build_lr_scheduler,
    check_finite,
    checkpoint_path,
    gather_digests,
    get_rng_state,
    load_training_checkpoint,
    resolve_device,
    save_training_checkpoint,
    scaled_lr,
    set_rng_state,
    to_device,
    uniform_milestones,
)
from predet.engine.data_stream import BatchStream, StreamPosition
from predet.errors import UserError
from predet.utils import prepare_run_dir, seed_everything, write_json

__all__ = ["run", "pretrain"]

METRIC_KEYS = ("lookup_top1", "crpn_recall", "valid_queries")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / f"pretrain-{Path(args.config).stem}"
    pretrain(cfg, out, resume=args.resume, overwrite=args.overwrite)
    return 0


# --------------------------------------------------------------------------------------------
# Building blocks (module-level so tests can swap in small stand-ins)
# --------------------------------------------------------------------------------------------
def _build_data(cfg: Any) -> Any:
    from predet.data.datasets import build_pretrain_data

    return build_pretrain_data(cfg)


def _build_model(cfg: Any, num_classes: int) -> torch.nn.Module:
    from predet.modeling.predet import build_predet

    return build_predet(cfg, num_classes=num_classes)


def _resolve_builtin(cfg: Any) -> Any:
    """``data.manifest: builtin:<preset>[:seed]`` -> the cached world's manifest and query cache."""
    if not str(cfg.data.manifest).startswith("builtin:"):
        return cfg
    from predet.data.builtin import resolve_builtin

    world = resolve_builtin(cfg.data.manifest, progress=dist_utils.is_main())
    cfg = copy.deepcopy(cfg)
    cfg.data.manifest = str(world.manifest)
    if cfg.data.queries is None:
        cfg.data.queries = str(world.queries)
    return cfg


def _validate(cfg: Any) -> None:
    t = cfg.train
    for key, value in (
        ("train.steps", t.steps),
        ("train.batch_size", t.batch_size),
        ("train.log_every", t.log_every),
        ("ckpt.every", cfg.ckpt.every),
    ):
        if value < 1:
            raise UserError(f"config key '{key}' must be >= 1, got {value}")
    if t.stop_at is not None and not 1 <= t.stop_at <= t.steps:
        raise UserError(f"train.stop_at={t.stop_at} must lie in [1, train.steps={t.steps}]")
    if t.amp_dtype not in ("bfloat16", "float16"):
        raise UserError(f"train.amp_dtype={t.amp_dtype!r}: expected bfloat16 or float16")
    if t.warmup_steps < 0 or t.decay_steps < 0:
        raise UserError("train.warmup_steps and train.decay_steps must be >= 0")


def _prepare_run_dir_all_ranks(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Rank 0 creates (or clears) the run folder; every rank raises the same error if it refuses."""
    error = None
    if dist_utils.is_main():
        try:
            prepare_run_dir(out, resume=resume, overwrite=overwrite)
        except UserError as e:
            error = str(e)
    error = dist_utils.broadcast_object(error)
    if error:
        raise UserError(error)


def _load_resume_checkpoint(out: Path, classes: list[str]) -> dict:
    path = checkpoint_path(out)
    if not out.is_dir():
        raise UserError(f"--resume given but run folder {out} does not exist")
    if not path.is_file():
        raise UserError(f"--resume given but {path} does not exist; use --overwrite to start over")
    ckpt = load_training_checkpoint(path)
    if list(ckpt.get("classes", classes)) != list(classes):
        raise UserError(f"{path}: its classes differ from the data's; the data changed since")
    return ckpt


def _wrap_model(model: torch.nn.Module, cfg: Any, device: torch.device) -> torch.nn.Module:
    if not dist_utils.is_initialized():
        return model
    if cfg.model.norm == "syncbn" and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    find_unused = cfg.train.find_unused_parameters
    if find_unused is None:  # a switched-off loss leaves its head's parameters without gradient
        find_unused = not all((cfg.loss.cls, cfg.loss.crpn, cfg.loss.info, cfg.loss.croi_reg))
    return torch.nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused,
    )


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
def pretrain(cfg: Any, out: str | Path, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Pre-train PreDet with ``cfg`` (a :class:`~predet.config.PretrainConfig`) into run folder ``out``.

    Nothing on disk is changed before the config, the data and (with ``resume``) the checkpoint
    have been checked. Returns ``out``.
    """
    out = Path(out)
    _validate(cfg)
    device = torch.device(dist_utils.init(resolve_device(cfg.train.device)))
    rank, world = dist_utils.rank(), dist_utils.world_size()
    is_main = rank == 0
    try:
        data_cfg = _resolve_builtin(cfg)
        data = _build_data(data_cfg)
        classes = list(data.classes)
        ckpt = _load_resume_checkpoint(out, classes) if resume else None
        _prepare_run_dir_all_ranks(out, resume=resume, overwrite=overwrite)
        if is_main:
            save_config(cfg, out / "config.yaml")
        _train(cfg, data_cfg, data, classes, out, ckpt, device=device, rank=rank, world=world)
    finally:
        dist_utils.cleanup()
    return out


def _train(
    cfg: Any,
    data_cfg: Any,
    data: Any,
    classes: list[str],
    out: Path,
    ckpt: Optional[dict],
    *,
    device: torch.device,
    rank: int,
    world: int,
) -> None:
    t = cfg.train
    is_main = rank == 0
    on_cuda = device.type == "cuda"

    # model: identical initialisation on every rank, then per-rank randomness for training
    seed_everything(cfg.seed)
    model = _build_model(data_cfg, cfg.model.num_classes or len(classes)).to(device)
    if on_cuda and t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model_ddp = _wrap_model(model, cfg, device)
    model = model_ddp.module if hasattr(model_ddp, "module") else model_ddp

    global_batch = t.batch_size * world
    lr = t.lr if t.lr is not None else scaled_lr(t.base_lr, t.base_batch, global_batch)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=t.momentum, weight_decay=t.weight_decay
    )
    scheduler = build_lr_scheduler(
        optimizer,
        warmup_steps=t.warmup_steps,
        milestones=uniform_milestones(t.steps, t.decay_steps),
        warmup_factor=t.warmup_factor,
    )
    amp_dtype = torch.bfloat16 if t.amp_dtype == "bfloat16" else torch.float16
    use_amp = on_cuda and t.amp
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)

    step, position = 0, StreamPosition()
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt.get("scaler", {}))
        step = int(ckpt["step"])
        pos = ckpt.get("data_position", {})
        if pos.get("world_size", world) == world and pos.get("batch_size", t.batch_size) == t.batch_size:
            position = StreamPosition(int(pos.get("epoch", 0)), int(pos.get("batch", 0)))
        else:  # a different split of the data: start the next epoch fresh
            position = StreamPosition(int(pos.get("epoch", 0)) + 1, 0)
    rng = ckpt.get("rng") if ckpt is not None else None
    if rng is not None and len(rng) == world:
        set_rng_state(rng[rank])
    else:
        seed_everything(cfg.seed * 1000 + rank + 1)

    stop = min(t.steps, t.stop_at or t.steps)
    if step >= stop:
        if is_main:
            print(f"predet pretrain: {out} is already at step {step} (stop {stop}); nothing to do")
        return

    stream = BatchStream(
        data.dataset,
        collate_fn=data.collate_fn,
        batch_size=t.batch_size,
        seed=cfg.seed,
        rank=rank,
        world_size=world,
        start=position,
        num_workers=cfg.data.num_workers,
        pin_memory=on_cuda,
    )
    logger = MetricLogger(out, enabled=is_main)
    logger.resume_from(step)
    if is_main:
        print(
            f"predet pretrain: {len(classes)} classes, device {device}, world size {world}, "
            f"global batch {global_batch}, lr {lr:g}, steps {step}->{stop} of {t.steps}, run {out}",
            flush=True,
        )

    def state() -> dict[str, Any]:
        rngs = [get_rng_state()]
        if dist_utils.is_initialized():
            rngs = [None] * world
            torch.distributed.all_gather_object(rngs, get_rng_state())
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "step": step,
            "data_position": {
                **stream.position.state_dict(),
                "batch_size": t.batch_size,
                "world_size": world,
            },
            "rng": rngs,
            "classes": classes,
            "config": to_dict(cfg),
            "world_size": world,
        }

    last_good = checkpoint_path(out) if ckpt is not None else None
    autocast = (
        torch.autocast(device_type="cuda", dtype=amp_dtype) if use_amp else contextlib.nullcontext()
    )
    keys: Optional[list[str]] = None  # logged values, fixed at the first step
    sums: Optional[torch.Tensor] = None  # [2, K]: sum of values, number of (rank, step) present
    window_start, window_steps = time.perf_counter(), 0
    bar = tqdm(total=stop, initial=step, disable=not is_main, unit="step", dynamic_ncols=True)
    batches = iter(stream)
    views_cl = ("view1", "view2") if on_cuda and t.channels_last else ()
    model_ddp.train()
    while step < stop:
        batch = to_device(next(batches), device, channels_last_keys=views_cl)
        with autocast:
            outputs = model_ddp(batch)
        losses = {k: v for k, v in outputs.items() if k.startswith("loss_")}
        if not losses:
            raise UserError("every loss is switched off (loss.cls/crpn/info/croi_reg): nothing to train")
        loss = sum(losses.values())

        if keys is None:
            keys = ["loss", *sorted(losses), *[k for k in METRIC_KEYS if k in outputs]]
        values = {"loss": loss, **outputs}
        present = [k in values for k in keys]
        zero = torch.zeros((), device=device)
        vec = torch.stack(
            [
                torch.stack([values[k].detach().float() if p else zero for k, p in zip(keys, present)]),
                torch.tensor(present, dtype=torch.float32, device=device),
            ]
        )  # [2, K]: values, presence
        if dist_utils.is_initialized():  # a NaN on any rank makes the sum NaN on every rank
            torch.distributed.all_reduce(vec)
        n_loss = 1 + len(losses)
        hint = f" (last good checkpoint: {last_good})" if last_good else " (no checkpoint was written yet)"
        # the terms first, so the message names the culprit; then their sum (it may overflow)
        order = [*range(1, n_loss), 0]
        check_finite([keys[i] for i in order], vec[0, order].tolist(), step=step + 1, hint=hint)

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if t.clip_grad:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        step_lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        step += 1
        bar.update(1)

        sums = vec if sums is None else sums + vec
        window_steps += 1
        if step % t.log_every == 0 or step == stop:
            means = (sums[0] / sums[1].clamp(min=1)).tolist()
            elapsed = time.perf_counter() - window_start
            row = {"step": step, "epoch": stream.position.epoch, "lr": step_lr}
            row.update({k: m for k, m, c in zip(keys, means, sums[1].tolist()) if c > 0})
            row["images_per_s"] = window_steps * global_batch / max(elapsed, 1e-9)
            row["world_size"] = world
            logger.log(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", img_s=f"{row['images_per_s']:.1f}")
            sums, window_start, window_steps = None, time.perf_counter(), 0

        periodic = step % cfg.ckpt.every == 0
        if periodic or step == stop:
            s = state()  # a collective under DDP: every rank builds it
            if is_main:
                last_good = save_training_checkpoint(
                    s, out, periodic=periodic, keep_last=cfg.ckpt.keep_last
                )
            dist_utils.barrier()
    bar.close()
    logger.close()

    if dist_utils.is_initialized():
        digests = gather_digests(model)
        if is_main:
            write_json(out / "ranks.json", {"world_size": world, "param_sha1": digests})
        if len(set(digests)) != 1:
            raise RuntimeError(f"DDP ranks ended with different weights: {digests}")
