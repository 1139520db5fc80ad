"""IBP and CROWN bounds on a :class:`~.graph.BoundGraph` over an Linf or L2 ball.

Interval bound propagation (IBP) follows Gowal et al. 2018 (arXiv 1810.12715): a box is mapped
through each op (affine ops by centre and radius). CROWN follows Zhang et al. 2018 (arXiv
1811.00866): a linear function of a node (the specification ``C``) is carried backward to the
input through every op, each nonlinear op replaced by linear lower and upper bounds valid on
the interval of its input, and the result is minimised over the input set in closed form. The
margin specification ``e_y - e_j`` and CROWN-IBP's mix (IBP bounds for the intermediate nodes,
a CROWN pass for the output) are from Zhang et al. 2020 (arXiv 1906.06316).

Our own choices (not from the papers): the two-kink relaxation of ``clip(z, lo, hi)`` below;
intermediate nodes wider than ``max_neurons`` keep their IBP bounds; every intermediate bound is
the intersection of its IBP and CROWN bounds; the L2 ball is intersected with the input box by
taking the larger of the two closed-form minima (each over a superset of the intersection).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import Affine, BoundGraph, Clip, Conv2d, Input, Linear, MaxPool2d, Sum

__all__ = ["Ball", "Bounds", "clip_relaxation", "margin_spec"]


@dataclass
class Ball:
    """The input set: the ``norm`` ball of radius ``eps`` around ``x0`` (B, ...) intersected
    with the box ``bounds``. ``eps`` is a float or a (B,) tensor."""

    x0: Tensor
    eps: float | Tensor
    norm: str
    bounds: tuple[float, float]

    def _eps(self, like: Tensor) -> Tensor | float:
        if isinstance(self.eps, Tensor):
            return self.eps.to(like).view(-1, *([1] * (like.dim() - 1)))
        return self.eps

    def box(self) -> tuple[Tensor, Tensor]:
        """The smallest box holding the set (Linf: the set itself)."""
        e = self._eps(self.x0)
        lo, hi = self.bounds
        return (self.x0 - e).clamp_(min=lo), (self.x0 + e).clamp_(max=hi)

    def concretize(self, a: Tensor) -> Tensor:
        """A lower bound (B, S) of ``a . x`` over the set, for coefficients ``a`` (B, S, ...)."""
        xl, xu = self.box()
        low = _box_min(a, xl, xu)
        if self.norm == "L2":
            flat = a.flatten(2)
            centre = (flat * self.x0.flatten(1).unsqueeze(1)).sum(2)
            e = self._eps(centre)
            low = torch.maximum(low, centre - e * flat.norm(dim=2))
        return low


def _box_min(a: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """min over ``lo <= x <= hi`` of ``a . x``: a (B, S, *shape), lo/hi (B, *shape) -> (B, S)."""
    b, s = a.shape[:2]
    flat = a.reshape(b, s, -1)
    mid2 = (hi + lo).reshape(b, -1, 1)
    rad2 = (hi - lo).reshape(b, -1, 1)
    return (torch.bmm(flat, mid2) - torch.bmm(flat.abs(), rad2)).squeeze(2) * 0.5


def _tensor(value: Tensor, like: Tensor) -> Tensor:
    return value.to(device=like.device, dtype=like.dtype)


def clip_relaxation(zl: Tensor, zu: Tensor, lo: Tensor, hi: Tensor):
    """Linear bounds ``aL z + bL <= clip(z, lo, hi) <= aU z + bU`` valid for ``zl <= z <= zu``.

    ``lo``/``hi`` broadcast to ``zl`` (``-inf``/``inf`` for a missing side; a ReLU is (0, inf), a
    cap b is (0, b)). Cases, elementwise: constant (``zu <= lo`` or ``zl >= hi``); identity
    (``lo <= zl, zu <= hi``); one kink at ``lo`` (ReLU-like: the chord above, a line through
    (lo, lo) of slope 0 or 1 below, CROWN's adaptive choice); one kink at ``hi`` (mirrored: the
    chord below, slope 0 or 1 through (hi, hi) above); both kinks (below: a line through
    (lo, lo) of slope 0 or (hi - lo)/(zu - lo), which passes through (zu, hi); above: through
    (hi, hi) of slope 0 or (hi - lo)/(hi - zl), through (zl, lo)). Each slope choice keeps the
    line that encloses the smaller area over [zl, zu] (the larger / smaller value at the
    interval's midpoint). Returns (aL, bL, aU, bU), each shaped like ``zl``.
    """
    lo, hi = _tensor(lo, zl), _tensor(hi, zl)
    lo, hi, zl, zu = torch.broadcast_tensors(lo, hi, zl, zu)
    lo = torch.where(torch.isinf(lo), torch.minimum(zl, zu) - 1, lo)
    hi = torch.where(torch.isinf(hi), torch.maximum(zl, zu) + 1, hi)
    mid = (zl + zu) / 2
    below = zu <= lo
    above = (zl >= hi) & ~below
    ident = (zl >= lo) & (zu <= hi) & ~below & ~above
    rest = ~(below | above | ident)
    lower_kink = rest & (zl < lo) & (zu <= hi)
    upper_kink = rest & (zl >= lo) & (zu > hi)
    both = rest & ~lower_kink & ~upper_kink
    one = torch.ones_like(zl)
    width = torch.where(rest, zu - zl, one)
    zero = torch.zeros_like(zl)
    # lower kink: chord above, 0/1 through (lo, lo) below
    s_up4 = (zu - lo) / width
    alpha4 = (mid > lo).to(zl.dtype)
    # upper kink: chord below, 0/1 through (hi, hi) above
    s_lo5 = (hi - zl) / width
    beta5 = (mid < hi).to(zl.dtype)
    # both kinks
    alpha6 = torch.where(mid > lo, (hi - lo) / torch.where(both, zu - lo, one), zero)
    beta6 = torch.where(mid < hi, (hi - lo) / torch.where(both, hi - zl, one), zero)

    aL = torch.where(ident, one, zero)
    aL = torch.where(lower_kink, alpha4, aL)
    aL = torch.where(upper_kink, s_lo5, aL)
    aL = torch.where(both, alpha6, aL)
    bL = torch.where(below, lo, torch.where(above, hi, zero))
    bL = torch.where(lower_kink | both, lo * (1 - aL), bL)
    bL = torch.where(upper_kink, zl - s_lo5 * zl, bL)

    aU = torch.where(ident, one, zero)
    aU = torch.where(lower_kink, s_up4, aU)
    aU = torch.where(upper_kink, beta5, aU)
    aU = torch.where(both, beta6, aU)
    bU = torch.where(below, lo, torch.where(above, hi, zero))
    bU = torch.where(lower_kink, lo - s_up4 * zl, bU)
    bU = torch.where(upper_kink | both, hi * (1 - aU), bU)
    return aL, bL, aU, bU


def margin_spec(y: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """(B, K, K) specification: row j is ``e_y - e_j`` (row y is zero, its bound exactly 0)."""
    eye = torch.eye(num_classes, dtype=dtype, device=y.device)
    return eye[y].unsqueeze(1) - eye.unsqueeze(0)


class Bounds:
    """Bounds of every node of ``graph`` over ``ball``: IBP always, CROWN on demand.

    ``crown_intermediate=True`` tightens the input of every nonlinear op with at most
    ``max_neurons`` units by a CROWN pass (intersected with IBP); otherwise the intermediate
    bounds are IBP's (CROWN-IBP). A node one dense layer from an Linf box keeps its IBP bounds,
    which are exact there.
    """

    def __init__(self, graph: BoundGraph, ball: Ball, crown_intermediate: bool = False,
                 max_neurons: int = 2048):
        self.graph, self.ball = graph, ball
        self._relax: dict[int, tuple] = {}
        ops = graph.ops
        needed = {op.inputs[0] for op in ops if isinstance(op, (Clip, MaxPool2d))}
        self.bounds: list[tuple[Tensor, Tensor]] = []
        dense: list[int | None] = []  # dense affine ops between the input and a node (None: any other op)
        for i, op in enumerate(ops):
            if isinstance(op, Input):
                self.bounds.append(ball.box())
                dense.append(0)
                continue
            lo, hi = op.ibp(*(self.bounds[j] for j in op.inputs))
            self.bounds.append((lo, hi))
            before = dense[op.inputs[0]] if isinstance(op, Affine) else None
            dense.append(None if before is None else before + isinstance(op, (Linear, Conv2d)))
            exact = ball.norm == "Linf" and dense[i] is not None and dense[i] <= 1
            if (crown_intermediate and i in needed and not exact
                    and math.prod(op.shape) <= max_neurons):
                self.bounds[i] = self._tighten(i)

    def _tighten(self, i: int) -> tuple[Tensor, Tensor]:
        """CROWN bounds of node ``i``'s units that some consumer relaxes inexactly, intersected
        with the current bounds. A unit that is stable for every clip reading it (below, above
        or inside both kinks in every sample of the batch) keeps its bounds: its relaxation is
        exact on any interval within them, so every later CROWN pass relaxes it the same way
        without the two backward rows it would cost; only IBP bounds propagated from its wider
        interval can be wider (our own saving, as auto_LiRPA bounds only unstable neurons)."""
        lo, hi = self.bounds[i]
        b, n = lo.shape[0], lo[0].numel()
        rows = self._unstable(i).reshape(b, n).any(0).nonzero().flatten()
        if len(rows) == 0:
            return lo, hi
        u = len(rows)
        eye = torch.zeros(u, n, dtype=lo.dtype, device=lo.device)
        eye[torch.arange(u, device=lo.device), rows] = 1.0
        eye = eye.view(u, *lo.shape[1:])
        spec = torch.cat([eye, -eye]).unsqueeze(0).expand(b, *([-1] * (eye.dim())))
        res = self.backward(i, spec)
        new_lo, new_hi = lo.reshape(b, n).clone(), hi.reshape(b, n).clone()
        new_lo[:, rows] = torch.maximum(new_lo[:, rows], res[:, :u])
        new_hi[:, rows] = torch.minimum(new_hi[:, rows], -res[:, u:])
        return new_lo.view(lo.shape), torch.maximum(new_hi, new_lo).view(hi.shape)

    def _unstable(self, i: int) -> Tensor:
        """(B, *shape) mask of node ``i``'s units whose relaxation in some consumer is not exact
        on their current interval (every unit of a max-pool's input counts)."""
        lo, hi = self.bounds[i]
        mask = torch.zeros_like(lo, dtype=torch.bool)
        for op in self.graph.ops:
            if i not in op.inputs:
                continue
            if isinstance(op, MaxPool2d):
                return torch.ones_like(mask)
            if isinstance(op, Clip):
                kl, kh = _tensor(op.lo(), lo), _tensor(op.hi(), lo)
                stable = (hi <= kl) | (lo >= kh) | ((lo >= kl) & (hi <= kh))
                mask |= ~stable
        return mask

    def _relaxation(self, i: int) -> tuple:
        if i not in self._relax:
            op = self.graph.ops[i]
            zl, zu = self.bounds[op.inputs[0]]
            if isinstance(op, Clip):
                self._relax[i] = tuple(t.unsqueeze(1) for t in clip_relaxation(zl, zu, op.lo(), op.hi()))
            else:
                self._relax[i] = _maxpool_relaxation(op, zl, zu)
        return self._relax[i]

    def ibp_margin(self, spec: Tensor, labels: Tensor | None = None) -> Tensor:
        """Lower bounds (B, S) of ``spec . output``: IBP with the affine ops after the last
        nonlinear op folded into the specification (Gowal et al.'s elision of the last layer).

        ``labels`` (B,) says that ``spec`` is ``margin_spec(labels)``; where the output is one
        Linear layer on a nonlinear op and there are at most 32 classes, the same bounds are
        then computed per pair of classes (:func:`_pair_margins`), without the (B, K, N)
        coefficients of the generic path."""
        ops = self.graph.ops
        last = ops[-1]
        if (labels is not None and isinstance(last, Linear) and last.shape[0] <= 32
                and isinstance(ops[last.inputs[0]], (Clip, MaxPool2d))
                and self.bounds[last.inputs[0]][0].dim() == 2):
            return _pair_margins(last, *self.bounds[last.inputs[0]], labels)
        return self.backward(len(ops) - 1, spec, stop_at_nonlinear=True)

    def crown_margin(self, spec: Tensor) -> Tensor:
        """Lower bounds (B, S) of ``spec . output`` by a CROWN pass."""
        return self.backward(len(self.graph.ops) - 1, spec)

    def backward(self, target: int, spec: Tensor, stop_at_nonlinear: bool = False) -> Tensor:
        """A lower bound (B, S) of ``spec . node[target]`` for ``spec`` (B, S, *shape)."""
        ops = self.graph.ops
        b, s = spec.shape[:2]
        coef: dict[int, Tensor] = {target: spec}
        bias = spec.new_zeros(b, s)

        def add(j: int, a: Tensor) -> None:
            coef[j] = coef[j] + a if j in coef else a

        for i in range(target, -1, -1):
            a = coef.pop(i, None)
            if a is None:
                continue
            op = ops[i]
            if isinstance(op, Input):
                bias = bias + self.ball.concretize(a)
            elif stop_at_nonlinear and isinstance(op, (Clip, MaxPool2d)):
                bias = bias + _box_min(a, *self.bounds[i])
            elif isinstance(op, Affine):
                c = op.const()
                if c is not None:
                    bias = bias + (a * c).reshape(b, s, -1).sum(2)
                back = op.back(a.reshape(b * s, *op.shape))
                add(op.inputs[0], back.reshape(b, s, *back.shape[1:]))
            elif isinstance(op, Sum):
                add(op.inputs[0], a)
                add(op.inputs[1], a if op.sign > 0 else -a)
            elif isinstance(op, Clip):
                aL, bL, aU, bU = self._relaxation(i)
                pos, neg = a.clamp(min=0), a.clamp(max=0)
                bias = bias + (pos * bL + neg * bU).reshape(b, s, -1).sum(2)
                add(op.inputs[0], pos * aL + neg * aU)
            elif isinstance(op, MaxPool2d):
                idx, dom, umax = self._relaxation(i)
                pos, neg = a.clamp(min=0), a.clamp(max=0)
                bias = bias + (neg * (~dom) * umax).reshape(b, s, -1).sum(2)
                w = (pos + neg * dom).flatten(3)
                in_shape = ops[op.inputs[0]].shape
                out = w.new_zeros(b, s, in_shape[0], in_shape[1] * in_shape[2])
                out = out.scatter_add(3, idx.expand(-1, s, -1, -1), w)
                add(op.inputs[0], out.view(b, s, *in_shape))
            else:  # pragma: no cover - compile_model admits no other op
                raise TypeError(f"no backward rule for {type(op).__name__}")
        return bias


def _pair_margins(op: Linear, lo: Tensor, hi: Tensor, y: Tensor) -> Tensor:
    """The elided IBP margin ``(W_y - W_j) . z + b_y - b_j`` minimised over ``lo <= z <= hi``,
    for all j (B, K). Centre term from the centre's logits; radius term ``|W_y - W_j| . r`` from
    one product of the radius with the K^2 rows ``|W_i - W_j|``: batch-independent work instead
    of the generic path's (B, K, N) coefficients (our own arrangement of the same bound)."""
    w, bias = op.weight(), op.bias()
    k = w.shape[0]
    mid = torch.mm(hi + lo, w.t()) * 0.5
    if bias is not None:
        mid = mid + bias
    rows = (w.unsqueeze(1) - w.unsqueeze(0)).abs().reshape(k * k, -1)
    rad = torch.mm(hi - lo, rows.t()).view(-1, k, k) * 0.5
    idx = torch.arange(len(y), device=y.device)
    return mid.gather(1, y.view(-1, 1)) - mid - rad[idx, y]


def _maxpool_relaxation(op: MaxPool2d, zl: Tensor, zu: Tensor):
    """DeepPoly's max-pool bounds: below, the input with the largest lower bound in each window
    (``x_j``); above, ``x_j`` itself where its lower bound reaches every other input's upper
    bound in the window (only for non-overlapping windows), else the window's largest upper
    bound (a constant). Returns indices (B, 1, C, H'W'), the dominance mask and the constant,
    both (B, 1, C, H', W')."""
    lmax, idx = F.max_pool2d(zl, *op.args, return_indices=True)
    umax = F.max_pool2d(zu, *op.args)
    flat_idx = idx.flatten(2)
    if op.overlapping:
        dom = torch.zeros_like(lmax, dtype=torch.bool)
    else:
        u2 = zu.flatten(2).scatter(2, flat_idx, zl.flatten(2).gather(2, flat_idx)).view_as(zu)
        dom = lmax >= F.max_pool2d(u2, *op.args)
    return flat_idx.unsqueeze(1), dom.unsqueeze(1), umax.unsqueeze(1)
