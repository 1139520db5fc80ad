"""Bound losses for certified training: IBP (Gowal et al. 2018) and CROWN-IBP (Zhang et al. 2020).

Both minimise the cross-entropy of the negated margin lower bounds ``-m`` (``m_y = 0``), the
worst-case logits of Gowal et al., mixed with the clean loss by ``kappa``:
``kappa * CE(f(x), y) + (1 - kappa) * CE(-m, y)``. CROWN-IBP's margin is
``beta * m_crown_ibp + (1 - beta) * m_ibp``. :func:`certified_schedule` gives eps, kappa and beta
per step: a warm-up on clean data, then eps ramps linearly from 0 to its target while kappa goes
from 1 to ``kappa_end`` and beta from 1 to 0 (the schedules of both papers; the step counts are
arguments, as the papers tune them per data set).
"""

from __future__ import annotations

from dataclasses import dataclass


import torch.nn.functional as F
from torch import Tensor, nn

from .bounds import Ball, Bounds, margin_spec
from .graph import BoundGraph, compile_model

__all__ = ["Schedule", "bound_loss", "certified_schedule"]


@dataclass(frozen=True)
class Schedule:
    """eps, kappa and beta of one training step."""

    eps: float
    kappa: float
    beta: float


def certified_schedule(step: int, total: int, eps: float, warmup: float = 0.1, ramp: float = 0.5,
                       kappa_end: float = 0.5) -> Schedule:
    """The schedule at ``step`` of ``total``: ``warmup`` (fraction) clean steps, then ``ramp``
    (fraction) of linear ramp of eps 0 -> ``eps``, kappa 1 -> ``kappa_end``, beta 1 -> 0; then
    constant."""
    w, r = int(warmup * total), max(int(ramp * total), 1)
    t = min(max((step - w) / r, 0.0), 1.0) if step >= w else 0.0
    return Schedule(eps=t * eps, kappa=1.0 - t * (1.0 - kappa_end), beta=1.0 - t)


def bound_loss(model: nn.Module, x: Tensor, y: Tensor, schedule: Schedule, method: str = "ibp",
               norm: str = "Linf", bounds: tuple[float, float] = (0.0, 1.0),
               graph: BoundGraph | None = None) -> tuple[Tensor, Tensor]:
    """The certified-training loss of a batch and its clean logits (for accuracy).

    ``method`` is ``"ibp"`` or ``"crown_ibp"``. Gradients flow through the bounds into the
    weights (and learnable caps). Pass ``graph`` (from :func:`compile_model`) to skip tracing.
    """
    if method not in ("ibp", "crown_ibp"):
        raise ValueError(f"bound loss method must be 'ibp' or 'crown_ibp', got {method!r}")
    logits = model(x)
    clean = F.cross_entropy(logits, y)
    if schedule.eps <= 0 or schedule.kappa >= 1:
        return clean, logits
    graph = graph or compile_model(model, x[:1])
    spec = margin_spec(y, logits.shape[1], x.dtype)
    b = Bounds(graph, Ball(x, schedule.eps, norm, bounds))
    m = b.ibp_margin(spec, y)
    if method == "crown_ibp" and schedule.beta > 0:
        m = schedule.beta * b.crown_margin(spec) + (1 - schedule.beta) * m
    robust = F.cross_entropy(-m, y)
    return schedule.kappa * clean + (1 - schedule.kappa) * robust, logits


