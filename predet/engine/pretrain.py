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

import copy
import functools
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from predet import distributed as dist_utils
from predet.config import LOSS_SWITCHES, save_config, to_dict
from predet.data.datasets import PretrainData, build_pretrain_data
from predet.data.stream import BatchStream, StreamPosition, check_batch_fits
from predet.engine.common import (
    MetricLogger,
    build_lr_scheduler,
    check_state_fits,
    config_changes,
    gather_digests,
    resolve_device,
    restore_scheduler,
    to_device,
    uniform_milestones,
)
from predet.engine.loop import Checkpointer, restore_log_window, restore_rng
from predet.engine.trainer import (
    Resume,
    RunStart,
    autocast_factory,
    build_scaler,
    build_sgd,
    check_syncbn,
    global_batch,
    open_run,
    prepare_run,
    resolve_lr,
    run_loop,
    world_change_note,
    wrap_ddp,
)
from predet.errors import UserError
from predet.modeling.predet import build_predet, check_num_classes
from predet.utils import absolute_path, seed_everything, write_json

__all__ = ["pretrain"]


def pretrain(
    cfg: Any,
    out: str | Path,
    *,
    resume: Resume = False,
    overwrite: bool = False,
    data: Optional[PretrainData] = None,
    model: Optional[torch.nn.Module] = None,
) -> Path:
    """Pre-train with ``cfg`` (a :class:`~predet.config.PretrainConfig`) into run folder ``out``.

    ``resume``: True (``--resume``), ``"auto"`` (``--resume auto``: resume if ``out`` holds a
    checkpoint, else start) or False. ``data`` / ``model``: built objects to train instead of
    those ``cfg`` describes (tests pass small stand-ins; ``model`` must return ``loss_*`` terms and
    metrics as ``PreDet`` does). Nothing on disk is changed before the config, the data, the model
    and (when resuming) the checkpoint have been checked. Returns ``out``.
    """
    out = Path(out)
    device = torch.device(dist_utils.init(resolve_device(cfg.train.device),
                                          timeout_s=getattr(cfg.train, "dist_timeout_s", None)))  # fmt: skip
    try:
        cfg = _resolve(cfg)
        data = data if data is not None else build_pretrain_data(cfg)
        classes = list(data.classes)
        check_num_classes(cfg.model, len(classes))
        seed_everything(cfg.seed)  # identical initial weights on every rank
        model = model if model is not None else build_predet(cfg, num_classes=len(classes))
        start = open_run(out, resume=resume, overwrite=overwrite)
        lr_fixed = cfg.train.lr is not None
        cfg.train.lr = resolve_lr(cfg.train, dist_utils.world_size())  # config.yaml records it
        if start.resuming:  # a checkpoint that does not fit: an error before config.yaml is touched
            _check_resume_fits(start, classes, cfg, model, lr_fixed=lr_fixed)
        check_syncbn(model, device)
        _check_batch_fits(cfg, data)
        prepare_run(out, start)
        if dist_utils.is_main():
            save_config(cfg, out / "config.yaml")
        _train(cfg, data, classes, model.to(device), out, start, device=device)
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


def _check_resume_fits(start: RunStart, classes: list[str], cfg: Any, model: torch.nn.Module,
                       *, lr_fixed: bool) -> None:  # fmt: skip
    """The checkpoint resumed from must have the data's classes and fit the model; a line when
    it was written by another number of processes."""
    ckpt, path = start.state, start.path
    saved = list(ckpt.get("classes", classes))
    if saved != list(classes):  # name what changed: e.g. the data overrides left out of the command
        changed = config_changes(ckpt.get("config", {}), to_dict(cfg), ["data"])
        raise UserError(
            f"{path}: its {len(saved)} classes ({', '.join(saved[:3])}...) are not the data's {len(classes)} "
            f"({', '.join(classes[:3])}...); "
            + (f"changed since: {', '.join(changed[:3])}" if changed else "the data changed since")
        )
    changed = config_changes(ckpt.get("config", {}), to_dict(cfg), ["model", "loss"])
    check_state_fits(model, ckpt["model"], path, hint=f"changed since: {', '.join(changed)}" if changed else "")
    note = world_change_note(ckpt.get("world_size"), dist_utils.world_size(), cfg.train, lr_fixed=lr_fixed)
    if note and dist_utils.is_main():
        print(f"predet pretrain: {note}", flush=True)


def _check_batch_fits(cfg: Any, data: PretrainData) -> None:
    """A map-style data set must fill one step of every rank."""
    dataset = data.dataset
    if not isinstance(dataset, torch.utils.data.IterableDataset) and hasattr(dataset, "__len__"):
        check_batch_fits(len(dataset), cfg.train.batch_size, dist_utils.world_size())


