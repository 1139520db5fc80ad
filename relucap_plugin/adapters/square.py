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
squares and their candidate values are computed ahead for blocks of queries, and a query costs
about 15-20 small tensor operations besides the model's forward (no cross-entropy, no row
gathers, float 0/1 selections instead of the slower ``torch.where`` with bool masks). Inputs that are not ``(N, C, H, W)`` are searched as ``(N, 1, H, W)`` or
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
#: Elements of the precomputed windows and candidates held at once (a memory bound; results do
#: not depend on it).
_CHUNK_ELEMENTS = 2**21
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


def _pick(first: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``a`` where ``first`` is 1, ``b`` where it is 0 (a float 0/1 tensor, broadcast): exact, and
    several times faster than ``torch.where`` with a bool mask on CPU."""
    return torch.addcmul(b * (1 - first), a, first)


class _Rows:
    """The unbroken samples' state: one row per sample, gathered again only when one breaks."""

    def __init__(self, **tensors: Tensor):
        self.__dict__.update(tensors)

    def keep(self, mask: Tensor) -> None:
        for name, value in list(self.__dict__.items()):
            self.__dict__[name] = value[mask]


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

    def forward(t: Tensor) -> Tensor:
        return model(t) if x.dim() == 4 else model(t.reshape(len(t), *shape[1:]))

    def margin(logits: Tensor, lab: Tensor, others: Tensor) -> Tensor:
        z_label = logits.gather(1, lab[:, None]).squeeze(1)
        z_other = (logits + others).amax(1)
        return z_other - z_label if target is not None else z_label - z_other

    with torch.no_grad():
        out = xi.clone()
        logits = forward(xi)
        others = torch.zeros_like(logits).scatter_(1, label[:, None], -math.inf)
        todo = margin(logits, label, others) > 0
        gens = [g for g, t in zip(generators, todo.tolist()) if t]
        stripes = [torch.rand((c, 1, w), generator=g) < 0.5 for g in gens]
        s = _Rows(idx=todo.nonzero().flatten(), x_lo=(xi[todo] - eps).clamp(lo, hi),
                  x_hi=(xi[todo] + eps).clamp(lo, hi), lab=label[todo], others=others[todo])
        if not gens:
            return out.reshape(shape)
        s.best = torch.where(torch.stack(stripes).to(x.device), s.x_hi, s.x_lo)
        s.margin = margin(forward(s.best), s.lab, s.others)

        def drop_broken() -> bool:
            """Write the broken samples out and drop their rows; whether any sample is left."""
            broken = s.margin <= 0
            if bool(broken.any()):
                out[s.idx[broken]] = s.best[broken]
                keep = ~broken
                s.keep(keep)
                gens[:] = [g for g, k in zip(gens, keep.tolist()) if k]
            return bool(gens)

        left_over = drop_broken()
        for start in range(0, iterations, _BLOCK):
            if not left_over:
                break
            block = min(_BLOCK, iterations - start)
            draws = torch.stack([torch.rand((_BLOCK, 2 + c), generator=g) for g in gens]).to(x.device)
            windows = [_window(p_schedule(start + j, queries, p_init), h, w) for j in range(block)]
            sh = torch.tensor([a for a, _ in windows], device=x.device)
            sw = torch.tensor([b for _, b in windows], device=x.device)
            top = (draws[:, :block, 0] * (h - sh + 1)).long()
            left = (draws[:, :block, 1] * (w - sw + 1)).long()
            dtype = s.best.dtype
            s.in_h = ((rows_h >= top[..., None]) & (rows_h < (top + sh)[..., None])).to(dtype)
            s.in_w = ((rows_w >= left[..., None]) & (rows_w < (left + sw)[..., None])).to(dtype)
            s.up = (draws[:, :block, 2:] < 0.5).to(dtype)[..., None, None]
            chunk = max(1, min(block, _CHUNK_ELEMENTS // (len(gens) * c * h * w)))
            for j0 in range(0, block, chunk):
                if not left_over:
                    break
                j1 = min(j0 + chunk, block)
                window = s.in_h[:, j0:j1, None, :, None] * s.in_w[:, j0:j1, None, None, :]
                s.keep_old = 1 - window
                s.square = _pick(s.up[:, j0:j1], s.x_hi[:, None], s.x_lo[:, None]) * window
                s.flipped = _pick(s.up[:, j0:j1], s.x_lo[:, None], s.x_hi[:, None]) * window
                for j in range(j1 - j0):
                    new = torch.addcmul(s.square[:, j], s.best, s.keep_old[:, j])
                    change = torch.linalg.vector_norm(new - s.best, ord=1, dim=(1, 2, 3))
                    if float(change.min()) == 0:
                        flipped = torch.addcmul(s.flipped[:, j], s.best, s.keep_old[:, j])
                        new = _pick((change == 0).to(dtype).view(-1, 1, 1, 1), flipped, new)
                    value = margin(forward(new), s.lab, s.others)
                    s.best = _pick((value < s.margin).to(dtype).view(-1, 1, 1, 1), new, s.best)
                    s.margin = torch.minimum(value, s.margin)
                    if float(s.margin.min()) <= 0:
                        left_over = drop_broken()
                        if not left_over:
                            break
            for name in ("in_h", "in_w", "up", "keep_old", "square", "flipped"):
                s.__dict__.pop(name, None)
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
