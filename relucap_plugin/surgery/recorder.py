"""The ReLU recorder: a torch function mode that records every ReLU application of a forward
pass and the module that made it (our own design). The self-check counts and places the plain
ReLUs left with it, and discovery by running finds sites with it (``find_relus``/``cap_relus``
without a trace, and models fx cannot trace)."""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ._records import _MARK

# Every way a forward applies a ReLU: nn.ReLU runs F.relu, nn.ReLU6 runs F.hardtanh (counted
# only when the module running it is an exact nn.ReLU6), F.relu_ is torch.relu_.
_RELU_CALLS = frozenset({F.relu, torch.relu, torch.relu_, F.relu6, Tensor.relu, Tensor.relu_})
_HARDTANH = frozenset({F.hardtanh, F.hardtanh_})
_INPLACE_CALLS = frozenset({torch.relu_, Tensor.relu_})
# A ReLU written another way: clamp/clip with a lower bound of 0 and no upper bound,
# threshold(x, 0, 0), maximum/fmax with a zero, leaky_relu with slope 0, hardtanh(x, 0, inf),
# or aten's relu op itself. Not sites (cap_relus does not rewrite them): counted to be named.
_CLAMPS = frozenset({torch.clamp, Tensor.clamp, torch.clamp_, Tensor.clamp_, torch.clip,
                     Tensor.clip, Tensor.clip_, torch.clamp_min, Tensor.clamp_min,
                     torch.clamp_min_, Tensor.clamp_min_})
_THRESHOLDS = frozenset({F.threshold, F.threshold_})
_MAXIMA = frozenset({torch.maximum, Tensor.maximum, torch.fmax, Tensor.fmax, torch.max,
                     Tensor.max})
_ATEN_RELUS = frozenset({torch.ops.aten.relu, torch.ops.aten.relu.default, torch.ops.aten.relu_,
                         torch.ops.aten.relu_.default})
_RELU_LIKE = (_CLAMPS | _THRESHOLDS | _MAXIMA | _ATEN_RELUS
              | {F.leaky_relu, F.leaky_relu_, F.hardtanh, F.hardtanh_})
RELU_LIKE_FORMS = ("clamp(min=0), threshold(x, 0, 0), maximum(x, 0), leaky_relu(x, 0), "
                   "hardtanh(x, 0, inf) or torch.ops.aten.relu")


