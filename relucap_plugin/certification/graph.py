"""The model as a list of bound-propagation ops: one torch.fx trace, checked op by op.

:func:`compile_model` traces the model (our activations and torch's ``nn`` modules are leaves,
as in the surgery), runs the trace once on an example input to learn every node's shape, folds
every node that does not depend on the input into a constant, and maps each remaining node to
one :class:`BoundOp` member. An op we cannot bound soundly is an :class:`UnsupportedOpError`
that names it and where it is; nothing is ever skipped.

The ops are the linear algebra of interval bound propagation (IBP, Gowal et al. 2018, arXiv
1810.12715) and of CROWN (Zhang et al. 2018, arXiv 1811.00866): each affine op maps a box
forward (centre and radius) and a linear bound backward; :class:`Clip` is every piecewise-linear
clamp ``min(max(z, lo), hi)`` (ReLU, our caps, clamp, Hardtanh, ReLU6) with one relaxation.
"""

from __future__ import annotations

import contextlib
import math
import operator
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .. import activations as _acts

__all__ = ["BoundGraph", "BoundOp", "Clip", "UnsupportedOpError", "compile_model"]

SUPPORTED = (
    "Linear, Conv2d, BatchNorm1d/2d (running statistics), Flatten/Unflatten/reshape/view/"
    "flatten, AvgPool2d, MaxPool2d, Identity/Dropout, residual add/sub, add/sub/mul/div/neg by "
    "constants (normalisation), ReLU, CappedReLU, LearnableCappedReLU, ReLU6, Hardtanh, "
    "clamp/clip/clamp_min/clamp_max, F.relu/relu6/hardtanh/linear/conv2d/avg_pool2d/max_pool2d"
)


class UnsupportedOpError(ValueError):
    """The model holds an op that bound propagation does not support (named, with its place)."""


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

    def __call__(self, w: Tensor) -> Tensor:
        if not self.enabled or (w.requires_grad and torch.is_grad_enabled()):
            return w.abs()
        key = (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))
        if key != self._key:
            self._key, self._value = key, w.abs()
        return self._value  # type: ignore[return-value]

    def clear(self) -> None:
        self.enabled, self._key, self._value = False, None, None


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


# ------------------------------------------------------------------------ tracing
_OWN_MODULES = {_acts.__name__}


class _Tracer(fx.Tracer):
    """Our activations and torch's modules are leaves. ``record``: keep each node's source line
    (costly: most of a trace's time), only asked for to name an op that cannot be bounded."""

    def __init__(self, record: bool = False):
        super().__init__()
        self.record_stack_traces = record

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m).__module__ in _OWN_MODULES or super().is_leaf_module(m, qualname)


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _where(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"module '{node.target}' ({type(modules[node.target]).__name__})"
    target = getattr(node.target, "__name__", str(node.target))
    line = ""
    trace = node.meta.get("stack_trace")
    if trace:
        torch_dir = os.path.dirname(torch.__file__)
        frames = [ln.strip() for ln in trace.strip().splitlines()
                  if ln.strip().startswith("File") and torch_dir not in ln]
        if frames:
            line = f" at {frames[-1]}"
    return f"node '{node.name}' ({node.op} {target}){line}"


_ADD = {operator.add, operator.iadd, torch.add, "add", "add_"}
_SUB = {operator.sub, operator.isub, torch.sub, torch.subtract, "sub", "sub_"}
_MUL = {operator.mul, operator.imul, torch.mul, torch.multiply, "mul", "mul_"}
_DIV = {operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div", "div_"}
_NEG = {operator.neg, torch.neg, "neg"}
_RELU = {F.relu, torch.relu, torch.relu_, "relu", "relu_"}
_CLAMP = {torch.clamp, torch.clip, "clamp", "clip", "clamp_", "clip_"}
_CLAMP_MIN = {torch.clamp_min, "clamp_min", "clamp_min_"}
_CLAMP_MAX = {torch.clamp_max, "clamp_max", "clamp_max_"}
_RESHAPE = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, "flatten", "view",
            "reshape", "squeeze", "unsqueeze", "contiguous"}
_IDENTITY = {F.dropout, "contiguous", "clone", "detach"}
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)


def _fixed(value: Any) -> Callable[[], Any]:
    return lambda: value


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


