"""``predet pretrain``: builds the data, the PreDet model and the optimizer of a config, then runs
the shared training loop (:func:`predet.engine.loop.train`).

One code path for CPU, one GPU and ``torchrun`` (DDP; gloo on CPU, nccl on CUDA): single process
when ``RANK`` is unset. Per step the loop sums the model's ``loss_*`` terms (already weighted);
SGD with a per-step lr schedule (linear warm-up, x0.1 at ``train.lr_steps`` or else at
``train.decay_steps`` uniform points; lr linearly scaled from 0.2 at batch 1024 unless
``train.lr`` is given).

Run folder (DESIGN §4): ``config.yaml`` (resolved: the built-in world's files, the lr used),
``metrics.jsonl``, ``tb/``, ``checkpoints/last.pt`` and ``checkpoints/step_<step>.pt`` every
``ckpt.every`` steps; under DDP also ``ranks.json`` (every rank's parameter digest at the end,
which must all be equal).

A checkpoint holds model, optimizer, scheduler, grad scaler, step, every rank's RNG states and
the data position, so ``--resume`` continues bit-for-bit where the run stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from predet import distributed as dist_utils
from predet.config import LOSS_SWITCHES, PretrainConfig, load_config, save_config, to_dict
from predet.data.datasets import PretrainData, build_pretrain_data
from predet.engine.common import (
    MetricLogger,
    build_lr_scheduler,
    check_state_fits,
    checkpoint_path,
    config_changes,
    prepare_run_dir_all_ranks,
    gather_digests,
    load_training_checkpoint,
    resolve_device,
    restore_scheduler,
    scaled_lr,
    to_device,
    uniform_milestones,
)
from predet.data.stream import BatchStream, StreamPosition, check_batch_fits
from predet.engine.loop import Checkpointer, restore_log_window, restore_rng, train
from predet.errors import UserError
from predet.modeling.predet import build_predet, check_num_classes
from predet.utils import absolute_path, seed_everything, write_json

__all__ = ["run", "pretrain"]


def run(args: argparse.Namespace) -> int:
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / f"pretrain-{Path(args.config).stem}"
    pretrain(cfg, out, resume=args.resume, overwrite=args.overwrite)
    return 0


def pretrain(
    cfg: Any,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    data: Optional[PretrainData] = None,
    model: Optional[torch.nn.Module] = None,
) -> Path:
    """Pre-train with ``cfg`` (a :class:`~predet.config.PretrainConfig`) into run folder ``out``.

    ``data`` / ``model``: built objects to train instead of those ``cfg`` describes (tests pass
    small stand-ins; ``model`` must return ``loss_*`` terms and metrics as ``PreDet`` does).
    Nothing on disk is changed before the config, the data, the model and (with ``resume``) the
    checkpoint have been checked. Returns ``out``.
    """
    out = Path(out)
    device = torch.device(dist_utils.init(resolve_device(cfg.train.device)))
    try:
        cfg = _resolve(cfg)
        data = data if data is not None else build_pretrain_data(cfg)
        classes = list(data.classes)
        check_num_classes(cfg.model, len(classes))
        seed_everything(cfg.seed)  # identical initial weights on every rank
        model = model if model is not None else build_predet(cfg, num_classes=len(classes))
        ckpt = _load_resume_checkpoint(out, classes, cfg) if resume else None
        if ckpt is not None:  # a model the checkpoint does not fit: an error before config.yaml is touched
            changed = config_changes(ckpt.get("config", {}), to_dict(cfg), ["model", "loss"])
            check_state_fits(model, ckpt["model"], checkpoint_path(out),
                             hint=f"changed since: {', '.join(changed)}" if changed else "")  # fmt: skip
        cfg.train.lr = _lr(cfg)  # config.yaml records the lr the run trains at
        _check_fits_launch(cfg, data, model, device)
        prepare_run_dir_all_ranks(out, resume=resume, overwrite=overwrite)
        if dist_utils.is_main():
            save_config(cfg, out / "config.yaml")
        _train(cfg, data, classes, model.to(device), out, ckpt, device=device)
    finally:
        dist_utils.cleanup()
    return out


def _resolve(cfg: Any) -> Any:
    """A copy of ``cfg`` with ``data.manifest: builtin:<preset>[:seed]`` replaced by the cached
    world's manifest and query cache (generated on first use), and every data path absolute (as
    ``config.yaml`` records it)."""
    cfg = copy.deepcopy(cfg)
    if str(cfg.data.manifest).startswith("builtin:"):
        from predet.data.builtin import resolve_builtin

        world = resolve_builtin(cfg.data.manifest, progress=dist_utils.is_main())
        cfg.data.manifest = str(world.manifest)
        if cfg.data.queries is None:
            cfg.data.queries = str(world.queries)
    for key in ("manifest", "queries", "synonyms", "images", "shards"):
        setattr(cfg.data, key, absolute_path(getattr(cfg.data, key)))
    return cfg


def _lr(cfg: Any) -> float:
    """``train.lr``, or the paper's 0.2 at batch 1024 scaled to the global batch."""
    t = cfg.train
    global_batch = t.batch_size * dist_utils.world_size()
    return t.lr if t.lr is not None else scaled_lr(t.base_lr, t.base_batch, global_batch)


