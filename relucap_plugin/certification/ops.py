"""The ops of a bound graph: each maps a box forward (IBP) and, for affine ops, a linear bound
backward (CROWN); :class:`BoundGraph` holds them in topological order. Built by
:func:`~.graph.compile_model`; bounded by :mod:`.bounds`."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Affine", "BoundGraph", "BoundOp", "Clip", "Conv2d", "Input", "Linear", "MaxPool2d",
           "Reshape", "ScaleShift", "Sum"]


class BoundOp:
    """One node of the bound graph. ``inputs``: indices of the ops it reads; ``shape``: its
    output shape per sample (no batch dimension); ``where``: the module path or source line."""

    inputs: tuple[int, ...] = ()
    shape: tuple[int, ...] = ()
    name: str = ""
    where: str = ""
    module: str | None = None  # the module path, for ops that are modules

    def forward(self, *xs: Tensor) -> Tensor:
        raise NotImplementedError

    def ibp(self, *bounds: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class Input(BoundOp):
    def forward(self, x: Tensor) -> Tensor:
        return x


class Affine(BoundOp):
    """``f(x) = lin(x) + const``, applied per sample. Members give ``lin``, ``abs_lin`` (the
    linear part with absolute coefficients, for the box radius) and ``back`` (its transpose)."""

    def lin(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def abs_lin(self, r: Tensor) -> Tensor:
        raise NotImplementedError

    def const(self) -> Tensor | None:
        """``f(0)`` broadcastable to ``(N, *shape)``, or None for 0."""
        return None

    def back(self, a: Tensor) -> Tensor:
        """``a @ J`` for coefficients ``a`` of shape (N, *shape): shape (N, *input shape)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        c = self.const()
        y = self.lin(x)
        return y if c is None else y + c

    def ibp(self, b: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        lo, hi = b
        mid = self.forward((hi + lo) / 2)
        rad = self.abs_lin((hi - lo) / 2)
        return mid - rad, mid + rad


class _AbsWeight:
    """``|W|`` of a weight, computed once per :meth:`BoundGraph.reuse_abs_weights` scope.

    Outside a scope (the default) it is recomputed at every call. Inside, it is reused while the
    weight is the same tensor (``data_ptr``) at the same version (``_version``, which every
    in-place change through the parameter bumps); writes through ``.data`` do not bump the
    version, hence the scope: callers open it only around work during which they hold the model
    (``certify``'s loop). Never cached while autograd records the weight (training)."""

    def __init__(self) -> None:
        self.enabled = False
        self._key: tuple | None = None
        self._value: Tensor | None = None
        self._pinned: Tensor | None = None

    def __call__(self, w: Tensor) -> Tensor:
        if not self.enabled or (w.requires_grad and torch.is_grad_enabled()):
            return w.abs()
        key = (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))
        if key != self._key:
            # the detached view keeps the cached storage alive, so no new weight can be given
            # its address while the key holds it
            self._key, self._value, self._pinned = key, w.abs(), w.detach()
        return self._value  # type: ignore[return-value]

    def clear(self) -> None:
        self.enabled, self._key, self._value, self._pinned = False, None, None, None


class Linear(Affine):
    def __init__(self, weight: Callable[[], Tensor], bias: Callable[[], Tensor | None]):
        self.weight, self.bias = weight, bias
        self.abs_weight = _AbsWeight()

    def lin(self, x):
        return x @ self.weight().t()

    def abs_lin(self, r):
        return r @ self.abs_weight(self.weight()).t()

    def const(self):
        return self.bias()

    def back(self, a):
        return a @ self.weight()

    def ibp(self, b):
        """Centre and radius in two matrix products, the halving folded into them."""
        lo, hi = b
        if lo.dim() != 2:
            return super().ibp(b)
        w, bias = self.weight(), self.bias()
        if bias is None:
            mid = torch.mm(hi + lo, w.t()).mul_(0.5)
        else:
            mid = torch.addmm(bias, hi + lo, w.t(), alpha=0.5)
        rad = torch.mm(hi - lo, self.abs_weight(w).t())
        return torch.add(mid, rad, alpha=-0.5), mid.add_(rad, alpha=0.5)


class Conv2d(Affine):
    def __init__(self, weight, bias, stride, padding, dilation, groups, in_shape):
        self.weight, self.bias = weight, bias
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.in_shape = in_shape
        self.abs_weight = _AbsWeight()

    def _conv(self, x, w, b=None):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def lin(self, x):
        return self._conv(x, self.weight())

    def abs_lin(self, r):
        return self._conv(r, self.abs_weight(self.weight()))

    def const(self):
        b = self.bias()
        return None if b is None else b.view(-1, 1, 1)

    def ibp(self, b):
        lo, hi = b
        w, bias = self.weight(), self.bias()
        mid = self._conv(hi + lo, w * 0.5, bias)
        rad = self._conv(hi - lo, self.abs_weight(w))
        return torch.add(mid, rad, alpha=-0.5), mid.add_(rad, alpha=0.5)

    def back(self, a):
        w = self.weight()
        out_pad = []
        for d in range(2):
            k = w.shape[2 + d]
            size = (self.shape[1 + d] - 1) * self.stride[d] - 2 * self.padding[d] + (
                self.dilation[d] * (k - 1) + 1)
            out_pad.append(self.in_shape[1 + d] - size)
        return F.conv_transpose2d(a, w, None, self.stride, self.padding, tuple(out_pad),
                                  self.groups, self.dilation)


