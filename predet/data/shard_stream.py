"""A resumable reader of WebDataset tar shards: the shard stream's position is a few integers.

One reader per (rank, loader worker), its *stream* ``s`` of ``S`` (``s = rank * workers + worker``).
It draws shards (resampled: shard ``d`` of the endless draw is ``urls[rng(seed_s, d)]``; one pass:
``urls[s::S]`` in order), reads each shard's samples in order and passes them through a shuffle
buffer of ``shuffle`` samples (pick ``t`` takes the buffer's item ``rng(seed_s, t) % len(buffer)``,
the last item fills its place). Every random choice is a function of ``(seed_s, counter)``, so
the reader's whole state is :class:`ReaderState`: the shards drawn, the samples read from the
current one, the ``(draw, index)`` of each sample in the shuffle buffer, and the picks made.
Resuming re-reads the buffered samples (from their shards, skipping the other members without
reading them on local files) and goes on at the current shard's next sample: the sample sequence
of an uninterrupted run, at the cost of reading at most ``shuffle`` samples again.

Samples are grouped from tar members as WebDataset does (``KEY.EXT``: key up to the first dot of
the file name, extension lower-cased); a tar that cannot be read past some member ends that
shard with a warning (its earlier samples were used), as WebDataset's ``warn_and_continue``.
"""

from __future__ import annotations

import logging
import re
import tarfile
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from predet.errors import UserError

__all__ = ["ReaderState", "ShardReader", "read_tar"]

log = logging.getLogger(__name__)

_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


@dataclass
class ReaderState:
    """Where one reader stands (all plain ints, checkpointed as a dict)."""

    draws: int = 0  # shards started; the current one is draw ``draws - 1``
    offset: int = 0  # samples read from the current shard
    buffer: list[list[int]] = field(default_factory=list)  # (draw, index) per buffered sample, in order
    picks: int = 0  # samples taken out of the buffer (readable or not)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "buffer": [list(r) for r in self.buffer]}

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "ReaderState":
        if not d:
            return cls()
        return cls(int(d["draws"]), int(d["offset"]), [[int(a), int(b)] for a, b in d["buffer"]], int(d["picks"]))


def _open_tar(url: str) -> tarfile.TarFile:
    if "://" in url or url.startswith("pipe:"):
        import webdataset as wds

        return tarfile.open(fileobj=wds.gopen(url), mode="r|*")  # a stream: read in order
    return tarfile.open(url, mode="r:*")  # a file: members not wanted are skipped by seeking


def read_tar(url: str, *, start: int = 0, wanted: Optional[set[int]] = None) -> Iterator[tuple[int, dict]]:
    """``(index, sample)`` of the samples of shard ``url`` from ``start`` on (only those in
    ``wanted`` when given); a sample is ``{"__key__", "__url__", ext: bytes, ...}``. A read error
    ends the shard with a warning."""
    index, key, sample = -1, None, None
    last = max(wanted) if wanted else None
    try:
        with _open_tar(url) as tar:
            for member in tar:
                m = _KEY.match(member.name) if member.isfile() else None
                if m is None:
                    continue
                if m.group(1) != key:
                    if sample is not None:
                        yield index, sample
                    index, key, sample = index + 1, m.group(1), None
                    if last is not None and index > last:
                        return
                    if index >= start and (wanted is None or index in wanted):
                        sample = {"__key__": key, "__url__": url}
                if sample is not None:
                    sample[m.group(2).lower()] = tar.extractfile(member).read()
        if sample is not None:
            yield index, sample
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        log.warning("shard %s: unreadable after sample %d (%s: %s); going on with the next shard",
                    url, index, type(e).__name__, e)  # fmt: skip


class ShardReader:
    """Endless (``resampled``) or one-pass iterator of raw samples of stream ``stream`` of
    ``streams``, with its :class:`ReaderState` after each sample; see the module docstring.

    Yields ``(sample, state)``: ``state`` is a fresh dict (:meth:`ReaderState.to_dict`) telling
    where the stream stands once ``sample`` is taken; ``ShardReader(..., state=state)`` goes on
    with the next sample.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        seed: int,
        stream: int = 0,
        streams: int = 1,
        resampled: bool = True,
        shuffle: int = 256,
        state: Optional[dict] = None,
    ) -> None:
        self.urls, self.seed, self.resampled = list(urls), int(seed), resampled
        self.mine = self.urls if resampled else self.urls[stream::streams]
        self.shuffle = max(1, int(shuffle))
        self.state = ReaderState.from_dict(state)

    def shard(self, draw: int) -> Optional[str]:
        """The url of draw ``draw``; None past the end of a one-pass stream."""
        if self.resampled:
            return self.urls[int(np.random.default_rng([self.seed, 0, draw]).integers(len(self.urls)))]
        return self.mine[draw] if draw < len(self.mine) else None

    def _pick(self, n: int) -> int:
        return int(np.random.default_rng([self.seed, 1, self.state.picks]).integers(n)) if n > 1 else 0

    def _restore_buffer(self) -> list[dict]:
        """The samples of the saved buffer, read again from their shards."""
        by_draw: dict[int, set[int]] = {}
        for d, i in self.state.buffer:
            by_draw.setdefault(d, set()).add(i)
        found: dict[tuple[int, int], dict] = {}
        for d, wanted in by_draw.items():
            url = self.shard(d)
            for i, sample in read_tar(url, wanted=wanted) if url is not None else ():
                found[(d, i)] = sample
        lost = [tuple(r) for r in self.state.buffer if tuple(r) not in found]
        if lost:  # a shard changed since the checkpoint
            log.warning("resuming the shard stream: %d buffered samples are no longer in their shards", len(lost))
        self.state.buffer = [r for r in self.state.buffer if tuple(r) in found]
        return [found[tuple(r)] for r in self.state.buffer]

    def _raw(self) -> Iterator[tuple[list[int], dict]]:
        """``([draw, index], sample)`` in reading order, from the current shard's next sample on."""
        s, empty = self.state, 0
        if s.draws == 0:
            s.draws, s.offset = 1, 0
        while True:
            url = self.shard(s.draws - 1)
            if url is None:
                return
            got = False
            for i, sample in read_tar(url, start=s.offset):
                got, s.offset = True, i + 1
                yield [s.draws - 1, i], sample
            empty = 0 if got else empty + 1
            if self.resampled and empty > max(100, 4 * len(self.urls)):
                raise UserError(f"data.shards: {empty} shards drawn in a row had no readable sample")
            s.draws, s.offset = s.draws + 1, 0

    def __iter__(self) -> Iterator[tuple[dict, dict]]:
        samples = self._restore_buffer()
        refs, s = self.state.buffer, self.state
        raw = self._raw()
        while True:
            for ref, sample in raw:
                refs.append(ref)
                samples.append(sample)
                if len(samples) >= self.shuffle:
                    break
            if not samples:
                return
            k = self._pick(len(samples))
            sample = samples[k]
            samples[k], refs[k] = samples[-1], refs[-1]  # the last fills the hole: O(1), deterministic
            samples.pop()
            refs.pop()
            s.picks += 1
            yield sample, s.to_dict()
