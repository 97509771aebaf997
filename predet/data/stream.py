"""Resumable, rank-split batch streams for step-based training loops (map-style or shards).

A training run is a number of *steps*, not epochs, so the loop pulls batches from one endless
stream. The stream's position (epoch, batches consumed in that epoch) is part of every
checkpoint, and a resumed run continues with exactly the batches the interrupted one would have
seen next:

- map-style datasets: each epoch is a permutation drawn from ``(seed, epoch)`` alone; rank ``r``
  of ``W`` takes every W-th item of it (as ``DistributedSampler``), cut to whole batches; resuming
  skips consumed batches *without loading them*. Indices travel as ``(epoch, index)`` pairs, so
  the dataset's ``set_epoch`` is applied inside the worker that loads the item and persistent
  workers see the right epoch;
- iterable datasets (WebDataset shards, an endless resampled stream): ``set_epoch(epoch)``
  before each pass. A dataset with ``resume(states, rotate)`` (:class:`~predet.data.datasets.
  ShardDataset`) puts each reader's state into its samples (``stream_state``, carried by the
  batch); the position keeps the state of every reader's last batch (``readers``), and a resumed
  stream continues each reader there: the batches of an uninterrupted run. Under torchrun each
  rank knows its own readers only: :meth:`BatchStream.state_dict` gathers them (a collective).
  Without reader states (another iterable dataset, an older checkpoint, another number of
  readers) a resumed run starts the *next* epoch's stream (a fresh, seeded draw of shards):
  deterministic, never a repeat of the consumed samples' order, but not the sample sequence an
  uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from predet.errors import UserError

__all__ = [
    "StreamPosition",
    "EpochIndexedDataset",
    "EpochBatchSampler",
    "StepBatchSampler",
    "BatchStream",
    "check_batch_fits",
]

log = logging.getLogger(__name__)


@dataclass
class StreamPosition:
    """Where a stream stands: ``batch`` batches of epoch ``epoch`` are consumed (per rank).

    ``readers`` (shard streams): ``{"streams": S, "states": {stream id: ReaderState dict}}``, the
    state of each reader once its last batch was taken; None for map-style datasets.
    """

    epoch: int = 0
    batch: int = 0
    readers: Optional[dict[str, Any]] = None

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"epoch": self.epoch, "batch": self.batch}
        if self.readers is not None:
            out["readers"] = self.readers
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "StreamPosition":
        """The position saved by :meth:`state_dict` (other keys are ignored)."""
        return cls(int(state.get("epoch", 0)), int(state.get("batch", 0)), state.get("readers"))


def check_batch_fits(num_items: int, batch_size: int, world_size: int) -> None:
    """UserError when the data cannot fill one step of every rank (``batch_size`` images each)."""
    if (num_items // world_size) // batch_size == 0:
        raise UserError(
            f"the dataset has {num_items} images, fewer than train.batch_size ({batch_size}) "
            f"x world size ({world_size}); lower train.batch_size"
        )


def epoch_permutation(num_items: int, *, seed: int, epoch: int) -> torch.Tensor:
    """The item order of ``epoch``: a function of ``(seed, epoch)`` only. LongTensor[num_items]."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_items, generator=g)


class EpochIndexedDataset(Dataset):
    """A map-style dataset with ``set_epoch``, indexed by ``(epoch, i)``.

    ``wrapped[(epoch, i)]`` is ``dataset[i]`` after ``dataset.set_epoch(epoch)``.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self._epoch: Optional[int] = None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        if epoch != self._epoch and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        self._epoch = epoch
        return self.dataset[index]


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless batches of ``(epoch, index)`` for one rank, starting at ``start``.

    Each epoch uses ``steps_per_epoch * batch_size * world_size`` items of the epoch's
    permutation (the tail that does not fill a batch on every rank is dropped, so all ranks take
    the same number of steps); rank ``r`` gets positions ``r, r + W, r + 2W, ...``.
    """

    def __init__(
        self,
        *,
        num_items: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start: StreamPosition = StreamPosition(),
    ) -> None:
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start
        check_batch_fits(num_items, batch_size, world_size)
        self.steps_per_epoch = (num_items // world_size) // batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, first = self.start.epoch, self.start.batch
        used = self.steps_per_epoch * self.batch_size * self.world_size
        while True:
            perm = epoch_permutation(self.num_items, seed=self.seed, epoch=epoch)
            mine = perm[self.rank : used : self.world_size].tolist()  # this rank's share, in order
            for b in range(first, self.steps_per_epoch):
                chunk = mine[b * self.batch_size : (b + 1) * self.batch_size]
                yield [(epoch, i) for i in chunk]
            epoch, first = epoch + 1, 0


class StepBatchSampler(Sampler):
    """Yields, for steps ``start..total-1``, this rank's batch as a list of ``(epoch, index)``
    (fine-tuning's order: a pure function of the step).

    The global stream is the concatenation of per-epoch permutations of ``range(num_items)``
    (:func:`epoch_permutation`, as :class:`EpochBatchSampler`'s); step ``s`` takes its items
    ``s*B*W .. (s+1)*B*W`` and rank ``r`` every W-th of them from ``r`` (the rank split of
    :class:`EpochBatchSampler`). Unlike it, epochs follow each other without dropping a tail, so
    a data set smaller than a batch wraps into the next epoch.
    """

    def __init__(
        self, *, num_items: int, batch_size: int, seed: int, start: int, total: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if num_items <= 0:
            raise UserError("the training set has no usable images")
        self.n, self.b, self.seed = num_items, batch_size, seed
        self.start, self.total, self.rank, self.world = start, total, rank, world_size
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)

    def _item(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, self.n)
        if epoch != self._perm_epoch:  # the pre-training stream's permutation of (seed, epoch)
            self._perm, self._perm_epoch = epoch_permutation(self.n, seed=self.seed, epoch=epoch), epoch
        return epoch, int(self._perm[offset])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.total):
            first = step * self.b * self.world + self.rank
            yield [self._item(first + k * self.world) for k in range(self.b)]

    def __len__(self) -> int:
        return self.total - self.start


