"""The training setup ``predet pretrain`` and ``predet finetune`` share, one policy each.

- **Learning rate**: ``train.lr`` when given, else the linear scaling rule (Goyal et al.):
  ``train.base_lr`` x global batch / ``train.base_batch``, the global batch counting every rank
  and every accumulated micro-batch; to 12 significant digits (``config.yaml`` records it).
- **Optimizer**: SGD with momentum and weight decay over the engine's parameter groups; the lr
  schedule is :func:`~predet.engine.common.build_lr_scheduler` (warm-up, then steps or cosine).
- **Precision**: autocast on CUDA when ``train.amp`` (``train.amp_dtype``, bfloat16 by default);
  a ``GradScaler`` only for float16. CPU runs in float32.
- **SyncBN** needs CUDA under torchrun: elsewhere ``model.norm=syncbn`` is a usage error, raised
  before the run folder is touched. A single process keeps SyncBatchNorm layers, which then act as
  BatchNorm.
- **DDP** under torchrun (``find_unused_parameters`` when part of the model gets no gradient).
- **Run folder and resume** (:func:`open_run`): ``--resume`` continues from ``last.pt`` (or the
  newest ``step_*.pt`` that loads), ``--resume auto`` does so when there is a checkpoint and
  starts the run otherwise: the one command torchrun restarts and Slurm requeues replay.
- **Another number of processes on resume** is allowed (torchrun's elastic ``--nnodes=1:4``
  restarts with the nodes it has): the step count, weights and optimizer continue; the data is
  re-split over the new ranks, each rank draws new RNG streams, and the lr follows the new global
  batch unless ``train.lr`` fixes it. A line says so.
- **Preemption** (:func:`run_loop`): SIGTERM / SIGUSR1 save at the step reached and exit
  (:mod:`predet.engine.preemption`).
"""

from __future__ import annotations

import contextlib
import functools
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from predet import distributed as dist_utils
from predet.engine.common import (
    checkpoint_path,
    find_resume_checkpoint,
    load_training_checkpoint,
    prepare_run_dir_all_ranks,
    remove_checkpoint_debris,
    scaled_lr,
)
from predet.engine.loop import train
from predet.engine.preemption import StopSignals
from predet.errors import UserError

__all__ = [
    "Resume",
    "RunStart",
    "resolve_lr",
    "global_batch",
    "build_sgd",
    "build_scaler",
    "autocast_factory",
    "check_syncbn",
    "wrap_ddp",
    "open_run",
    "prepare_run",
    "world_change_note",
    "resume_command",
    "run_loop",
]

Resume = Union[bool, str]  # False, True (--resume) or "auto" (--resume auto)


def global_batch(t: Any, world: int) -> int:
    """Images per optimizer step over all ranks and accumulated micro-batches."""
    return t.batch_size * world * getattr(t, "accum_steps", 1)


def resolve_lr(t: Any, world: int) -> float:
    """``t.lr`` when given, else ``t.base_lr`` x :func:`global_batch` / ``t.base_batch``, to 12
    significant digits."""
    if t.lr is not None:
        return float(t.lr)
    return float(f"{scaled_lr(t.base_lr, t.base_batch, global_batch(t, world)):.12g}")


def build_sgd(params: Any, t: Any, lr: Optional[float] = None) -> torch.optim.SGD:
    """SGD over ``params`` (tensors, or groups with their own ``lr``) at ``lr`` (default ``t.lr``)."""
    lr = t.lr if lr is None else lr
    return torch.optim.SGD(params, lr=lr, momentum=t.momentum, weight_decay=t.weight_decay)


def _amp_dtype(t: Any) -> torch.dtype:
    return torch.float16 if getattr(t, "amp_dtype", "bfloat16") == "float16" else torch.bfloat16


def build_scaler(device: torch.device, t: Any) -> torch.amp.GradScaler:
    """A float16 run's ``GradScaler`` (CUDA and ``train.amp``); a disabled one otherwise."""
    use = device.type == "cuda" and bool(t.amp) and _amp_dtype(t) == torch.float16
    return torch.amp.GradScaler("cuda" if use else "cpu", enabled=use)


def autocast_factory(device: torch.device, t: Any) -> Callable[[], Any]:
    """What :func:`~predet.engine.loop.train` calls around each forward."""
    if device.type != "cuda" or not t.amp:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device.type, dtype=_amp_dtype(t))


def check_syncbn(model: torch.nn.Module, device: torch.device) -> None:
    """SyncBatchNorm layers under torchrun off CUDA: a usage error (gloo has no SyncBN)."""
    if dist_utils.is_initialized() and device.type != "cuda":
        if any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()):
            raise UserError("model.norm=syncbn needs CUDA under torchrun; use model.norm=bn on CPU")


