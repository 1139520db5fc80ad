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

import math
import operator
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .. import activations as _acts
from .ops import (
    BoundGraph,
    BoundOp,
    Clip,
    Conv2d,
    Input,
    Linear,
    MaxPool2d,
    Reshape,
    ScaleShift,
    Sum,
)

__all__ = ["BoundGraph", "BoundOp", "Clip", "UnsupportedOpError", "compile_model"]

SUPPORTED = (
    "Linear, Conv2d, BatchNorm1d/2d (running statistics), Flatten/Unflatten/reshape/view/"
    "flatten, AvgPool2d, MaxPool2d, Identity/Dropout, residual add/sub, add/sub/mul/div/neg by "
    "constants (normalisation), ReLU, CappedReLU, LearnableCappedReLU, ReLU6, Hardtanh, "
    "clamp/clip/clamp_min/clamp_max, F.relu/relu6/hardtanh/linear/conv2d/avg_pool2d/max_pool2d"
)


class UnsupportedOpError(ValueError):
    """The model holds an op that bound propagation does not support (named, with its place)."""


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
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__} {repr(model)[:80]}")
    return _Compiler(model, example).run()
