"""The training loop of ``predet pretrain`` and ``predet finetune`` (MAE's ``train_one_epoch``,
counted in steps): built objects in, one step after the other out.

Per step: ``outputs = model(*inputs)``; ``loss`` = the sum of every ``loss_*`` in ``outputs``;
backward, optional clipping; one read of every output, ``loss`` and the gradient norm from the
device, with the finiteness check of the outputs and ``loss`` on every rank (after the backward,
before the weights change); optimizer step, per-step lr schedule. Every output the model returns
(``loss_*`` terms and detached metrics alike) is averaged over the log window and over ranks and
written to ``metrics.jsonl`` with ``step``, ``lr`` (of the logged step), ``loss``, ``images_per_s``
and ``world_size``: a new loss or metric needs no edit here. Checkpoints every ``every`` steps and
at the end, through one :class:`Checkpointer`.

Same code on CPU, one GPU and under ``torchrun``: the finiteness flag is reduced every step (all
ranks stop together), the metric sums at log steps.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm

from predet import distributed as dist_utils
from predet.engine.common import (
    MetricLogger,
    NonFiniteLossError,
    checkpoint_path,
    get_rng_state,
    save_training_checkpoint,
    set_rng_state,
)
from predet.engine.preemption import StopSignals, exit_status
from predet.errors import Preempted, UserError
from predet.utils import seed_everything

__all__ = ["train", "Checkpointer", "restore_rng", "restore_log_window"]


class Checkpointer:
    """Writes ``RUN/checkpoints/last.pt`` (and ``step_<step>.pt`` every ``every`` steps).

    A checkpoint holds model, optimizer, scheduler and grad-scaler states, the step, every rank's
    RNG state (so each resumes its own stream) and ``extra_state()`` (e.g. the data position).
    Every rank calls :meth:`save` (the RNG states are gathered); rank 0 writes.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
        every: int,
        keep_last: int = 0,
        extra_state: Optional[Callable[[], dict[str, Any]]] = None,
        last_good: Optional[Path] = None,
    ) -> None:
        self.run_dir, self.every, self.keep_last = Path(run_dir), every, keep_last
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.extra_state = extra_state or dict
        self.last_good = last_good  # named in the error of a non-finite loss
        self.saved_step: Optional[int] = None  # the step of the last save of this process

    def save(self, step: int, log_window: Optional[dict[str, Any]] = None) -> None:
        """``log_window``: this rank's metrics window not yet logged (see :func:`train`), kept
        per rank beside the RNG states so that a resumed run logs the rows it would have."""
        mine = (get_rng_state(), log_window)
        per_rank: list[Any] = [mine]
        if dist_utils.is_initialized():  # a collective: every rank gets here
            per_rank = [None] * dist_utils.world_size()
            torch.distributed.all_gather_object(per_rank, mine)
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": step,
            "rng": [r for r, _ in per_rank],
            "log_window": [w for _, w in per_rank],
            **self.extra_state(),
        }
        error = None
        if dist_utils.is_main():
            try:
                save_training_checkpoint(state, self.run_dir, periodic=step % self.every == 0,
                                         keep_last=self.keep_last)  # fmt: skip
            except UserError as e:  # a full disk: every rank stops with the same line
                error = str(e)
        error = dist_utils.broadcast_object(error)  # also the barrier: the file is there for all
        if error:
            raise UserError(error)
        self.last_good = checkpoint_path(self.run_dir)  # on every rank: each names it in its errors
        self.saved_step = step


def restore_log_window(windows: Any) -> Optional[dict[str, Any]]:
    """This rank's unlogged metrics window from a checkpoint's ``log_window`` (one per rank), or
    None (a checkpoint without one, or of a run with another number of processes)."""
    rank, world = dist_utils.rank(), dist_utils.world_size()
    if isinstance(windows, list) and len(windows) == world and isinstance(windows[rank], dict):
        return windows[rank]
    return None


def restore_rng(rngs: Any, *, seed: int) -> None:
    """This rank's RNG state from a checkpoint's ``rng`` (one state per rank), or, when the run
    had another number of processes (or no state), fresh streams seeded by ``seed`` and the rank."""
    rank, world = dist_utils.rank(), dist_utils.world_size()
    if isinstance(rngs, dict):  # fine-tuning checkpoints before the shared loop: rank 0's only
        rngs = [rngs]
    if rngs is not None and len(rngs) == world:
        set_rng_state(rngs[rank])
        return
    if rngs is not None and rank == 0:
        print(f"predet: resuming a {len(rngs)}-process run on {world}: new RNG streams")
    seed_everything(seed * 1000 + rank + 1)


