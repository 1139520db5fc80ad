"""Certified lower bounds on robustness: IBP and CROWN through ReLUs, caps and clamps.

Written for this package (no bound-propagation library is usable on its stack) after Gowal et
al. 2018 (IBP, arXiv 1810.12715), Zhang et al. 2018 (CROWN, arXiv 1811.00866) and Zhang et al.
2020 (CROWN-IBP, arXiv 1906.06316). See docs/certification.md.
"""

from .api import METHODS, ROUNDING_UNITS, certified_margins, certify, interval_widths, margin_tolerance
from .bounds import Ball, Bounds, clip_relaxation, margin_spec
from .graph import SUPPORTED, BoundGraph, UnsupportedOpError, compile_model
from .losses import bound_loss, certified_schedule

__all__ = [
    "METHODS",
    "ROUNDING_UNITS",
    "SUPPORTED",
    "Ball",
    "BoundGraph",
    "Bounds",
    "UnsupportedOpError",
    "bound_loss",
    "certified_margins",
    "certified_schedule",
    "certify",
    "clip_relaxation",
    "compile_model",
    "interval_widths",
    "margin_spec",
    "margin_tolerance",
]
