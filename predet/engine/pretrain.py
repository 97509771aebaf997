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

# What metrics.jsonl logs (DESIGN §6), in a fixed order so every rank reduces the same vector;
# a key the model did not return this step (a switched-off loss, a batch without valid queries)
# is averaged over the (rank, step) pairs that had it.
LOGGED_KEYS = (
    "loss", "loss_cls", "loss_crpn_cls", "loss_crpn_reg", "loss_info", "loss_croi_reg",
    "lookup_top1", "crpn_recall", "valid_queries",
)  # fmt: skip


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
    """DDP under torchrun (``model.norm=syncbn`` already gave the model SyncBatchNorm layers)."""
    if not dist_utils.is_initialized():
        return model
    has_syncbn = any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    if device.type != "cuda" and has_syncbn:
        raise UserError("model.norm=syncbn needs CUDA under torchrun; use model.norm=bn on CPU")
    find_unused = cfg.train.find_unused_parameters
    if find_unused is None:
        # the detection heads sit idle on a batch without valid queries (and for good when a
        # loss is switched off): DDP must not wait for their gradients
        find_unused = True
    return torch.nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused,
    )


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
def pretrain(cfg: Any, out: str | Path, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Pre-train PreDet with ``cfg`` (a :class:`~predet.config.PretrainConfig`) into run ``out``.

    Nothing on disk is changed before the config, the data and (with ``resume``) the checkpoint
    have been checked. Returns ``out``.
    """
    out = Path(out)
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


def _build_optimization(
    model: torch.nn.Module, cfg: Any, global_batch: int, use_amp: bool
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, torch.amp.GradScaler, float]:
    """SGD (momentum, weight decay), the per-step lr schedule, the grad scaler; and the base lr."""
    t = cfg.train
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
    device_type = "cuda" if use_amp else "cpu"
    scaler = torch.amp.GradScaler(device_type, enabled=use_amp and t.amp_dtype == "float16")
    return optimizer, scheduler, scaler, lr


def _restore(
    ckpt: dict, model, optimizer, scheduler, scaler, *, cfg: Any, world: int
) -> StreamPosition:
    """Load a checkpoint's training state; returns where the data stream resumes."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    # the step count comes from the checkpoint, lr and schedule from the (possibly edited) config
    schedule = scheduler.lr_lambdas[0]
    base_lrs = scheduler.base_lrs
    scheduler.load_state_dict(ckpt["scheduler"])
    scheduler.lr_lambdas[0], scheduler.base_lrs = schedule, base_lrs
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["initial_lr"], group["lr"] = base, base * schedule(scheduler.last_epoch)
    scaler.load_state_dict(ckpt.get("scaler", {}))
    pos = ckpt.get("data_position", {})
    epoch = int(pos.get("epoch", 0))
    if pos.get("world_size") == world and pos.get("batch_size") == cfg.train.batch_size:
        return StreamPosition(epoch, int(pos.get("batch", 0)))
    return StreamPosition(epoch + 1, 0)  # the data is split differently now: next epoch afresh


def _step_values(
    outputs: dict[str, torch.Tensor], loss: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """``[2, len(LOGGED_KEYS)]``: this step's values and presence flags, summed over ranks.

    A NaN on any rank makes the sum NaN on every rank, so all ranks stop together.
    """
    values = {"loss": loss, **outputs}
    zero = torch.zeros((), device=device)
    vec = torch.stack(
        [
            torch.stack([values[k].detach().float() if k in values else zero for k in LOGGED_KEYS]),
            torch.tensor([k in values for k in LOGGED_KEYS], dtype=torch.float32, device=device),
        ]
    )  # [2, K]: values, presence
    if dist_utils.is_initialized():
        torch.distributed.all_reduce(vec)
    return vec


def _check_losses(vec: torch.Tensor, *, step: int, last_good: Optional[Path]) -> None:
    """Stop on a NaN/inf loss, naming the step and the term (terms first, then their sum)."""
    hint = f" (last good checkpoint: {last_good})" if last_good else " (no checkpoint written yet)"
    order = [*range(1, 6), 0]  # loss_* terms, then "loss"
    values, present = vec[0, order].tolist(), vec[1, order].tolist()
    names = [LOGGED_KEYS[i] for i in order]
    check_finite(
        [n for n, c in zip(names, present) if c], [v for v, c in zip(values, present) if c],
        step=step, hint=hint,
    )  # fmt: skip


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
    use_amp = on_cuda and t.amp

    # model: identical initialisation on every rank, then per-rank randomness for training
    seed_everything(cfg.seed)
    model = _build_model(data_cfg, cfg.model.num_classes or len(classes)).to(device)
    if on_cuda and t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model_ddp = _wrap_model(model, cfg, device)
    model = model_ddp.module if hasattr(model_ddp, "module") else model_ddp
    global_batch = t.batch_size * world
    optimizer, scheduler, scaler, lr = _build_optimization(model, cfg, global_batch, use_amp)

    step, position = 0, StreamPosition()
    if ckpt is not None:
        position = _restore(ckpt, model, optimizer, scheduler, scaler, cfg=cfg, world=world)
        step = int(ckpt["step"])
    rngs = ckpt.get("rng") if ckpt is not None else None
    if rngs is not None and len(rngs) == world:
        set_rng_state(rngs[rank])
    else:
        if rngs is not None and is_main:
            print(f"predet pretrain: resuming a {len(rngs)}-process run on {world}: new RNG streams")
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
            f"predet pretrain: {len(classes)} classes, data {dict(getattr(data, 'counts', {}))}, "
            f"device {device}, world size {world}, global batch {global_batch}, lr {lr:g}, "
            f"steps {step}->{stop} of {t.steps}, run {out}",
            flush=True,
        )

    def state() -> dict[str, Any]:
        rng_states: list[Any] = [get_rng_state()]
        if dist_utils.is_initialized():  # every rank's RNG, so each resumes its own stream
            rng_states = [None] * world
            torch.distributed.all_gather_object(rng_states, get_rng_state())
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "step": step,
            "data_position": {
                **stream.position.state_dict(), "batch_size": t.batch_size, "world_size": world
            },
            "rng": rng_states,
            "classes": classes,
            "config": to_dict(cfg),
            "world_size": world,
        }

    amp_dtype = torch.bfloat16 if t.amp_dtype == "bfloat16" else torch.float16
    autocast = torch.autocast("cuda", dtype=amp_dtype) if use_amp else contextlib.nullcontext()
    views_cl = ("view1", "view2") if on_cuda and t.channels_last else ()
    last_good = checkpoint_path(out) if ckpt is not None else None
    sums: Optional[torch.Tensor] = None  # [2, K]: sums of values, number of (rank, step) present
    window_start, window_steps = time.perf_counter(), 0
    bar = tqdm(total=stop, initial=step, disable=not is_main, unit="step", dynamic_ncols=True)
    batches = iter(stream)
    model_ddp.train()
    while step < stop:
        batch = to_device(next(batches), device, channels_last_keys=views_cl)
        with autocast:
            outputs = model_ddp(batch)
        losses = [v for k, v in outputs.items() if k.startswith("loss_")]
        if not losses:
            raise UserError("every loss is switched off (loss.cls/crpn/info/croi_reg)")
        loss = sum(losses)
        vec = _step_values(outputs, loss, device)
        _check_losses(vec, step=step + 1, last_good=last_good)  # before the weights change

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
            elapsed = time.perf_counter() - window_start
            means, counts = (sums[0] / sums[1].clamp(min=1)).tolist(), sums[1].tolist()
            row = {"step": step, "epoch": stream.position.epoch, "lr": step_lr}
            row.update({k: m for k, m, c in zip(LOGGED_KEYS, means, counts) if c > 0})
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
    _check_ranks_agree(model, out, world=world, is_main=is_main)


def _check_ranks_agree(model: torch.nn.Module, out: Path, *, world: int, is_main: bool) -> None:
    """Under DDP: write every rank's parameter digest to ``ranks.json``; they must be equal."""
    if not dist_utils.is_initialized():
        return
    digests = gather_digests(model)
    if is_main:
        write_json(out / "ranks.json", {"world_size": world, "param_sha1": digests})
    if len(set(digests)) != 1:
        raise RuntimeError(f"DDP ranks ended with different weights: {digests}")