class ScaleShift(Affine):
    """``x * scale + shift`` with constants broadcastable to the per-sample shape (batch
    norm with running statistics, normalisation, add/sub/mul/div/neg by a constant)."""

    def __init__(self, scale: Callable[[], Tensor | None], shift: Callable[[], Tensor | None]):
        self.scale, self.shift = scale, shift

    def lin(self, x):
        s = self.scale()
        return x if s is None else x * s

    def abs_lin(self, r):
        s = self.scale()
        return r if s is None else r * s.abs()

    def const(self):
        return self.shift()

    def back(self, a):
        s = self.scale()
        return a if s is None else a * s


class Reshape(Affine):
    def __init__(self, in_shape):
        self.in_shape = in_shape

    def lin(self, x):
        return x.reshape(x.shape[0], *self.shape)

    abs_lin = lin

    def back(self, a):
        return a.reshape(a.shape[0], *self.in_shape)

    def ibp(self, b):
        return self.lin(b[0]), self.lin(b[1])


class Sum(BoundOp):
    """``x + y`` or ``x - y`` of two input-dependent tensors (residual connections)."""

    def __init__(self, sign: float):
        self.sign = sign

    def forward(self, x, y):
        return x + self.sign * y

    def ibp(self, b1, b2):
        if self.sign > 0:
            return b1[0] + b2[0], b1[1] + b2[1]
        return b1[0] - b2[1], b1[1] - b2[0]


class Clip(BoundOp):
    """``min(max(z, lo), hi)`` elementwise; ``lo``/``hi`` are callables giving tensors
    broadcastable to the per-sample shape (+-inf for no bound), read at every call so a
    learnable cap is bounded with its current value. ``scalars``: the same limits as two
    floats when they are constants, for one ``clamp`` kernel instead of two."""

    def __init__(self, lo: Callable[[], Tensor], hi: Callable[[], Tensor],
                 scalars: tuple[float, float] | None = None):
        self.lo, self.hi = lo, hi
        self.scalars = scalars

    def forward(self, z):
        if self.scalars is not None:
            lo, hi = self.scalars
            return z.clamp(lo if lo > -math.inf else None, hi if hi < math.inf else None)
        return torch.minimum(torch.maximum(z, self.lo()), self.hi())

    def ibp(self, b):
        return self.forward(b[0]), self.forward(b[1])


class MaxPool2d(BoundOp):
    def __init__(self, kernel, stride, padding, dilation, ceil_mode):
        self.args = (kernel, stride, padding, dilation, ceil_mode)

    def forward(self, x):
        return F.max_pool2d(x, *self.args)

    def ibp(self, b):
        return self.forward(b[0]), self.forward(b[1])

    @property
    def overlapping(self) -> bool:
        k, s, _, d, _ = self.args
        return any(si < ki for si, ki in zip(s, k)) or any(di != 1 for di in d)


class BoundGraph:
    """The ops of a model in topological order (``ops[0]`` is the input, ``ops[-1]`` the
    output) plus the shape of one input sample."""

    def __init__(self, ops: list[BoundOp], in_shape: tuple[int, ...], model_name: str):
        self.ops = ops
        self.in_shape = in_shape
        self.model_name = model_name

    def values(self, x: Tensor) -> list[Tensor]:
        """Every op's output for input ``x``; the last is the model's output."""
        vals: list[Tensor] = []
        for op in self.ops:
            vals.append(x if isinstance(op, Input) else op.forward(*(vals[i] for i in op.inputs)))
        return vals

    @contextlib.contextmanager
    def reuse_abs_weights(self) -> Iterator[None]:
        """Within this scope every Linear/Conv2d computes ``|W|`` once and reuses it while the
        weight tensor and its version are unchanged (see :class:`_AbsWeight`); open it only
        around work that holds the model unchanged, as :func:`~.api.certify` does."""
        caches = [op.abs_weight for op in self.ops if isinstance(op, (Linear, Conv2d))]
        for c in caches:
            c.enabled = True
        try:
            yield
        finally:
            for c in caches:
                c.clear()

    def ibp(self, lo: Tensor, hi: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Interval bounds of every op's output for inputs in the box ``[lo, hi]``."""
        out: list[tuple[Tensor, Tensor]] = []
        for op in self.ops:
            out.append((lo, hi) if isinstance(op, Input) else op.ibp(*(out[i] for i in op.inputs)))
        return out
