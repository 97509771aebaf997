"""Pieces shared by the training loops: lr schedule, RNG state, metric logging, checkpoints.

Everything here is plain PyTorch and works the same on CPU, one GPU and under ``torchrun``:
only rank 0 writes files, but every rank can call these functions.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

from predet import distributed as dist_utils
from predet.errors import UserError
from predet.utils import flatten_keys, fsync_dir, load_checkpoint, prepare_run_dir, save_checkpoint

__all__ = [
    "scaled_lr",
    "uniform_milestones",
    "WarmupStepSchedule",
    "WarmupCosineSchedule",
    "build_lr_scheduler",
    "get_rng_state",
    "set_rng_state",
    "MetricLogger",
    "checkpoint_path",
    "save_training_checkpoint",
    "load_training_checkpoint",
    "NonFiniteLossError",
    "resolve_device",
    "to_device",
    "param_digest",
    "gather_digests",
]


# --------------------------------------------------------------------------------------------
# Learning rate
# --------------------------------------------------------------------------------------------
def scaled_lr(base_lr: float, base_batch: int, global_batch: int) -> float:
    """Linear scaling rule (Goyal et al.): ``base_lr * global_batch / base_batch``."""
    return base_lr * global_batch / base_batch


def uniform_milestones(total_steps: int, num_decays: int) -> list[int]:
    """``num_decays`` decay points splitting ``total_steps`` into ``num_decays + 1`` equal parts.

    The paper's "reduce by 0.1 in four uniform steps" for 540k iterations gives
    ``[108000, 216000, 324000, 432000]``.
    """
    return [round(total_steps * k / (num_decays + 1)) for k in range(1, num_decays + 1)]


def _warmup(step: int, warmup_steps: int, warmup_factor: float) -> float:
    """``warmup_factor`` at step 0 rising linearly to 1 at ``warmup_steps``, 1 from there on."""
    if step >= warmup_steps:
        return 1.0
    alpha = step / warmup_steps
    return warmup_factor * (1 - alpha) + alpha


class WarmupStepSchedule:
    """lr multiplier of step ``s`` (0-based): linear warm-up, then ``gamma`` at each milestone.

    ``factor(s) = w(s) * gamma ** #{m in milestones : m <= s}`` with
    ``w(s) = warmup_factor + (1 - warmup_factor) * s / warmup_steps`` for ``s < warmup_steps``
    and 1 after. A plain object (ints/floats only) so ``LambdaLR.state_dict()`` stores it and
    it loads with ``weights_only=True``.
    """

    def __init__(
        self,
        *,
        warmup_steps: int,
        milestones: Sequence[int],
        gamma: float = 0.1,
        warmup_factor: float = 0.001,
    ) -> None:
        self.warmup_steps = int(warmup_steps)
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = float(gamma)
        self.warmup_factor = float(warmup_factor)

    def __call__(self, step: int) -> float:
        decay = self.gamma ** sum(step >= m for m in self.milestones)
        return decay * _warmup(step, self.warmup_steps, self.warmup_factor)


class WarmupCosineSchedule:
    """lr multiplier of step ``s`` (0-based): linear warm-up, then a half cosine to 0 at
    ``total_steps`` (MoCo v2, MAE, dinov2's schedule).

    ``factor(s) = w(s)`` (as :class:`WarmupStepSchedule`) for ``s < warmup_steps``, then
    ``0.5 * (1 + cos(pi * (s - warmup_steps) / (total_steps - warmup_steps)))``, 0 from
    ``total_steps`` on. A plain object, as :class:`WarmupStepSchedule`.
    """

    def __init__(self, *, warmup_steps: int, total_steps: int, warmup_factor: float = 0.001) -> None:
        if total_steps <= warmup_steps:
            raise ValueError(f"cosine schedule: total_steps {total_steps} must exceed warmup_steps {warmup_steps}")
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.warmup_factor = float(warmup_factor)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return _warmup(step, self.warmup_steps, self.warmup_factor)
        t = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * t))


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    warmup_factor: float = 0.001,
    cosine_steps: Optional[int] = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step scheduler (call ``.step()`` after every optimizer step): x``gamma`` at each
    milestone, or with ``cosine_steps`` a cosine to 0 at that step (milestones unused)."""
    if cosine_steps is not None:
        schedule: Any = WarmupCosineSchedule(
            warmup_steps=warmup_steps, total_steps=cosine_steps, warmup_factor=warmup_factor
        )
    else:
        schedule = WarmupStepSchedule(
            warmup_steps=warmup_steps, milestones=milestones, gamma=gamma, warmup_factor=warmup_factor
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def restore_scheduler(
    scheduler: torch.optim.lr_scheduler.LambdaLR, optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]
) -> None:
    """Load a checkpoint's scheduler state but keep this run's schedule: the step count comes from
    the checkpoint, warm-up, milestones and base lr from the (possibly edited) config.
    ``LambdaLR.load_state_dict`` alone would update our schedule object in place with the saved
    one's fields (a None entry in ``lr_lambdas`` leaves it alone)."""
    schedule = scheduler.lr_lambdas[0]
    base_lrs = scheduler.base_lrs
    state = dict(saved)
    state["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)
    scheduler.load_state_dict(state)
    scheduler.base_lrs = base_lrs
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["initial_lr"], group["lr"] = base, base * schedule(scheduler.last_epoch)


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any], sections: Sequence[str]) -> list[str]:
    """``key: old -> new`` for each key under ``sections`` (e.g. ``["model", "loss"]``) whose value
    differs between two configs given as nested dicts."""
    a, b = flatten_keys(old), flatten_keys(new)
    keys = sorted(k for k in set(a) | set(b) if k.split(".")[0] in sections and a.get(k) != b.get(k))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys]


