"""``torch:Square``: the score-based L-inf Square attack of Andriushchenko et al. (2020) in plain
torch, written for speed on the few samples a cascade leaves it and with per-sample random draws.

What follows the paper (and AutoAttack's version of it): the margin loss on the logits (true
logit minus the best other, minimised; targeted: best other minus the target's); the
vertical-stripe start (every column of every channel at ``x - eps`` or ``x + eps``, clipped to
the bounds); then one random square per sample per query, whose pixels move to ``x +- eps``
with one random sign per channel, drawn again if that would leave the square unchanged (the
paper's code); the new point is kept if its margin is lower; a sample stops at its first
misclassification. The side of the square follows the paper's schedule of ``p`` (the fraction
of pixels it covers: ``p_init`` halved at 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of
10000 iterations, rescaled to the query budget) with AutoAttack's ``p_init=0.8``. The start is
the first query; a sample spends at most ``queries`` forward passes after one on the clean input
(an already misclassified sample is returned as it is, as in AutoAttack).

Our own design: every sample draws from its own generator (:meth:`CallContext.generators`), in
blocks of a fixed number of queries, so its trajectory does not depend on which other samples
share the call (torchattacks draws one square per query for all the call's samples); the redraw
of an unchanged square flips every channel's sign instead of drawing again (the same
distribution for one channel); squares may sit at every position, including the last row and
column; the batch is kept in fixed tensors that shrink only when a sample is broken, the
squares are computed ahead for chunks of queries, and a query costs about 20 small tensor
operations besides the model's forward, none of them a Python branch or a copy of the state
(no cross-entropy, no row gathers; every selection is a ``torch.lerp`` with 0/1 weights, which
is exact and several times faster than ``torch.where`` with a bool mask on CPU; the unchanged
square's redraw flips the signs of the rows that need it instead of branching). Inputs that are not ``(N, C, H, W)`` are searched as ``(N, 1, H, W)`` or
``(N, 1, 1, D)`` (as torchattacks does), with windows of the same area clipped to that layout.
L2 is not implemented: the standard suite keeps the library Square for L2.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..attacks import Attack, Native

__all__ = ["P_INIT", "Square", "p_schedule", "square"]

#: AutoAttack's default ``p_init`` for L-inf (Croce and Hein 2020).
P_INIT = 0.8
#: Queries whose random draws a sample makes at once (fixed: a sample's stream of draws must not
#: depend on anything but its own generator).
_BLOCK = 100
#: Elements of the precomputed windows held at once (a memory bound; results do not depend on it).
_CHUNK_ELEMENTS = 2**18
#: (iteration out of 10000, divisor of p_init from there on): the paper's schedule of p.
_HALVINGS = ((10, 2), (50, 4), (200, 8), (500, 16), (1000, 32), (2000, 64), (4000, 128),
             (6000, 256), (8000, 512))


def p_schedule(iteration: int, queries: int, p_init: float = P_INIT) -> float:
    """Fraction of the pixels the square covers at ``iteration`` (0 = the first query after the
    start) of a run of ``queries`` queries: the paper's schedule, rescaled to 10000 iterations."""
    it = int(iteration / queries * 10000)
    divisor = 1
    for bound, d in _HALVINGS:
        if it > bound:
            divisor = d
    return p_init / divisor


def _window(p: float, h: int, w: int) -> tuple[int, int]:
    """Height and width of the window covering a fraction ``p`` of an (h, w) layout: a square of
    side ``round(sqrt(p h w))`` (at least 1), clipped to the layout with the same area."""
    side = max(int(round(math.sqrt(p * h * w))), 1)
    sh = min(side, h)
    return sh, min(w, max(1, int(round(side * side / sh))))


def _image(x: Tensor) -> Tensor:
    if x.dim() == 4:
        return x
    if x.dim() == 3:
        return x.unsqueeze(1)
    return x.reshape(len(x), 1, 1, -1)


class _Rows:
    """The unbroken samples' state: one row per sample, gathered again only when one breaks."""

    def __init__(self, **tensors: Tensor):
        self.__dict__.update(tensors)

    def keep(self, mask: Tensor, dim: int = 0) -> None:
        for name, value in list(self.__dict__.items()):
            self.__dict__[name] = value[mask] if dim == 0 else value[:, mask]