def train(
    model: nn.Module,
    batches: Iterator[Sequence[Any]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    start: int,
    stop: int,
    logger: MetricLogger,
    checkpointer: Checkpointer,
    log_every: int,
    images_per_step: int,
    scaler: Optional[torch.amp.GradScaler] = None,
    clip_grad: Optional[float] = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    progress: bool = True,
    evaluate: Optional[Callable[[], dict[str, float]]] = None,
    eval_every: int = 0,
    log_window: Optional[dict[str, Any]] = None,
    accum_steps: int = 1,
    stop_signals: Optional[StopSignals] = None,
    resume_command: str = "",
) -> None:
    """Train steps ``start+1 .. stop``.

    Args:
        model: what is called (a DDP wrapper or the module): ``model(*inputs) -> dict``.
        batches: yields each micro-batch's ``inputs``, already on the model's device.
        start, stop: steps already done, and the step to stop after.
        images_per_step: over all ranks and micro-batches (for ``images_per_s``).
        scaler: a float16 ``GradScaler`` (None: no scaling).
        autocast: returns the forward's autocast context.
        evaluate: held-out metrics (e.g. ``cls_map``), computed every ``eval_every`` steps and at
            ``stop``, logged with that step's row (or a row of their own between log steps).
        log_window: the metrics of the steps since the last logged row at ``start``, as saved in
            the checkpoint resumed from (:func:`restore_log_window`): the next row averages them
            too, as the uninterrupted run's does.
        accum_steps: micro-batches per optimizer step (gradient accumulation): each one's loss is
            divided by ``accum_steps``, DDP all-reduces the gradients of the last one only, and the
            logged values are the micro-batches' means.
        stop_signals: a SIGTERM / SIGUSR1 recorded there stops the run after the step it arrives
            in (every rank learns of it through the step's all-reduce): the checkpoint of that step
            is saved and :class:`~predet.errors.Preempted` raised, naming ``resume_command``.

    The gradient norm is read with the step's values; without a float16 ``GradScaler`` (which
    skips such steps itself) a non-finite one stops the run before the update, like a loss.
    """
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    params = [p for p in model.parameters() if p.requires_grad]
    window, window_start = _Window(), time.perf_counter()
    if log_window is not None:
        window = _Window.from_state(log_window["window"])
        window_start -= float(log_window["elapsed"])
    bar = tqdm(total=stop, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
    model.train()
    try:  # the bar ends its line before any error is printed
        for step in range(start + 1, stop + 1):
            checked, extra = _forward_backward(
                model, batches, optimizer, scaler, autocast, accum_steps
            )
            scaler.unscale_(optimizer)
            # logged in every run: how much clipping scales the step down (the norm before
            # clipping); without clipping, the norm alone (max_norm inf scales by 1)
            norm = torch.nn.utils.clip_grad_norm_(params, clip_grad or math.inf)
            # a float16 scaler's skipped steps have an inf norm: logged, not checked
            (extra if scaler.is_enabled() else checked)["grad_norm"] = norm
            # the step's one device -> host read (DDP's flags included), after the backward and
            # before the update: the backward is queued without waiting for the forward (issue
            # 11), and a non-finite loss or gradient still stops the run before it reaches the
            # weights. (A float16 run's GradScaler reads its inf flag in scaler.step once more.)
            values, stopping = _read_step_values(
                checked, step=step, last_good=checkpointer.last_good, extra=extra,
                stop=stop_signals is not None and stop_signals.requested,
            )  # fmt: skip
            scaler.step(optimizer)
            scaler.update()
            lr = optimizer.param_groups[0]["lr"]  # the lr this step used
            scheduler.step()
            bar.update(1)
            window.add(values)
            evals: dict[str, float] = {}
            if evaluate is not None and ((eval_every and step % eval_every == 0) or step == stop):
                t_eval = time.perf_counter()
                evals = evaluate()
                window_start += time.perf_counter() - t_eval  # images_per_s counts training only
            if step % log_every == 0 or step == stop:
                elapsed = time.perf_counter() - window_start
                row = {"step": step, "lr": lr, **window.means()}
                row["images_per_s"] = window.steps * images_per_step / max(elapsed, 1e-9)
                row["world_size"] = dist_utils.world_size()
                logger.log({**row, **evals})
                bar.set_postfix(loss=f"{row['loss']:.3f}", img_s=f"{row['images_per_s']:.1f}")
                window, window_start = _Window(), time.perf_counter()
            elif evals:
                logger.log({"step": step, **evals})
            if step % checkpointer.every == 0 or step == stop or stopping:
                t_save = time.perf_counter()
                checkpointer.save(step, {"window": window.state(), "elapsed": t_save - window_start})
                window_start += time.perf_counter() - t_save  # images_per_s counts training only
            if stopping and step < stop:
                _preempted(stop_signals, step, checkpointer, resume_command)
    finally:
        bar.close()


def _forward_backward(
    model: nn.Module,
    batches: Iterator[Sequence[Any]],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    autocast: Callable[[], contextlib.AbstractContextManager],
    accum_steps: int,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One step's forward and backward over ``accum_steps`` micro-batches; returns the values to
    check (every output and ``loss``, each the micro-batches' mean) and an empty ``extra``."""
    optimizer.zero_grad(set_to_none=True)
    if accum_steps == 1:  # the plain step, as it always was
        with autocast():
            outputs = model(*next(batches))
        loss = _total_loss(outputs)
        scaler.scale(loss).backward()
        return {**outputs, "loss": loss}, {}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    total: Any = 0.0
    for micro in range(accum_steps):
        sync = micro == accum_steps - 1 or not hasattr(model, "no_sync")  # DDP: all-reduce once
        with contextlib.nullcontext() if sync else model.no_sync():
            with autocast():
                outputs = model(*next(batches))
            loss = _total_loss(outputs) / accum_steps
            scaler.scale(loss).backward()
        total = total + loss.detach()
        for k, v in outputs.items():
            sums[k] = sums[k] + v.detach().float() if k in sums else v.detach().float()
            counts[k] = counts.get(k, 0) + 1
    means = {k: sums[k] / counts[k] for k in sums}  # a metric some micro-batches lack: over the rest
    return {**means, "loss": total}, {}


def _total_loss(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = sum(v.float() for k, v in outputs.items() if k.startswith("loss_"))
    if not isinstance(loss, torch.Tensor):
        raise RuntimeError(f"the model returned no loss_* term (got {sorted(outputs)})")
    return loss


def _preempted(signals: StopSignals, step: int, checkpointer: Checkpointer, command: str) -> None:
    """Raise :class:`Preempted` for a run stopped by ``signals`` at ``step`` (saved)."""
    how = f"; resume with: {command}" if command else "; resume with the same command and --resume auto"
    raise Preempted(
        f"{signals.name} at step {step}: saved {checkpointer.last_good}{how}",
        exit_status(signals.signum),
    )


def _read_step_values(
    outputs: dict[str, torch.Tensor],
    *,
    step: int,
    last_good: Optional[Path],
    extra: Optional[dict[str, torch.Tensor]] = None,
    stop: bool = False,
) -> tuple[dict[str, float], bool]:
    """This step's values as floats, read from the device at once with ``extra`` (logged, not
    checked: e.g. a float16 run's ``grad_norm`` is inf on the steps its scaler skips); a
    :class:`NonFiniteLossError` on every rank when any rank has a non-finite value in
    ``outputs``, naming the step and the first such term (``loss_*``, metrics, ``loss``, then
    ``grad_norm``: a loss before the gradient it makes non-finite, on any rank)."""
    names = sorted(outputs, key=lambda k: (not k.startswith("loss_"), k in ("loss", "grad_norm"), k == "grad_norm"))
    tensors = {**{k: outputs[k] for k in names}, **(extra or {})}
    stacked = torch.stack([v.detach().float().reshape(()) for v in tensors.values()])
    distributed = dist_utils.is_initialized()
    if distributed:  # two flags per step, reduced on the device and read with the values
        bad_flag = (~torch.isfinite(stacked[: len(names)])).any().float().reshape(1)
        stop_flag = torch.full((1,), float(stop), device=stacked.device)
        flags = torch.cat([bad_flag, stop_flag])
        torch.distributed.all_reduce(flags)  # so that all ranks stop together
        stacked = torch.cat([stacked, flags])
    values = stacked.tolist()
    if distributed:
        stop = values.pop() > 0  # a signal on any rank stops them all, after this step
    any_bad = values.pop() > 0 if distributed else False
    bad = next(((k, v) for k, v in zip(names, values) if not math.isfinite(v)), None)
    if any_bad:  # some rank has one: every rank learns which
        found: list[Any] = [None] * dist_utils.world_size()
        torch.distributed.all_gather_object(found, bad)
        # the cause before its effect: a rank's NaN loss makes every rank's reduced gradient NaN
        bad = min((b for b in found if b is not None), key=lambda b: b[0] == "grad_norm")
    if bad is not None:
        hint = f" (last good checkpoint: {last_good})" if last_good else " (no checkpoint written yet)"
        what = "gradient" if bad[0] == "grad_norm" else "loss"
        raise NonFiniteLossError(f"non-finite {what} at step {step}: {bad[0]}={bad[1]}{hint}")
    return dict(zip(tensors, values)), stop


class _Window:
    """Sums and counts of each logged key over the steps of a log window, reduced over ranks.

    A key some steps or ranks did not return (a batch without valid queries) is averaged over
    the (rank, step) pairs that had it."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.steps = 0

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.steps += 1

    def state(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "counts": dict(self.counts), "steps": self.steps}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "_Window":
        w = cls()
        w.sums = {str(k): float(v) for k, v in state["sums"].items()}
        w.counts = {str(k): int(v) for k, v in state["counts"].items()}
        w.steps = int(state["steps"])
        return w

    def means(self) -> dict[str, float]:
        parts = [(self.sums, self.counts)]
        if dist_utils.is_initialized():  # every rank logs at the same steps
            parts = [None] * dist_utils.world_size()
            torch.distributed.all_gather_object(parts, (self.sums, self.counts))
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for s, c in parts:
            for k in s:
                sums[k], counts[k] = sums.get(k, 0.0) + s[k], counts.get(k, 0) + c[k]
        order = ["loss", *sorted(k for k in sums if k.startswith("loss_")), *sorted(sums)]
        return {k: sums[k] / counts[k] for k in dict.fromkeys(order)}