def check_state_fits(model: torch.nn.Module, state: Mapping[str, Any], path: str | Path, *, hint: str = "") -> None:
    """A checkpoint's ``state`` (a state dict) must fit ``model`` tensor for tensor, shape for
    shape; otherwise a one-line UserError naming the file, the first mismatches and ``hint``
    (e.g. the config keys that changed since the checkpoint was written)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(own[k].shape) != tuple(state[k].shape)]  # fmt: skip
    parts = [f"{len(v)} {what} (first: {v[0]})" for what, v in (
        ("tensors of the model missing from it", missing), ("tensors the model does not have", unexpected),
        ("shapes differ", shapes)) if v]  # fmt: skip
    if parts:
        raise UserError(f"{path}: does not fit this model: {'; '.join(parts)}" + (f"; {hint}" if hint else ""))


def prepare_run_dir_all_ranks(out: Path, *, resume: bool, overwrite: bool) -> None:
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


# --------------------------------------------------------------------------------------------
# RNG state (python, numpy, torch, cuda), as tensors/ints so checkpoints load with weights_only
# --------------------------------------------------------------------------------------------
def get_rng_state() -> dict[str, Any]:
    """This process's RNG states, in types ``torch.load(weights_only=True)`` accepts."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Metrics: RUN/metrics.jsonl + TensorBoard (RUN/tb), rank 0 only
