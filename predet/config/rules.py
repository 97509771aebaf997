"""The value rules the config sections' ``check()`` methods are written with.

Each raises a one-line :class:`~predet.errors.UserError` naming the dotted key and its value.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from predet.errors import UserError


def positive(section: str, obj: Any, keys: Sequence[str]) -> None:
    """Each of ``obj``'s ``keys`` is None or > 0."""
    for key in keys:
        value = getattr(obj, key)
        if value is not None and value <= 0:
            raise UserError(f"{section}.{key}: must be positive, got {value}")


def non_negative(section: str, obj: Any, keys: Sequence[str]) -> None:
    """Each of ``obj``'s ``keys`` is >= 0."""
    for key in keys:
        value = getattr(obj, key)
        if value < 0:
            raise UserError(f"{section}.{key}: must be >= 0, got {value}")


def fraction(section: str, obj: Any, keys: Sequence[str]) -> None:
    """Each of ``obj``'s ``keys`` is in (0, 1]."""
    for key in keys:
        value = getattr(obj, key)
        if not 0 < value <= 1:
            raise UserError(f"{section}.{key}: must be in (0, 1], got {value}")


def probability(section: str, obj: Any, keys: Sequence[str]) -> None:
    """Each of ``obj``'s ``keys`` is in [0, 1]."""
    for key in keys:
        value = getattr(obj, key)
        if not 0 <= value <= 1:
            raise UserError(f"{section}.{key}: must be in [0, 1], got {value}")


def span(key: str, value: Any, *, positive: bool = False, upper: Optional[float] = None) -> None:
    """``value`` is ``[lo, hi]`` with lo <= hi (and 0 < lo, hi <= upper when asked)."""
    v = list(value)
    ok = len(v) == 2 and v[0] <= v[1] and (not positive or v[0] > 0)
    if not ok or (upper is not None and v[1] > upper):
        bounds = (
            ("0 < " if positive else "") + "lo <= hi" + ("" if upper is None else f" <= {upper:g}")
        )
        raise UserError(f"{key}={v}: expected [lo, hi] with {bounds}")


def one_of(key: str, value: Any, choices: Sequence[str], what: str = "value") -> None:
    if value not in choices:
        raise UserError(f"{key}: unknown {what} '{value}' (choose from {', '.join(choices)})")


def device(key: str, name: str) -> None:
    """``auto``, ``cpu`` or ``cuda[:N]`` (whether that device exists: where it is used)."""
    if not (name in ("auto", "cpu") or name.startswith("cuda")):
        raise UserError(f"{key}={name!r}: expected auto, cpu or cuda")