def _find_unused(cfg: Any) -> bool:
    """DDP's ``find_unused_parameters``: ``train.find_unused_parameters``, or whether a switched-off
    loss leaves its part without gradients for good."""
    if cfg.train.find_unused_parameters is not None:
        return bool(cfg.train.find_unused_parameters)
    return not all(getattr(cfg.loss, s) for s in LOSS_SWITCHES)


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


def _restore(ckpt: dict, model, optimizer, scheduler, scaler, *, cfg: Any, world: int) -> StreamPosition:
    """Load a checkpoint's training state; returns where the data stream resumes."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    # the step count comes from the checkpoint, lr and schedule from the (possibly edited) config
    restore_scheduler(scheduler, optimizer, ckpt["scheduler"])
    scaler.load_state_dict(ckpt.get("scaler", {}))
    pos = ckpt.get("data_position", {})
    epoch = int(pos.get("epoch", 0))
    if pos.get("world_size") == world and pos.get("batch_size") == cfg.train.batch_size:
        return StreamPosition.from_state_dict(pos)  # shard streams: every reader's state too
    return StreamPosition(epoch + 1, 0)  # the data is split differently now: next epoch afresh


def _train(cfg: Any, data: Any, classes: list[str], model: torch.nn.Module, out: Path, start: RunStart,
           *, device: torch.device) -> None:  # fmt: skip
    t, ckpt = cfg.train, start.state
    rank, world = dist_utils.rank(), dist_utils.world_size()
    on_cuda = device.type == "cuda"
    if on_cuda and t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model_ddp = wrap_ddp(model, device, find_unused=_find_unused(cfg))
    optimizer = build_sgd(model.parameters(), t)
    scheduler = build_lr_scheduler(optimizer, warmup_steps=t.warmup_steps, milestones=_milestones(t),
                                   warmup_factor=t.warmup_factor,
                                   cosine_steps=t.steps if t.lr_schedule == "cosine" else None)  # fmt: skip
    scaler = build_scaler(device, t)
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
    accum = getattr(t, "accum_steps", 1)
    stream = BatchStream(data.dataset, collate_fn=data.collate_fn, batch_size=t.batch_size, seed=cfg.seed,
                         rank=rank, world_size=world, start=position, num_workers=cfg.data.num_workers,
                         pin_memory=on_cuda)  # fmt: skip
    logger = MetricLogger(out, enabled=rank == 0)
    logger.resume_from(step)
    if rank == 0:
        accum_text = f" ({t.batch_size}x{world}x{accum} accumulated)" if accum > 1 else ""
        print(
            f"predet pretrain: {len(classes)} classes, data {dict(getattr(data, 'counts', {}))}, "
            f"device {device}, world size {world}, global batch {global_batch(t, world)}{accum_text}, "
            f"lr {t.lr:g} ({_schedule_text(t)}), steps {step}->{stop} of {t.steps}, run {out}",
            flush=True,
        )

    def extra_state() -> dict[str, Any]:
        position = {**stream.state_dict(), "batch_size": t.batch_size, "world_size": world}  # a collective
        return {"data_position": position, "classes": classes, "config": to_dict(cfg), "world_size": world}

    checkpointer = Checkpointer(
        out, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
        every=cfg.ckpt.every, keep_last=cfg.ckpt.keep_last, extra_state=extra_state, last_good=start.path,
    )  # fmt: skip
    views_cl = ("view1", "view2") if on_cuda and t.channels_last else ()
    skipped = [0]  # unreadable images the loaders passed over, this rank
    batches = _inputs(stream, device, views_cl, skipped, always_detect=world > 1)
    run_loop(
        model_ddp, batches, optimizer, scheduler, start=step, stop=stop, logger=logger,
        checkpointer=checkpointer, log_every=t.log_every, images_per_step=global_batch(t, world),
        scaler=scaler, clip_grad=t.clip_grad, progress=rank == 0,
        evaluate=_heldout_evaluator(cfg, data, model), eval_every=t.eval_every or cfg.ckpt.every,
        log_window=restore_log_window(ckpt.get("log_window")) if ckpt is not None else None,
        autocast=autocast_factory(device, t), accum_steps=accum,
    )  # fmt: skip
    logger.close()
    _report_skipped(skipped[0], device)
    _check_ranks_agree(model, out, world=world, is_main=rank == 0)


def _heldout_evaluator(cfg: Any, data: Any, model: torch.nn.Module) -> Optional[Any]:
    """Rank 0's ``cls_map`` on the held-out slice, when the classification loss is on."""
    heldout = getattr(data, "heldout", None)
    if dist_utils.rank() != 0 or not cfg.loss.cls or heldout is None:
        return None
    from predet.analysis.cls_map import ClsEvaluator

    evaluator = ClsEvaluator(heldout.paths, heldout.tags, heldout.truth, input_size=cfg.model.input_size)
    return functools.partial(evaluator, model)


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