class _Compiler:
    def __init__(self, model: nn.Module, example: Tensor):
        self.model = model
        self.modules = dict(model.named_modules())
        tracer = _Tracer()
        try:
            self.graph = tracer.trace(model)
        except Exception as exc:
            raise UnsupportedOpError(
                f"torch.fx cannot trace {type(model).__name__} for certification "
                f"({type(exc).__name__}: {exc}); certify needs a traceable forward (no "
                "data-dependent Python control flow)") from exc
        self.values: dict[fx.Node, Any] = {}
        self.ops: list[BoundOp] = []
        self.index: dict[fx.Node, int] = {}
        self.example = example

    def run(self) -> BoundGraph:
        env = self.values
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise UnsupportedOpError(
                f"certify bounds models of one input tensor; {type(self.model).__name__}.forward "
                f"takes {len(placeholders)} ({', '.join(n.name for n in placeholders)})")
        interp = fx.Interpreter(self.model, graph=self.graph)
        interp.env = env
        with torch.no_grad():
            for node in self.graph.nodes:
                if node.op == "placeholder":
                    env[node] = self.example
                else:
                    env[node] = getattr(interp, node.op)(node.target, *interp.fetch_args_kwargs_from_env(node))
                self._add(node)
        out_node = next(n for n in self.graph.nodes if n.op == "output")
        if self.index.get(out_node) != len(self.ops) - 1:
            raise UnsupportedOpError(
                f"{type(self.model).__name__} must return one tensor computed from its input "
                "(a tuple or dict output: wrap the model to select the logits)")
        return BoundGraph(self.ops, tuple(self.example.shape[1:]), type(self.model).__name__)

    def _var(self, a: Any) -> bool:
        return isinstance(a, fx.Node) and a in self.index

    def _const(self, a: Any) -> Any:
        return self.values[a] if isinstance(a, fx.Node) else a

    def _push(self, node: fx.Node, op: BoundOp, inputs: Sequence[fx.Node]) -> None:
        value = self.values[node]
        op.inputs = tuple(self.index[i] for i in inputs)
        op.shape = tuple(value.shape[1:])
        op.name = node.name
        op.where = _where(node, self.modules)
        op.module = str(node.target) if node.op == "call_module" else None
        self.index[node] = len(self.ops)
        self.ops.append(op)

    def _located(self, node: fx.Node) -> fx.Node:
        """``node`` from a second trace that records source lines (same names, same order)."""
        try:
            graph = _Tracer(record=True).trace(self.model)
        except Exception:  # pragma: no cover - the first trace of the same model succeeded
            return node
        return next((n for n in graph.nodes if n.name == node.name), node)

    def _fail(self, node: fx.Node, what: str = "") -> None:
        raise UnsupportedOpError(
            f"certify cannot bound {_where(self._located(node), self.modules)}"
            f"{': ' + what if what else ''}. "
            f"Supported ops: {SUPPORTED}. Replace that op, or certify a sub-model without it")

    def _add(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            self._push(node, Input(), [])
            return
        if node.op == "output":
            (out,) = node.args
            if self._var(out):
                self.index[node] = self.index[out]
            return
        tensors = [a for a in node.all_input_nodes if self._var(a)]
        if not tensors or not isinstance(self.values[node], Tensor):
            return  # a constant or shape metadata: folded
        if node.op == "call_module":
            self._module(node, tensors)
        elif node.op in ("call_function", "call_method"):
            self._function(node, tensors)
        else:
            self._fail(node)

    # -------------------------------------------------------------- modules
    def _module(self, node: fx.Node, tensors: list[fx.Node]) -> None:
        m = self.modules[node.target]
        x = node.args[0] if node.args else None
        if len(tensors) != 1 or x is not tensors[0]:
            self._fail(node, "only the first argument may depend on the input")
        in_shape = tuple(self.values[x].shape[1:])
        op: BoundOp
        if isinstance(m, nn.Linear):
            op = Linear(lambda m=m: m.weight, lambda m=m: m.bias)
        elif type(m) is nn.Conv2d:
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                self._fail(node, "only numeric zero padding is supported")
            op = Conv2d(lambda m=m: m.weight, lambda m=m: m.bias, m.stride, m.padding,
                        m.dilation, m.groups, in_shape)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if m.running_mean is None:
                self._fail(node, "batch norm without running statistics")
            op = ScaleShift(*_batchnorm(m, len(in_shape)))
        elif isinstance(m, (nn.Flatten, nn.Unflatten)):
            op = Reshape(in_shape)
        elif isinstance(m, _IDENTITY_MODULES):
            op = Reshape(in_shape)
        elif type(m) is nn.AvgPool2d:
            op = self._avg_pool(node, in_shape, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                m.count_include_pad, m.divisor_override)
        elif type(m) is nn.MaxPool2d:
            op = self._max_pool(node, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                                m.return_indices)
        elif type(m) is nn.ReLU:
            op = _clip(0.0, math.inf)
        elif isinstance(m, nn.Hardtanh):  # ReLU6 too
            op = _clip(m.min_val, m.max_val)
        elif type(m) is _acts.CappedReLU:
            op = (Clip(_fixed(torch.tensor(0.0)), _fixed(_channel(m.cap_tensor, len(in_shape))))
                  if m.per_channel else _clip(0.0, m.cap_value))
        elif type(m) is _acts.LearnableCappedReLU:
            dims = len(in_shape)
            op = Clip(_fixed(torch.tensor(0.0)), lambda m=m: _channel(m.cap, dims))
        else:
            self._fail(node)
        self._push(node, op, [x])

    def _avg_pool(self, node, in_shape, kernel, stride, padding, ceil_mode, include_pad, divisor):
        if ceil_mode or divisor is not None or (not include_pad and _pair(padding) != (0, 0)):
            self._fail(node, "avg pooling needs ceil_mode=False, divisor_override=None and "
                             "count_include_pad=True (or no padding)")
        k = _pair(kernel)
        c = in_shape[0]
        weight = torch.full((c, 1, *k), 1.0 / (k[0] * k[1]), dtype=self.example.dtype,
                            device=self.example.device)
        return Conv2d(_fixed(weight), _fixed(None), _pair(stride if stride else kernel),
                      _pair(padding), (1, 1), c, in_shape)

    def _max_pool(self, node, kernel, stride, padding, dilation, ceil_mode, return_indices):
        if return_indices:
            self._fail(node, "max pooling with return_indices=True")
        k = _pair(kernel)
        return MaxPool2d(k, _pair(stride if stride else kernel), _pair(padding), _pair(dilation),
                         ceil_mode)

    # ------------------------------------------------------------ functions
    def _function(self, node: fx.Node, tensors: list[fx.Node]) -> None:
        t = node.target
        x = node.args[0] if node.args else None
        key = t if node.op == "call_function" else str(t)
        try:
            hash(key)
        except TypeError:
            self._fail(node)
        if key in _ADD or key in _SUB:
            sign = 1.0 if key in _ADD else -1.0
            a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
            if node.kwargs.get("alpha", 1) != 1:
                self._fail(node, "alpha != 1")
            if self._var(a) and self._var(b):
                self._push(node, Sum(sign), [a, b])
            elif self._var(a):
                c = self._const(b)
                self._push(node, ScaleShift(_fixed(None), _fixed(_as_tensor(c, sign))), [a])
            else:
                c = self._const(a)
                scale = None if sign > 0 else torch.tensor(-1.0)
                self._push(node, ScaleShift(_fixed(scale), _fixed(_as_tensor(c, 1.0))), [b])
        elif key in _MUL:
            a, b = node.args[0], node.args[1]
            if self._var(a) and self._var(b):
                self._fail(node, "a product of two input-dependent tensors is not affine")
            v, c = (a, b) if self._var(a) else (b, a)
            self._push(node, ScaleShift(_fixed(_as_tensor(self._const(c), 1.0)), _fixed(None)), [v])
        elif key in _DIV:
            a, b = node.args[0], node.args[1]
            if self._var(b) or node.kwargs.get("rounding_mode") is not None:
                self._fail(node, "only division by a constant is supported")
            self._push(node, ScaleShift(_fixed(1.0 / _as_tensor(self._const(b), 1.0)),
                                        _fixed(None)), [a])
        elif key in _NEG:
            self._push(node, ScaleShift(_fixed(torch.tensor(-1.0)), _fixed(None)), [x])
        elif key in _RELU:
            self._push(node, _clip(0.0, math.inf), [x])
        elif key is F.relu6:
            self._push(node, _clip(0.0, 6.0), [x])
        elif key is F.hardtanh:
            self._push(node, _clip(self._const(_arg(node, 1, "min_val", -1.0)),
                                   self._const(_arg(node, 2, "max_val", 1.0))), [x])
        elif key in _CLAMP or key in _CLAMP_MIN or key in _CLAMP_MAX:
            lo = hi = None
            if key in _CLAMP:
                lo, hi = self._const(_arg(node, 1, "min")), self._const(_arg(node, 2, "max"))
            elif key in _CLAMP_MIN:
                lo = self._const(_arg(node, 1, "min"))
            else:
                hi = self._const(_arg(node, 1, "max"))
            if self._var(_arg(node, 1, "min")) or self._var(_arg(node, 2, "max")):
                self._fail(node, "clamp limits that depend on the input")
            self._push(node, _clip(-math.inf if lo is None else lo,
                                   math.inf if hi is None else hi), [x])
        elif key in _RESHAPE or key in _IDENTITY:
            if tensors != [x]:
                self._fail(node)
            before, after = self.values[x].shape, self.values[node].shape
            if before[:1] != after[:1]:
                self._fail(node, "a reshape that changes the batch dimension")
            self._push(node, Reshape(tuple(before[1:])), [x])
        elif key is F.linear:
            w, b = self._const(_arg(node, 1, "weight")), self._const(_arg(node, 2, "bias"))
            if tensors != [x]:
                self._fail(node, "weights that depend on the input")
            self._push(node, Linear(_fixed(w), _fixed(b)), [x])
        elif key is F.conv2d:
            if tensors != [x] or isinstance(_arg(node, 4, "padding", 0), str):
                self._fail(node, "weights that depend on the input, or string padding")
            w, b = self._const(_arg(node, 1, "weight")), self._const(_arg(node, 2, "bias"))
            self._push(node, Conv2d(_fixed(w), _fixed(b), _pair(_arg(node, 3, "stride", 1)),
                                    _pair(_arg(node, 4, "padding", 0)),
                                    _pair(_arg(node, 5, "dilation", 1)),
                                    _arg(node, 6, "groups", 1), tuple(self.values[x].shape[1:])), [x])
        elif key is F.avg_pool2d:
            k = _arg(node, 1, "kernel_size")
            self._push(node, self._avg_pool(
                node, tuple(self.values[x].shape[1:]), k, _arg(node, 2, "stride", None) or k,
                _arg(node, 3, "padding", 0), _arg(node, 4, "ceil_mode", False),
                _arg(node, 5, "count_include_pad", True), _arg(node, 6, "divisor_override")), [x])
        elif key is F.max_pool2d or getattr(t, "__name__", "") in ("max_pool2d", "_max_pool2d"):
            k = _arg(node, 1, "kernel_size")
            self._push(node, self._max_pool(
                node, k, _arg(node, 2, "stride", None) or k, _arg(node, 3, "padding", 0),
                _arg(node, 4, "dilation", 1), _arg(node, 5, "ceil_mode", False),
                _arg(node, 6, "return_indices", False)), [x])
        else:
            self._fail(node)


def _as_tensor(value: Any, sign: float) -> Tensor:
    return sign * torch.as_tensor(value).detach()


def _channel(cap: Tensor, dims: int) -> Tensor:
    """A (C,) or scalar cap shaped to broadcast over a per-sample (C, *) tensor."""
    if cap.dim() == 0:
        return cap
    return cap.view(-1, *([1] * (dims - 1)))


def _clip(lo: Any, hi: Any) -> Clip:
    """A clip with constant limits (numbers, 0-d or broadcastable tensors); number limits are
    kept at full precision (float64), a float32 model's bounds round them as its forward does."""
    lo_t = torch.as_tensor(lo, dtype=torch.float64 if isinstance(lo, (int, float)) else torch.float32)
    hi_t = torch.as_tensor(hi, dtype=torch.float64 if isinstance(hi, (int, float)) else torch.float32)
    scalars = (float(lo_t), float(hi_t)) if lo_t.dim() == 0 and hi_t.dim() == 0 else None
    return Clip(_fixed(lo_t), _fixed(hi_t), scalars)


def _batchnorm(m: nn.Module, dims: int):
    def scale():
        w = m.weight if m.affine else torch.ones_like(m.running_var)
        return _channel(w / torch.sqrt(m.running_var + m.eps), dims)

    def shift():
        b = m.bias if m.affine else torch.zeros_like(m.running_mean)
        w = m.weight if m.affine else torch.ones_like(m.running_var)
        return _channel(b - m.running_mean * w / torch.sqrt(m.running_var + m.eps), dims)

    return scale, shift


def compile_model(model: nn.Module, example: Tensor) -> BoundGraph:
    """The :class:`BoundGraph` of ``model`` for inputs shaped like ``example`` (N, ...).

    Raises :class:`UnsupportedOpError` naming the first op that cannot be bounded.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    return _Compiler(model, example).run()