def square(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    queries: int = 5000,
    p_init: float = P_INIT,
    bounds: tuple[float, float] = (0.0, 1.0),
    target: Tensor | None = None,
    generators: Sequence[torch.Generator] | None = None,
) -> Tensor:
    """L-inf Square attack on ``x`` (N, ...) with labels ``y`` (N,): adversarial examples (N, ...).

    ``generators`` (one CPU generator per sample) make each sample's draws its own; ``None``
    seeds one per sample from the global generator. Samples the model already misclassifies
    (or, targeted, already puts in ``target``) are returned unchanged; the others return their
    first misclassified point, or the point of lowest margin after ``queries`` queries.
    """
    n, shape = len(x), x.shape
    xi = _image(x.detach())
    c, h, w = xi.shape[1:]
    if generators is None:
        generators = [torch.Generator().manual_seed(int(torch.randint(2**62, ()))) for _ in range(n)]
    if len(generators) != n:
        raise ValueError(f"{len(generators)} generators for {n} samples: pass one per sample")
    label = (target if target is not None else y).to(x.device)
    lo, hi = bounds
    rows_h = torch.arange(h, device=x.device)
    rows_w = torch.arange(w, device=x.device)
    iterations = queries - 1

    def margin(t: Tensor, lab: Tensor, others: Tensor, logits: Tensor | None = None) -> Tensor:
        """The margin (rows, 1, 1, 1) of the inputs ``t`` (rows, C, H, W), or of their ``logits``."""
        logits = (model(t) if x.dim() == 4 else model(t.view(len(t), *shape[1:]))) if logits is None else logits
        logits = logits[:, :, None, None]
        if target is None:
            return logits.gather(1, lab) - (logits + others).amax(1, keepdim=True)
        return (logits + others).amax(1, keepdim=True) - logits.gather(1, lab)

    with torch.no_grad():
        out = xi.clone()
        logits = model(x)
        others = torch.zeros_like(logits).scatter_(1, label[:, None], -math.inf)[:, :, None, None]
        lab = label[:, None, None, None]
        todo = (margin(xi, lab, others, logits) > 0).flatten()
        gens = [g for g, t in zip(generators, todo.tolist()) if t]
        if not gens:
            return out.reshape(shape)
        stripes = torch.stack([torch.rand((c, 1, w), generator=g) < 0.5 for g in gens]).to(x.device)
        s = _Rows(idx=todo.nonzero().flatten(), x_lo=(xi[todo] - eps).clamp(lo, hi),
                  x_hi=(xi[todo] + eps).clamp(lo, hi), lab=lab[todo], others=others[todo])
        s.best = torch.where(stripes, s.x_hi, s.x_lo)
        s.margin = margin(s.best, s.lab, s.others)

        def drop_broken() -> Tensor | None:
            """Write the broken samples out and drop their rows: the rows kept, or ``None`` if
            none is left."""
            broken = (s.margin <= 0).flatten()
            keep = ~broken
            if bool(broken.any()):
                out[s.idx[broken]] = s.best[broken]
                s.keep(keep)
                gens[:] = [g for g, k in zip(gens, keep.tolist()) if k]
            return keep if gens else None

        left_over = drop_broken() is not None
        for start in range(0, iterations, _BLOCK):
            if not left_over:
                break
            block = min(_BLOCK, iterations - start)
            draws = torch.stack([torch.rand((_BLOCK, 2 + c), generator=g) for g in gens]).to(x.device)
            draws = draws[:, :block].transpose(0, 1)
            windows = [_window(p_schedule(start + j, queries, p_init), h, w) for j in range(block)]
            sh = torch.tensor([a for a, _ in windows], device=x.device)[:, None]
            sw = torch.tensor([b for _, b in windows], device=x.device)[:, None]
            top = (draws[..., 0] * (h - sh + 1)).long()
            left = (draws[..., 1] * (w - sw + 1)).long()
            dtype = s.best.dtype
            in_h = ((rows_h >= top[..., None]) & (rows_h < (top + sh)[..., None])).to(dtype)
            in_w = ((rows_w >= left[..., None]) & (rows_w < (left + sw)[..., None])).to(dtype)
            pre = _Rows(in_h=in_h[..., None], in_w=in_w[..., None, :], up=(draws[..., 2:] < 0.5).to(dtype)[..., None, None])
            chunk = max(1, _CHUNK_ELEMENTS // (len(gens) * h * w))
            best, marg, x_lo, x_hi, lab, others = s.best, s.margin, s.x_lo, s.x_hi, s.lab, s.others
            weight = torch.empty_like(marg)
            for j in range(block):
                if j % chunk == 0:
                    pre.window = (pre.in_h[j:j + chunk] * pre.in_w[j:j + chunk])[:, :, None]
                window, up = pre.window[j % chunk], pre.up[j]
                change = (torch.lerp(x_lo, x_hi, up) - best).mul_(window).abs_().amax((1, 2, 3), keepdim=True)
                up = (up - torch.eq(change, 0, out=weight)).abs_()
                new = torch.lerp(best, torch.lerp(x_lo, x_hi, up), window)
                value = margin(new, lab, others)
                best = torch.lerp(best, new, torch.lt(value, marg, out=weight))
                marg = torch.minimum(value, marg)
                if float(marg.min()) <= 0:
                    s.best, s.margin = best, marg
                    keep = drop_broken()
                    if keep is None:
                        left_over = False
                        break
                    pre.keep(keep, dim=1)
                    best, marg, x_lo, x_hi, lab, others = s.best, s.margin, s.x_lo, s.x_hi, s.lab, s.others
                    weight = torch.empty_like(marg)
            s.best, s.margin = best, marg
        out[s.idx] = s.best
    return out.reshape(shape)


class Square(Attack):
    """``torch:Square``: :func:`square` with the query budget ``threat_model.steps`` per run and
    ``threat_model.restarts`` runs (each on the samples not yet broken); override ``p_init``."""

    library = "torch"
    family = "Square"
    native_name = "Square"
    norms = ("Linf",)

    def _mapped_parameters(self) -> dict[str, str]:
        return {"queries": "steps"}

    def _accepted_overrides(self) -> list[str]:
        return ["p_init"]

    def _check_overrides(self) -> None:
        super()._check_overrides()
        p = self.overrides.get("p_init", P_INIT)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"{self.name}: p_init must be a number in (0, 1] (the fraction of the "
                             f"pixels the first squares cover; default {P_INIT}), got {p!r}")

    def _kwargs(self) -> dict:
        tm = self.threat_model
        return dict(queries=tm.steps, p_init=float(self.overrides.get("p_init", P_INIT)), bounds=tm.bounds)

    def _run(self, model, x, y, eps, target, ctx):
        return square(model, x, y, eps, target=target, generators=ctx.generators(len(x)), **self._kwargs())

    def _native(self, model, eps, *, input_shape, num_classes):
        return Native(model, functools.partial(square, **self._kwargs()), {"eps": eps})