def wrap_ddp(model: torch.nn.Module, device: torch.device, *, find_unused: bool = False) -> torch.nn.Module:
    """``model`` in DDP under torchrun, else itself."""
    if not dist_utils.is_initialized():
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused,
    )


@dataclass
class RunStart:
    """What a launch does with its run folder: resume from ``path`` (``state`` loaded), or start
    (``overwrite``: clear the folder first)."""

    path: Optional[Path] = None
    state: Optional[dict[str, Any]] = None
    overwrite: bool = False

    @property
    def resuming(self) -> bool:
        return self.state is not None


def open_run(out: Path, *, resume: Resume, overwrite: bool) -> RunStart:
    """Decide, reading only, what this launch does with ``out`` (the same on every rank: rank 0
    decides, the others load the checkpoint it chose).

    ``--resume``: the checkpoint must exist. ``--resume auto``: resume when there is one; else
    start, in a folder that is absent, empty, or a predet run that never saved a checkpoint (its
    ``config.yaml`` and logs are replaced); any other folder is refused as without ``--resume``.
    """
    start, error = RunStart(), None
    if dist_utils.is_main():
        try:
            start = _decide(out, resume=resume, overwrite=overwrite)
        except UserError as e:
            error = str(e)
    error, path, clear = dist_utils.broadcast_object((error, start.path, start.overwrite))
    if error:
        raise UserError(error)
    if dist_utils.is_main():
        return start
    return RunStart(path, load_training_checkpoint(path) if path is not None else None, clear)


def _decide(out: Path, *, resume: Resume, overwrite: bool) -> Any:
    if not resume:
        return RunStart(overwrite=overwrite)
    if resume is True and not out.is_dir():
        raise UserError(f"--resume given but run folder {out} does not exist")
    found = find_resume_checkpoint(out) if out.is_dir() else None
    if found is not None:
        return RunStart(*found)
    if resume is True:
        raise UserError(
            f"--resume given but {out} holds no checkpoint ({checkpoint_path(out)} does not exist); "
            "use --resume auto to start it, or --overwrite to start over"
        )
    if out.is_dir() and any(out.iterdir()):
        if not (out / "config.yaml").is_file():
            raise UserError(
                f"--resume auto: run folder {out} holds neither a checkpoint nor a predet run "
                "(no config.yaml); choose another --out"
            )
        print(f"predet: {out} holds no checkpoint yet: starting the run there afresh", flush=True)
        return RunStart(overwrite=True)
    return RunStart()


def prepare_run(out: Path, start: RunStart) -> None:
    """Create or clear ``out`` as ``start`` says (every rank; rank 0 acts), and remove the
    temporary files a killed checkpoint writer left."""
    prepare_run_dir_all_ranks(out, resume=start.resuming, overwrite=start.overwrite)
    if dist_utils.is_main():
        debris = remove_checkpoint_debris(out)
        if debris:
            print(f"predet: removed {len(debris)} unfinished checkpoint file(s) a killed run left "
                  f"({', '.join(p.name for p in debris[:3])})", flush=True)  # fmt: skip


def world_change_note(saved_world: Optional[int], world: int, t: Any, *, lr_fixed: bool) -> Optional[str]:
    """The line a resume on another number of processes prints, or None (``t.lr`` resolved;
    ``lr_fixed``: the config gave it)."""
    if saved_world is None or saved_world == world:
        return None
    lr = f"lr {t.lr:g} as train.lr fixes it" if lr_fixed else f"lr {t.lr:g} for the new global batch"
    return (
        f"resuming a {saved_world}-process run on {world}: global batch "
        f"{global_batch(t, saved_world)} -> {global_batch(t, world)}, {lr}, the data re-split over "
        "the ranks and new RNG streams"
    )


def resume_command() -> str:
    """This process's command as a user retypes it to resume: ``--resume auto``, no
    ``--overwrite``."""
    args = list(sys.argv[1:])
    kept: list[str] = []
    skip = False
    for i, a in enumerate(args):
        if skip:
            skip = False
            continue
        if a == "--resume":
            skip = i + 1 < len(args) and args[i + 1] == "auto"
            continue
        if a in ("--overwrite", "--resume=auto"):
            continue
        kept.append(a)
    launcher = "torchrun ... -m predet" if dist_utils.world_size() > 1 else "predet"
    return f"{launcher} {shlex.join(kept)} --resume auto"


def run_loop(*args: Any, **kwargs: Any) -> None:
    """:func:`~predet.engine.loop.train` with SIGTERM / SIGUSR1 turned into a save and
    :class:`~predet.errors.Preempted` (see :mod:`predet.engine.preemption`)."""
    with StopSignals() as signals:
        train(*args, stop_signals=signals, resume_command=resume_command(), **kwargs)
