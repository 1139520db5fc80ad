"""Caps however they are written: find them, and change their backward or their upper bound.

A cap is an op with a finite upper bound applied to a *hidden activation* inside the model's
forward: ``torch.clamp``/``clip``/``clamp_max`` (functions, ``Tensor`` methods and their in-place
forms, scalar or tensor bounds), ``F.hardtanh``/``nn.Hardtanh``, ``F.relu6``/``nn.ReLU6``,
``torch.minimum``/``min``/``fmin`` of an activation and a constant, in the user's own modules or
anywhere in the forward; plus our own capped activations (:data:`CAPPED_TYPES`, by exact type).

How (our own design): a :class:`torch.overrides.TorchFunctionMode` is active only while the
model's root ``forward`` runs (entered by a forward pre-hook, left by an always-called forward
hook), so the input clipping of an attack and its projection are never touched. Every tensor
an op returns inside the forward is tagged: *input-derived* if an argument was, *hidden* if an
argument was hidden or an ``nn.Parameter`` met input-derived data (``F.linear``, ``conv``, a
learned scale). Clipping the raw input to [0, 1] or a normalisation with buffers is therefore not
a cap; anything after the first learned layer is. A bound must not depend on the input.
Per-module hooks keep the path of the module whose forward is running, which names each site.

Three actions share that machinery: ``"record"`` lists the sites (:func:`find_caps`) and their
saturation (:func:`cap_statistics`); ``"surrogate"`` keeps every cap's output bit for bit and
sends a surrogate gradient to its input (BPDA); ``"uncap"`` drops the upper bound (the uncapped
twin). Scripted submodules cannot be seen into: :func:`opaque_modules` names them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .._torch import check_module
from ..activations import CappedReLU, DynamicCappedReLU, LearnableCappedReLU, channel_view

__all__ = ["CAPPED_TYPES", "CapScan", "CapSite", "cap_statistics", "eager_module", "find_caps",
           "module_cap", "opaque_modules"]

#: Our capped activations, handled as modules (matched by exact type).
CAPPED_TYPES: tuple[type[nn.Module], ...] = (CappedReLU, LearnableCappedReLU, DynamicCappedReLU)

_INPUT, _HIDDEN = 1, 2
_TAG = "_relucap_tag"


def module_cap(module: nn.Module, x: Tensor) -> Tensor:
    """The cap of a capped activation as a tensor broadcastable to its input ``x`` (N, C, *)."""
    if isinstance(module, CappedReLU):
        cap = module.cap
    elif isinstance(module, LearnableCappedReLU):
        cap = module.cap.detach()
    elif isinstance(module, DynamicCappedReLU):
        cap = (module.running_cap * module.scale).detach()
    else:
        raise TypeError(f"{type(module).__name__} is not a capped activation ({CAPPED_TYPES})")
    cap = torch.as_tensor(cap, dtype=x.dtype, device=x.device)
    return channel_view(cap, x) if cap.dim() > 0 else cap


def eager_module(model: nn.Module) -> nn.Module:
    """The eager module behind a ``torch.compile``-d one (same forward, no compilation)."""
    inner = getattr(model, "_orig_mod", None)
    return inner if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module) else model


def opaque_modules(model: nn.Module) -> list[str]:
    """Paths of the outermost scripted or traced submodules (``""`` = the model): no op inside
    them is seen."""
    out: list[str] = []
    for name, m in eager_module(model).named_modules():
        inside = any(name == p or name.startswith(p + ".") or p == "" for p in out)
        if isinstance(m, torch.jit.ScriptModule) and not inside:
            out.append(name)
    return out


# ------------------------------------------------------------------------------ op table
@dataclass
class _Cap:
    """One cap op call: the activation ``x``, its bounds, and how to compute it without them."""

    x: Tensor
    low: Any
    high: Any
    inplace: bool
    op: str
    other: Tensor | None = None


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _clamp(args, kwargs, op, inplace):
    return _Cap(args[0], _arg(args, kwargs, 1, "min"), _arg(args, kwargs, 2, "max"), inplace, op)


def _clamp_max(args, kwargs, op, inplace):
    return _Cap(args[0], None, _arg(args, kwargs, 1, "max"), inplace, op)


def _hardtanh(args, kwargs, op, inplace):
    inplace = inplace or bool(_arg(args, kwargs, 3, "inplace", False))
    return _Cap(args[0], _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0),
                inplace, op)


def _relu6(args, kwargs, op, inplace):
    return _Cap(args[0], 0.0, 6.0, bool(_arg(args, kwargs, 1, "inplace", False)), op)


def _minimum(args, kwargs, op, inplace):
    a, b = args[0], _arg(args, kwargs, 1, "other")
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
        return None  # torch.min(x) / x.min(dim): a reduction, not a cap
    if _level(b) == _HIDDEN and _level(a) < _HIDDEN:
        a, b = b, a
    return _Cap(a, None, b, False, op, other=b)


def _op_table() -> dict[Any, tuple[Callable, str, bool]]:
    table: dict[Any, tuple[Callable, str, bool]] = {}
    for owner in (torch, torch.Tensor):
        for name, parse in (("clamp", _clamp), ("clip", _clamp), ("clamp_max", _clamp_max),
                            ("minimum", _minimum), ("min", _minimum), ("fmin", _minimum)):
            for suffix in ("", "_"):
                func = getattr(owner, name + suffix, None)
                if func is not None:
                    table[func] = (parse, name + suffix, suffix == "_")
    table[F.hardtanh] = (_hardtanh, "hardtanh", False)
    table[F.hardtanh_] = (_hardtanh, "hardtanh_", True)
    table[F.relu6] = (_relu6, "relu6", False)
    return table


_OPS = _op_table()


def _level(t: Any) -> int:
    tag = getattr(t, _TAG, None) if isinstance(t, Tensor) else None
    return tag[1] if tag is not None and tag[0] == _Tracker.generation else 0


def _finite_bound(v: Any) -> bool:
    if v is None:
        return False
    if isinstance(v, Tensor):
        return _level(v) == 0 and bool(torch.isfinite(v).all())
    return isinstance(v, (int, float)) and math.isfinite(v)


def _bound_text(v: Any) -> str:
    if v is None:
        return "-inf"
    if isinstance(v, Tensor):
        lo, hi = v.min().item(), v.max().item()
        return f"{lo:g}" if lo == hi else f"[{lo:g}..{hi:g}] ({v.numel()} values)"
    return f"{v:g}"


def _as_bound(v: Any, x: Tensor, default: float) -> Tensor:
    if v is None:
        return torch.tensor(default, dtype=x.dtype, device=x.device)
    return torch.as_tensor(v, dtype=x.dtype, device=x.device)


def _uncapped(cap: _Cap) -> Tensor:
    """The cap op without its upper bound (``min`` of an activation and a constant: the activation)."""
    x, low = cap.x, cap.low
    if cap.other is not None or low is None:
        return x
    if not isinstance(low, Tensor) and low == 0:
        return F.relu(x, inplace=cap.inplace)
    return x.clamp_(min=low) if cap.inplace else torch.clamp(x, min=low)


def _capped_out_of_place(func: Any, cap: _Cap, args: tuple, kwargs: dict) -> Tensor:
    if not cap.inplace:
        return func(*args, **kwargs)
    if cap.op.startswith("hardtanh"):
        return F.hardtanh(cap.x, cap.low, cap.high)
    if cap.op == "relu6":
        return F.relu6(cap.x)
    return torch.clamp(cap.x, min=cap.low, max=cap.high)


# ------------------------------------------------------------------------------ sites
@dataclass
class CapSite:
    """A cap reached in the forward: module ``path`` (``""`` = the model), ``op`` (``"clamp"``,
    ``"hardtanh"``, ... or our activation's class name), bounds as text, and how many calls."""

    path: str
    op: str
    low: str
    high: str
    calls: int = 1

    @property
    def key(self) -> str:
        return f"{self.path or '<model>'}:{self.op}"

    def __str__(self) -> str:
        return f"{self.key} [{self.low}, {self.high}]" + (f" x{self.calls}" if self.calls > 1 else "")


@dataclass
class CapScan:
    """What :func:`find_caps` saw: the ``sites`` reached and the ``opaque`` (scripted) modules."""

    sites: list[CapSite] = field(default_factory=list)
    opaque: list[str] = field(default_factory=list)

    @property
    def warning(self) -> str | None:
        """A sentence for the results when no cap can be reached inside scripted code."""
        if not self.opaque:
            return None
        where = ", ".join(p or "<model>" for p in self.opaque[:5])
        return (f"scripted/traced module(s) {where}: caps inside them cannot be reached, so BPDA "
                "and the uncapped twin act as plain PGD/the model itself there; evaluate the eager "
                "(unscripted) model for an honest worst case")

    def __bool__(self) -> bool:
        return bool(self.sites)


# ------------------------------------------------------------------------------ the tracker
class _Tracker(TorchFunctionMode):
    """Module-path stack + op interception for one action on one model (see the module doc)."""

    generation = 0

    def __init__(self, action: str, handler: Callable[..., Tensor | None] | None = None,
                 module_handler: Callable[..., Tensor | None] | None = None):
        super().__init__()
        self.action = action
        self.handler = handler
        self.module_handler = module_handler
        self.stack: list[tuple[str, nn.Module]] = []
        self.calls: dict[tuple[str, str], int] = {}
        self.handles: list[Any] = []
        self.depth = 0

    # -- hooks -----------------------------------------------------------------------------
    def install(self, model: nn.Module) -> _Tracker:
        for name, module in eager_module(model).named_modules():
            if isinstance(module, torch.jit.ScriptModule):
                continue
            root = module is eager_module(model)
            self.handles.append(module.register_forward_pre_hook(self._pre(name, root)))
            self.handles.append(module.register_forward_hook(self._post(root), always_call=True))
        return self

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _pre(self, name: str, root: bool):
        def hook(module, args):
            if root:
                self.depth += 1
                if self.depth == 1:
                    _Tracker.generation += 1
                    self.calls.clear()
                    for a in args:
                        if isinstance(a, Tensor):
                            setattr(a, _TAG, (_Tracker.generation, _INPUT))
                    self.__enter__()
            self.stack.append((name, module))
        return hook

    def _post(self, root: bool):
        def hook(module, args, output):
            out = None
            try:
                if (type(module) in CAPPED_TYPES and self.module_handler is not None and self.stack
                        and isinstance(output, Tensor)):
                    out = self.module_handler(self.stack[-1][0], module, args, output)
            finally:
                if self.stack:
                    self.stack.pop()
                if root:
                    self.depth -= 1
                    if self.depth == 0:
                        self.__exit__(None, None, None)
            return out
        return hook

    # -- ops -------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = None
        entry = _OPS.get(func)
        if entry is not None and self.stack and type(self.stack[-1][1]) not in CAPPED_TYPES:
            parse, op, inplace = entry
            cap = parse(args, kwargs, op, inplace)
            if cap is not None and _level(cap.x) == _HIDDEN and _finite_bound(cap.high):
                path = self.stack[-1][0]
                k = self.calls.get((path, op), 0)
                self.calls[(path, op)] = k + 1
                out = self.handler(path, func, cap, args, kwargs)
        if out is None:
            out = func(*args, **kwargs)
        self._tag(func, args, kwargs, out)
        return out

    @staticmethod
    def _tag(func, args, kwargs, out) -> None:
        name = getattr(func, "__name__", "")
        if name.endswith("_like") or name.startswith("new_"):
            return
        level, param = 0, False
        for a in _tensors(args, kwargs):
            if isinstance(a, nn.Parameter):
                param = True
            else:
                level = max(level, _level(a))
        if level == 0:
            return
        if param:
            level = _HIDDEN
        tag = (_Tracker.generation, level)
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(o, Tensor) and not isinstance(o, nn.Parameter) and _level(o) < level:
                try:
                    setattr(o, _TAG, tag)
                except (AttributeError, RuntimeError):
                    pass


def _tensors(args: tuple, kwargs: dict) -> Iterator[Tensor]:
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            yield a
        elif isinstance(a, (tuple, list)):
            yield from (t for t in a if isinstance(t, Tensor))


def tracking(model: nn.Module, action: str, handler, module_handler=None) -> _Tracker:
    """Install a tracker on ``model`` (remove it with ``.remove()``)."""
    return _Tracker(action, handler, module_handler).install(model)


# ------------------------------------------------------------------------------ record
def _site_stats(x: Tensor, low: Tensor, high: Tensor) -> dict[str, float]:
    x = x.detach()
    if not bool(torch.isfinite(low).all()) and x.numel() and float(x.min()) >= 0:
        low = torch.zeros_like(low)  # minimum(relu(z), c): relu's zero is the flat lower region
    lo_flat = x <= low
    hi_flat = x >= high
    flat = (lo_flat | hi_flat).reshape(x.shape[0], -1) if x.dim() > 1 else (lo_flat | hi_flat)[None]
    return {"below_zero": lo_flat.float().mean().item(), "at_cap": hi_flat.float().mean().item(),
            "blocked": flat.all(1).float().mean().item()}


def _scan(model: nn.Module, x: Tensor) -> tuple[dict[str, CapSite], dict[str, dict[str, float]]]:
    sites: dict[str, CapSite] = {}
    stats: dict[str, dict[str, float]] = {}

    def note(path: str, op: str, xin: Tensor, low: Any, high: Any) -> None:
        key = f"{path or '<model>'}:{op}"
        if key in sites:
            sites[key].calls += 1
            key = f"{key}#{sites[key].calls}"
        else:
            sites[key] = CapSite(path, op, _bound_text(low), _bound_text(high))
        lo = _as_bound(low, xin, -math.inf)
        hi = _as_bound(high, xin, math.inf)
        stats[key] = _site_stats(xin, lo, hi)

    def on_op(path, func, cap, args, kwargs):
        note(path, cap.op, cap.x, cap.low, cap.high)
        return None

    def on_module(path, module, args, output):
        if args and isinstance(args[0], Tensor):
            note(path, type(module).__name__, args[0], 0.0, module_cap(module, args[0]))
        return None

    from .._torch import caller_state, model_device

    net = eager_module(model)
    tracker = tracking(net, "record", on_op, on_module)
    try:
        with torch.no_grad(), caller_state(net):
            net(x.to(model_device(net, x.device)))
    finally:
        tracker.remove()
    return sites, stats


def find_caps(model: nn.Module, example_input: Tensor) -> CapScan:
    """Every cap the forward pass of ``example_input`` (N, ...) reaches, however it is written.

    Runs one forward pass (eval mode, ``no_grad``; the model's state is restored). Sites are
    listed once with the number of calls; scripted submodules are listed as ``opaque``.
    """
    check_module(model, "find_caps")
    if not isinstance(example_input, Tensor):
        raise TypeError("example_input must be a tensor (N, ...) the model accepts, e.g. x[:8], got "
                        f"{type(example_input).__name__}")
    sites, _ = _scan(model, example_input)
    return CapScan(list(sites.values()), opaque_modules(model))


def cap_statistics(model: nn.Module, x: Tensor) -> dict[str, dict[str, float]]:
    """Per cap site (``"path:op"``): fraction of units at or below the lower bound, at or above
    the cap, and of samples with every unit in one of those flat regions (``blocked``)."""
    return _scan(model, x)[1]
