"""Moved to :mod:`predet.modeling.detectors` (detector construction runs no loop); this name
stays while ``predet.engine.evaluate`` still imports it from here."""

from predet.modeling.detectors import ARCHS, InitReport, build_detector, init_widths, load_init, read_init

__all__ = ["ARCHS", "InitReport", "build_detector", "load_init", "read_init", "init_widths"]