def _load_resume_checkpoint(out: Path, classes: list[str], cfg: Any) -> dict:
    path = checkpoint_path(out)
    if not out.is_dir():
        raise UserError(f"--resume given but run folder {out} does not exist")
    if not path.is_file():
        raise UserError(f"--resume given but {path} does not exist; use --overwrite to start over")
    ckpt = load_training_checkpoint(path)
    saved = list(ckpt.get("classes", classes))
    if saved != list(classes):  # name what changed: e.g. the data overrides left out of the command
        changed = config_changes(ckpt.get("config", {}), to_dict(cfg), ["data"])
        raise UserError(
            f"{path}: its {len(saved)} classes ({', '.join(saved[:3])}...) are not the data's {len(classes)} "
            f"({', '.join(classes[:3])}...); "
            + (f"changed since: {', '.join(changed[:3])}" if changed else "the data changed since")
        )
    return ckpt


def _check_fits_launch(cfg: Any, data: PretrainData, model: torch.nn.Module, device: torch.device) -> None:
    """What the launch itself rules out, checked before the run folder is touched (``--overwrite``
    would already have emptied it): SyncBN off CUDA under torchrun, and a data set smaller than
    one global batch."""
    world = dist_utils.world_size()
    if dist_utils.is_initialized() and device.type != "cuda":
        if any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()):
            raise UserError("model.norm=syncbn needs CUDA under torchrun; use model.norm=bn on CPU")
    dataset = data.dataset
    if not isinstance(dataset, torch.utils.data.IterableDataset) and hasattr(dataset, "__len__"):
        check_batch_fits(len(dataset), cfg.train.batch_size, world)


def _wrap_model(model: torch.nn.Module, cfg: Any, device: torch.device) -> torch.nn.Module:
    """DDP under torchrun (``model.norm=syncbn`` already gave the model SyncBatchNorm layers,
    checked to be on CUDA by :func:`_check_fits_launch`)."""
    if not dist_utils.is_initialized():
        return model
    find_unused = cfg.train.find_unused_parameters
    if find_unused is None:  # a switched-off loss leaves its part without gradients for good
        find_unused = not all(getattr(cfg.loss, s) for s in LOSS_SWITCHES)
    return torch.nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused,
    )


def _milestones(t: Any) -> list[int]:
    """The steps where the lr drops x0.1: ``train.lr_steps`` when given (``[]``: never), else
    ``train.decay_steps`` uniform points of ``train.steps``."""
    if t.lr_steps is not None:
        return [int(m) for m in t.lr_steps]
    return uniform_milestones(t.steps, t.decay_steps)


def _schedule_text(t: Any) -> str:
    """How the lr moves after warm-up, for the start line."""
    if t.lr_schedule == "cosine":
        return f"cosine to 0 at {t.steps}"
    return f"x0.1 at {_milestones(t)}"


def _build_optimization(
    model: torch.nn.Module, cfg: Any, use_amp: bool
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, torch.amp.GradScaler]:
    """SGD (momentum, weight decay), the per-step lr schedule, the grad scaler."""
    t = cfg.train
    optimizer = torch.optim.SGD(
        model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay
    )
    scheduler = build_lr_scheduler(
        optimizer,
        warmup_steps=t.warmup_steps,
        milestones=_milestones(t),
        warmup_factor=t.warmup_factor,
        cosine_steps=t.steps if t.lr_schedule == "cosine" else None,
    )
    device_type = "cuda" if use_amp else "cpu"
    scaler = torch.amp.GradScaler(device_type, enabled=use_amp and t.amp_dtype == "float16")
    return optimizer, scheduler, scaler