# --------------------------------------------------------------------------------------------
class MetricLogger:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors it to TensorBoard.

    On a non-main rank every method is a no-op. ``resume_from(step)`` drops lines logged after
    ``step`` (written after the checkpoint a resumed run restarts from), so the file never holds
    two rows for the same step.
    """

    def __init__(
        self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True
    ) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only when used

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))

    def resume_from(self, step: int) -> None:
        if not self.enabled or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:  # a line cut by a crash mid-write
                continue
        self.path.write_text("".join(f"{line}\n" for line in keep))

    def log(self, row: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(dict(row)) + "\n")
        if self._tb is not None:
            step = int(row["step"])
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


# --------------------------------------------------------------------------------------------
# Checkpoints: RUN/checkpoints/step_<step>.pt and last.pt, atomic, weights_only on load
# --------------------------------------------------------------------------------------------
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "step")


def checkpoint_path(run_dir: str | Path, step: Optional[int] = None) -> Path:
    """``RUN/checkpoints/last.pt`` or, with ``step``, ``RUN/checkpoints/step_000400.pt``."""
    name = "last.pt" if step is None else f"step_{step:06d}.pt"
    return Path(run_dir) / "checkpoints" / name


def save_training_checkpoint(
    state: dict[str, Any], run_dir: str | Path, *, periodic: bool, keep_last: int = 0
) -> Path:
    """Write ``last.pt`` (and ``step_<step>.pt`` if ``periodic``), each atomically.

    ``keep_last > 0`` deletes the oldest periodic checkpoints beyond that many.
    Returns the path of ``last.pt``.
    """
    last = checkpoint_path(run_dir)
    if periodic:
        step_file = checkpoint_path(run_dir, state["step"])
        save_checkpoint(state, step_file)
        tmp = last.with_name(f".{last.name}.tmp{os.getpid()}")
        try:  # the same bytes under two names, stored once: every later write is temp + rename,
            try:  # so neither name is ever changed through the other
                os.link(step_file, tmp)
            except OSError as e:  # no hard links on this filesystem
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise
                shutil.copyfile(step_file, tmp)
            os.replace(tmp, last)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise UserError(f"no space left on the device of {last.parent} to write {last.name} "
                                f"(a copy of {step_file.name}); the earlier checkpoints are intact") from None
            raise
        fsync_dir(last.parent)
        if keep_last > 0:
            # by step number: as text, step_1000000 sorts before step_999999
            periodic_files = sorted(last.parent.glob("step_*.pt"), key=_step_of)
            for old in periodic_files[:-keep_last]:
                old.unlink()
    else:
        save_checkpoint(state, last)
    return last


def remove_checkpoint_debris(run_dir: str | Path) -> list[Path]:
    """Delete the temporary files a killed writer left in ``RUN/checkpoints`` (``.*.tmp<pid>``);
    returns them. Only call it when no process of the run is writing (at launch, on rank 0)."""
    folder = Path(run_dir) / "checkpoints"
    debris = sorted(folder.glob(".*.tmp*")) if folder.is_dir() else []
    for path in debris:
        with contextlib.suppress(OSError):
            path.unlink()
    return debris


def find_resume_checkpoint(run_dir: str | Path) -> Optional[tuple[Path, dict[str, Any]]]:
    """The checkpoint a resumed run starts from, loaded: ``last.pt``, or when it does not load
    (cut by a crash of the file system, say) the newest ``step_*.pt`` that does, with a line on
    stdout saying so. None when ``RUN/checkpoints`` holds no checkpoint; a UserError naming each
    file when none of them loads."""
    last = checkpoint_path(run_dir)
    steps = sorted(last.parent.glob("step_*.pt"), key=_step_of, reverse=True) if last.parent.is_dir() else []
    candidates = ([last] if last.is_file() else []) + steps
    failures = []
    for path in candidates:
        try:
            ckpt = load_training_checkpoint(path)
        except UserError as e:
            failures.append(str(e))
            continue
        if failures:
            print(f"predet: {failures[0]}; resuming from {path} instead", flush=True)
        return path, ckpt
    if failures:
        raise UserError(f"no checkpoint of {run_dir} loads: {'; '.join(failures)}")
    return None


def _step_of(path: Path) -> int:
    stem = path.stem.removeprefix("step_")
    return int(stem) if stem.isdigit() else -1


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint (``weights_only=True``); a truncated/foreign file: UserError."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise UserError(f"{path}: not a predet training checkpoint (got {type(ckpt).__name__})")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"{path}: not a predet training checkpoint (missing {', '.join(missing)})")
    return ckpt


# --------------------------------------------------------------------------------------------
# Loss checks, devices
# --------------------------------------------------------------------------------------------
class NonFiniteLossError(UserError):
    """A loss term became NaN/inf; the run stops before the optimizer step (weights stay good)."""


def resolve_device(name: str, what: str = "train.device") -> str:
    """``auto`` -> ``cuda`` if available else ``cpu``; anything else must be cpu or cuda[:i] with
    a GPU of that index here (``what``: the key or flag named in the error)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name) if name == "cpu" or name.startswith("cuda") else None
    except RuntimeError:
        device = None
    if device is None:
        raise UserError(f"{what}={name!r}: expected auto, cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{what}={name!r} but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{what}={name!r} but this machine has {torch.cuda.device_count()} GPU(s)")
    return name


def to_device(
    batch: Mapping[str, Any], device: torch.device, *, channels_last_keys: Iterable[str] = ()
) -> dict[str, Any]:
    """Move every tensor of a batch to ``device`` (non-blocking from pinned memory)."""
    cl = set(channels_last_keys)
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if key in cl:
                value = value.contiguous(memory_format=torch.channels_last)
        out[key] = value
    return out


def param_digest(model: torch.nn.Module) -> str:
    """sha1 of every parameter's bytes, in ``named_parameters`` order (compares DDP ranks)."""
    import hashlib

    h = hashlib.sha1()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def gather_digests(model: torch.nn.Module) -> list[str]:
    """Every rank's :func:`param_digest` (a one-element list in a single process)."""
    digest = param_digest(model)
    if not dist_utils.is_initialized():
        return [digest]
    out: list[Any] = [None] * dist_utils.world_size()
    torch.distributed.all_gather_object(out, digest)
    return out
