"""One place for torchrun / single-process handling.

Single process when ``RANK`` is unset; under ``torchrun`` it reads ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` and initialises the default process group (nccl on CUDA, gloo on CPU).
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Optional

import torch
import torch.distributed as dist


def env_rank() -> tuple[int, int]:
    """(rank, world_size) from the environment, without needing a process group."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def local_gpu(device: str) -> int:
    """The GPU index this process takes: its ``LOCAL_RANK`` under torchrun (an index in ``device``
    is not used there), else the index ``device`` names (``cuda:1``), else 0."""
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return (torch.device(device).index or 0) if device.startswith("cuda") else 0


def init(device: str = "auto", *, timeout_s: Optional[float] = None) -> torch.device:
    """Initialise distributed mode if launched by torchrun; return this process's device.

    Its GPU is :func:`local_gpu`'s. ``timeout_s`` (``train.dist_timeout_s``) bounds the wait of
    the rendezvous and of every collective: a rank that died makes the others fail after that long,
    not after the backend's default (10 min for NCCL, 30 min for gloo), so torchrun can restart
    the group."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    local_rank = local_gpu(device)
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", 1)) > 1 and not is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
        backend = "nccl" if use_cuda else "gloo"
        store = _restart_store(timeout)
        if store is None:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            rank_, world = env_rank()
            dist.init_process_group(backend=backend, store=store, rank=rank_, world_size=world, timeout=timeout)
    return dev


def _restart_store(timeout: Optional[datetime.timedelta]) -> Optional[dist.Store]:
    """Under torchrun, the agent's store with keys of this restart only, or None elsewhere.

    torchrun's workers share the store of its agent (``TORCHELASTIC_USE_AGENT_STORE``), which
    outlives a restart of the group; ``init_process_group`` keys the ranks' addresses the same way
    in every attempt, so after a restart a rank could read the address of a rank of the group
    that died, and gloo's connect fails ("Connection refused") or waits. A prefix with
    ``TORCHELASTIC_RESTART_COUNT`` gives each attempt its own keys."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_ADDR" not in os.environ:
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        is_master=False,
        timeout=timeout or datetime.timedelta(minutes=30),
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"predet/attempt_{attempt}", store)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else env_rank()[0]


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()