def _restore(
    ckpt: dict, model, optimizer, scheduler, scaler, *, cfg: Any, world: int
) -> StreamPosition:
    """Load a checkpoint's training state; returns where the data stream resumes."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    # the step count comes from the checkpoint, lr and schedule from the (possibly edited) config
    restore_scheduler(scheduler, optimizer, ckpt["scheduler"])
    scaler.load_state_dict(ckpt.get("scaler", {}))
    pos = ckpt.get("data_position", {})
    epoch = int(pos.get("epoch", 0))
    if pos.get("world_size") == world and pos.get("batch_size") == cfg.train.batch_size:
        return StreamPosition(epoch, int(pos.get("batch", 0)))
    return StreamPosition(epoch + 1, 0)  # the data is split differently now: next epoch afresh


def _train(
    cfg: Any,
    data: Any,
    classes: list[str],
    model: torch.nn.Module,
    out: Path,
    ckpt: Optional[dict],
    *,
    device: torch.device,
) -> None:
    t = cfg.train
    rank, world = dist_utils.rank(), dist_utils.world_size()
    on_cuda = device.type == "cuda"
    use_amp = on_cuda and t.amp
    if on_cuda and t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model_ddp = _wrap_model(model, cfg, device)
    optimizer, scheduler, scaler = _build_optimization(model, cfg, use_amp)
    step, position = 0, StreamPosition()
    if ckpt is not None:
        position = _restore(ckpt, model, optimizer, scheduler, scaler, cfg=cfg, world=world)
        step = int(ckpt["step"])
    restore_rng(ckpt.get("rng") if ckpt is not None else None, seed=cfg.seed)  # per-rank streams
    stop = min(t.steps, t.stop_at or t.steps)
    if step >= stop:
        if rank == 0:
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
    logger = MetricLogger(out, enabled=rank == 0)
    logger.resume_from(step)
    if rank == 0:
        print(
            f"predet pretrain: {len(classes)} classes, data {dict(getattr(data, 'counts', {}))}, "
            f"device {device}, world size {world}, global batch {t.batch_size * world}, "
            f"lr {t.lr:g} ({_schedule_text(t)}), steps {step}->{stop} of {t.steps}, run {out}",
            flush=True,
        )

    def extra_state() -> dict[str, Any]:
        position = {**stream.position.state_dict(), "batch_size": t.batch_size, "world_size": world}
        return {"data_position": position, "classes": classes, "config": to_dict(cfg),
                "world_size": world}  # fmt: skip

    checkpointer = Checkpointer(
        out, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
        every=cfg.ckpt.every, keep_last=cfg.ckpt.keep_last, extra_state=extra_state,
        last_good=checkpoint_path(out) if ckpt is not None else None,
    )  # fmt: skip
    evaluate = None
    heldout = getattr(data, "heldout", None)
    if rank == 0 and cfg.loss.cls and heldout is not None:  # cls_map on the held-out slice
        from predet.analysis.cls_map import ClsEvaluator

        evaluator = ClsEvaluator(heldout.paths, heldout.tags, heldout.truth, input_size=cfg.model.input_size)
        evaluate = functools.partial(evaluator, model)
    views_cl = ("view1", "view2") if on_cuda and t.channels_last else ()
    skipped = [0]  # unreadable images the loaders passed over, this rank
    batches = _inputs(stream, device, views_cl, skipped, always_detect=world > 1)
    amp_dtype = torch.bfloat16 if t.amp_dtype == "bfloat16" else torch.float16
    train(
        model_ddp, batches, optimizer, scheduler, start=step, stop=stop, logger=logger,
        checkpointer=checkpointer, log_every=t.log_every, images_per_step=t.batch_size * world,
        scaler=scaler, clip_grad=t.clip_grad, progress=rank == 0,
        evaluate=evaluate, eval_every=t.eval_every or cfg.ckpt.every,
        log_window=restore_log_window(ckpt.get("log_window")) if ckpt is not None else None,
        autocast=functools.partial(torch.autocast, "cuda", dtype=amp_dtype) if use_amp
        else contextlib.nullcontext,
    )  # fmt: skip
    logger.close()
    _report_skipped(skipped[0], device)
    _check_ranks_agree(model, out, world=world, is_main=rank == 0)


def _inputs(
    stream: BatchStream,
    device: torch.device,
    channels_last: tuple[str, ...],
    skipped: list[int],
    *,
    always_detect: bool = False,
) -> Iterator[tuple[dict[str, Any]]]:
    """Each batch on ``device``, as the model's one input, with ``has_queries`` (whether any
    query is valid, read on the host); ``skipped[0]`` counts the unreadable images the loader
    replaced (the batch's ``num_skipped``).

    ``always_detect`` (DDP): ``has_queries`` is always True, so that a batch without a valid
    query still runs the detection heads (their losses are then exactly 0, its ``crpn_recall`` and
    ``lookup_top1`` read 0): every rank must reach the same parameters, or DDP's gradient
    all-reduce mismatches between a rank that ran the heads and one that did not (a hang under
    NCCL, an abort under gloo)."""
    for batch in stream:
        skipped[0] += int(batch.pop("num_skipped", 0))
        if "query_mask" in batch:  # read here, on the host, so that the forward never syncs
            batch["has_queries"] = always_detect or bool(batch["query_mask"].any())
        yield (to_device(batch, device, channels_last_keys=channels_last),)


def _report_skipped(count: int, device: torch.device) -> None:
    """Say how many unreadable images the run passed over (all ranks together), if any."""
    total = torch.tensor(float(count), device=device)
    if dist_utils.is_initialized():
        torch.distributed.all_reduce(total)
    if dist_utils.is_main() and total.item() > 0:
        n = int(total.item())
        print(f"predet pretrain: {n} unreadable images skipped (readable ones took their place)")


def _check_ranks_agree(model: torch.nn.Module, out: Path, *, world: int, is_main: bool) -> None:
    """Under DDP: write every rank's parameter digest to ``ranks.json``; they must be equal."""
    if not dist_utils.is_initialized():
        return
    digests = gather_digests(model)
    if is_main:
        write_json(out / "ranks.json", {"world_size": world, "param_sha1": digests})
    if len(set(digests)) != 1:
        raise RuntimeError(f"DDP ranks ended with different weights: {digests}")
