"""Per-image state of a pre-training set in flat arrays: memory that does not grow with Python
objects per image (DESIGN §5).

- :class:`StringArray`: strings as one UTF-8 byte buffer + int64 offsets (``len + 1``);
- :class:`Ragged`: per-image int32 values (class indices) as one flat array + int64 offsets;
- :class:`ImageQueries`: per image, ``(source, start, stop)`` rows into the memory-mapped query
  cache files (:class:`~predet.data.queries.BoxFiles`) or into the manifest lines' own boxes.

All three are read-only after building, pickle as a handful of arrays, and are shared
copy-on-write by forked loader workers (numpy arrays hold no per-item reference counts).
The builders are append-only (``array`` / ``bytearray``) and ``select`` keeps an ordered subset
with boolean masks, so building never holds a Python object per image either.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import numpy as np

__all__ = ["StringArray", "StringArrayBuilder", "Ragged", "ImageQueries", "NO_QUERIES", "offsets_of"]

NO_QUERIES = -1  # an ImageQueries source: the image has no query box


def offsets_of(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def _select_ragged(values: np.ndarray, offsets: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows ``keep`` (bool, one per row) of a ragged array, in order."""
    counts = np.diff(offsets)
    return values[np.repeat(keep, counts)], offsets_of(counts[keep])


class StringArray:
    """Read-only sequence of strings in one byte buffer (``data`` uint8) + offsets (int64)."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray) -> None:
        self.data, self.offsets = data, offsets

    @classmethod
    def from_strings(cls, strings: Iterable[str]) -> "StringArray":
        builder = StringArrayBuilder()
        for s in strings:
            builder.append(s)
        return builder.build()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.data[a:b].tobytes().decode("utf-8", "surrogatepass")

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        """Equal to a StringArray or a list / tuple of the same strings."""
        if isinstance(other, StringArray):
            return np.array_equal(self.offsets, other.offsets) and np.array_equal(self.data, other.data)
        if isinstance(other, (list, tuple)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def select(self, keep: np.ndarray) -> "StringArray":
        return StringArray(*_select_ragged(self.data, self.offsets, keep))

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.offsets.nbytes


class StringArrayBuilder:
    def __init__(self) -> None:
        self._data, self._offsets = bytearray(), array("q", [0])

    def append(self, s: str) -> None:
        self._data += s.encode("utf-8", "surrogatepass")
        self._offsets.append(len(self._data))

    def build(self) -> StringArray:
        return StringArray(np.frombuffer(bytes(self._data), np.uint8), np.frombuffer(self._offsets, np.int64).copy())


@dataclass
class Ragged:
    """Per-row int32 values: row ``i`` is ``values[offsets[i]:offsets[i + 1]]``."""

    values: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    @classmethod
    def from_lists(cls, rows: Iterable[Iterable[int]]) -> "Ragged":
        values, counts = array("i"), array("q")
        for r in rows:
            n = len(values)
            values.extend(int(v) for v in r)
            counts.append(len(values) - n)
        return cls(np.frombuffer(values, np.int32).copy(), offsets_of(np.frombuffer(counts, np.int64)))

    def select(self, keep: np.ndarray) -> "Ragged":
        return Ragged(*_select_ragged(self.values, self.offsets, keep))

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.offsets.nbytes


@dataclass
class ImageQueries:
    """Query boxes per image without a copy of the cache: ``rows[i] = (source, start, stop)``.

    ``source`` ``k < len(files.files)``: rows ``start:stop`` of cache file ``k``; ``source ==
    len(files.files)`` (or any source when ``files`` is None): rows of ``inline`` (boxes given on
    the manifest lines); :data:`NO_QUERIES`: none.
    """

    rows: np.ndarray  # (N, 3) int64
    files: Optional["BoxFiles"]  # noqa: F821  (predet.data.queries, imported lazily)
    inline: np.ndarray  # (M, 4) float32

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> np.ndarray:
        """Boxes ``(K, 4)`` float32 XYXY of image ``i`` (a copy)."""
        source, a, b = (int(v) for v in self.rows[i])
        if source == NO_QUERIES:
            return np.zeros((0, 4), np.float32)
        if self.files is not None and source < len(self.files.files):
            return self.files.get(source, a, b)[0]
        return np.array(self.inline[a:b], np.float32)

    def count(self, i: int) -> int:
        return int(self.rows[i, 2] - self.rows[i, 1])

    def select(self, keep: np.ndarray) -> "ImageQueries":
        return ImageQueries(self.rows[keep], self.files, self.inline)

    @property
    def nbytes(self) -> int:
        """Bytes held per process (the mapped cache files are shared and not counted)."""
        return self.rows.nbytes + self.inline.nbytes