class BatchStream:
    """Endless iterator of collated batches; ``position`` is updated as each batch is handed out.

    Args:
        dataset: map-style (with ``set_epoch``) or an ``IterableDataset``.
        collate_fn: list of samples -> batch dict.
        batch_size: images per rank per step.
        seed: the run's seed (epoch permutations; worker base seeds, per rank).
        rank, world_size: this process among all.
        start: position to resume from.
        num_workers, pin_memory: as ``DataLoader``; workers persist for map-style datasets.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        collate_fn: Callable[[list], Any],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start: StreamPosition = StreamPosition(),
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.position = StreamPosition(start.epoch, start.batch, start.readers)
        self._iterable = isinstance(dataset, IterableDataset)
        self._workers = max(1, num_workers)
        self._streams = world_size * self._workers  # readers of a shard stream, all ranks
        # the loader draws its workers' base seed from this generator, never from the global RNG,
        # so creating the stream does not shift the training loop's random numbers
        g = torch.Generator().manual_seed(seed * 7919 + rank)
        common = dict(
            collate_fn=collate_fn,
            num_workers=num_workers,
            pin_memory=pin_memory,
            generator=g,
            worker_init_fn=_seed_worker,
        )
        if self._iterable:
            self.steps_per_epoch = None
            self._dataset = dataset
            # re-created workers each epoch so that set_epoch reaches them
            self._loader = DataLoader(dataset, batch_size=batch_size, drop_last=True, **common)
        else:
            sampler = EpochBatchSampler(
                num_items=len(dataset),  # type: ignore[arg-type]
                batch_size=batch_size,
                seed=seed,
                rank=rank,
                world_size=world_size,
                start=start,
            )
            self.steps_per_epoch = sampler.steps_per_epoch
            self._loader = DataLoader(
                EpochIndexedDataset(dataset),
                batch_sampler=sampler,
                persistent_workers=num_workers > 0,
                **common,
            )

    def __iter__(self) -> Iterator[Any]:
        return self._iter_iterable() if self._iterable else self._iter_map()

    def _iter_map(self) -> Iterator[Any]:
        for batch in self._loader:
            epoch, b = self.position.epoch, self.position.batch + 1
            if b == self.steps_per_epoch:
                epoch, b = epoch + 1, 0
            self.position = StreamPosition(epoch, b)
            yield batch

    def _resume_readers(self) -> tuple[int, int, dict[int, dict]]:
        """(epoch, batches consumed in it, reader states) to start an iterable stream from."""
        pos, resumable = self.position, hasattr(self._dataset, "resume")
        readers = pos.readers or {}
        if resumable and pos.batch and readers.get("streams") == self._streams:
            return pos.epoch, pos.batch, {int(k): v for k, v in readers.get("states", {}).items()}
        if pos.batch:  # see the module docstring
            if resumable:
                log.warning("the shard stream's checkpoint has no reader states for %d readers: "
                            "resuming at the next epoch's stream (not exact)", self._streams)  # fmt: skip
            return pos.epoch + 1, 0, {}
        return pos.epoch, 0, {}

    def _iter_iterable(self) -> Iterator[Any]:
        epoch, n, states = self._resume_readers()
        resumable = hasattr(self._dataset, "resume")
        while True:
            if hasattr(self._dataset, "set_epoch"):
                self._dataset.set_epoch(epoch)
            if resumable:
                self._dataset.resume(states, rotate=n % self._workers)
            got = 0
            for batch in self._loader:
                state = batch.pop("stream_state", None) if isinstance(batch, dict) else None
                if state is not None:
                    states[int(state["stream"])] = {k: v for k, v in state.items() if k != "stream"}
                got, n = got + 1, n + 1
                readers = {"streams": self._streams, "states": dict(states)} if resumable else None
                self.position = StreamPosition(epoch, n, readers)
                yield batch
            if got == 0:
                raise UserError("the training shards yielded no complete batch")
            epoch, n, states = epoch + 1, 0, {}
            self.position = StreamPosition(epoch, 0, {"streams": self._streams, "states": {}} if resumable else None)

    def state_dict(self) -> dict[str, Any]:
        """:attr:`position` as saved in a checkpoint, with the reader states of every rank.

        Under torchrun this is a collective (every rank calls it, as a checkpoint save); a
        single process returns ``position.state_dict()``.
        """
        state = self.position.state_dict()
        if not self._iterable or self.position.readers is None:
            return state
        import torch.distributed as td

        if td.is_available() and td.is_initialized() and td.get_world_size() > 1:
            parts: list[Any] = [None] * td.get_world_size()
            td.all_gather_object(parts, self.position.readers["states"])
            merged = {k: v for p in parts for k, v in (p or {}).items()}
            state["readers"] = {"streams": self._streams, "states": merged}
        return state


def _seed_worker(worker_id: int) -> None:
    """Seed python/numpy in a loader worker from torch's per-worker seed (torch seeds itself);
    SIGTERM / SIGUSR1 ignored (the main process saves and stops the run, see
    :mod:`predet.engine.preemption`)."""
    import random

    import numpy as np

    from predet.engine.preemption import ignore_stop_signals

    ignore_stop_signals()
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)