def _relu_like(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether a call of ``func`` (one of ``_RELU_LIKE``) computes a ReLU."""
    def arg(k: int, name: str) -> Any:
        return args[k] if len(args) > k else kwargs.get(name)

    def zero(v: Any) -> bool:
        return (isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0) or (
            isinstance(v, Tensor) and v.numel() == 1 and v.device.type != "meta" and v.item() == 0)

    def all_zero(v: Tensor) -> bool:
        return v.device.type != "meta" and not v.is_complex() and not bool(v.any())

    def negative(v: Tensor) -> bool:
        return v.device.type != "meta" and v.is_floating_point() and bool((v < 0).any())

    if func in _ATEN_RELUS:
        return True
    if func in _THRESHOLDS:
        return zero(arg(1, "threshold")) and zero(arg(2, "value"))
    if func in _MAXIMA:  # the elementwise form only: max(x, 0) with an int is a reduction
        a, b = arg(0, "input"), arg(1, "other")
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return False
        # a scalar zero is written as one; a zero tensor as large as the other operand may be
        # an activation that happens to be 0 here: it counts where it removed a negative value
        return any(zero(z) or (all_zero(z) and negative(y)) for z, y in ((b, a), (a, b)))
    if func in (F.leaky_relu, F.leaky_relu_):
        slope = arg(1, "negative_slope")
        return slope is not None and zero(slope)
    if func in (F.hardtanh, F.hardtanh_):
        return zero(arg(1, "min_val")) and arg(2, "max_val") == float("inf")
    if func in (torch.clamp_min, Tensor.clamp_min, torch.clamp_min_, Tensor.clamp_min_):
        return zero(arg(1, "min"))
    return zero(arg(1, "min")) and arg(2, "max") is None


# A tensor's value read into Python: the way a forward's control flow can depend on its input.
_VALUE_READS = frozenset({
    Tensor.__bool__, Tensor.item, Tensor.__int__, Tensor.__float__, Tensor.__index__,
    Tensor.__complex__, Tensor.tolist, Tensor.numpy, torch.equal, Tensor.equal, torch.allclose,
    Tensor.allclose, torch.is_nonzero, Tensor.is_nonzero})


def _calling_module(depth: int = 2) -> tuple[nn.Module | None, str, Any]:
    """The innermost module whose method is on the Python stack, the ``file:line`` of the
    frame that made the call (our own frames and torch's skipped), and that method's frame."""
    frame = sys._getframe(depth)
    where = ""
    while frame is not None:
        code = frame.f_code
        if not where and not code.co_filename.startswith(_SKIP):
            where = f"{code.co_filename}:{frame.f_lineno} in {code.co_name}"
        owner = frame.f_locals.get("self") if "self" in code.co_varnames else None
        if isinstance(owner, nn.Module):
            return owner, where, frame
        frame = frame.f_back
    return None, where, None


def _caller(frame: Any, module: nn.Module) -> nn.Module | None:
    """The next module up the stack from ``frame`` other than ``module``."""
    frame = frame.f_back
    while frame is not None:
        code = frame.f_code
        owner = frame.f_locals.get("self") if "self" in code.co_varnames else None
        if isinstance(owner, nn.Module) and owner is not module:
            return owner
        frame = frame.f_back
    return None


_SKIP = (torch.__path__[0], __file__.rsplit("/", 1)[0])


def _is_relu_call(func: Any, module: nn.Module | None) -> bool:
    if func in _RELU_CALLS:
        return True
    return func in _HARDTANH and type(module) is nn.ReLU6


class _Application(NamedTuple):
    """One ReLU application seen by :class:`ReluRecorder`."""

    installed: bool  # made by an activation cap_relus installed
    module: nn.Module | None  # the innermost module whose method made it
    where: str  # file:line of the user frame that made it
    func: Any
    frame: Any  # the frame of ``module``'s method (kept for functional calls only)
    shape: tuple[int, ...] | None
    inplace: bool
    caller: nn.Module | None  # for an nn.ReLU/nn.ReLU6: the module that called it


class ReluRecorder(TorchFunctionMode):
    """Records each ReLU application of a forward pass (see :class:`_Application`).

    One recorder serves the self-check (count and place the plain ReLUs left) and discovery
    by running (``find_relus``/``cap_relus`` without a trace, and models fx cannot trace)."""

    def __init__(self):
        super().__init__()
        self.calls: list[_Application] = []
        # tensor values read into Python: (how and where, the innermost module reading it)
        self.reads: list[tuple[str, nn.Module | None]] = []
        # ReLUs written as clamp(min=0) or threshold(x, 0, 0): (module, where)
        self.relu_like: list[tuple[nn.Module | None, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _VALUE_READS:
            module, where, _ = _calling_module()
            self.reads.append((f"{getattr(func, '__name__', func)} at {where}", module))
        if func in _RELU_LIKE and _relu_like(func, args, kwargs):
            module, where, _ = _calling_module()
            self.relu_like.append((module, where))
        if func in _RELU_CALLS or func in _HARDTANH:
            module, where, frame = _calling_module()
            if _is_relu_call(func, module):
                inplace = func in _INPLACE_CALLS or bool(
                    kwargs.get("inplace", args[1] if len(args) > 1 else False))
                functional = module is None or type(module) not in (nn.ReLU, nn.ReLU6)
                self.calls.append(_Application(
                    module is not None and _MARK in module.__dict__, module, where, func,
                    frame if functional else None,
                    tuple(out.shape) if isinstance(out, Tensor) else None, inplace,
                    None if functional else _caller(frame, module)))
        return out
