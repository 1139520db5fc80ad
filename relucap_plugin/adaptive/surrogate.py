"""Surrogate gradients through every cap (BPDA) and the uncapped twin, without surgery.

Surrogate backward passes (``x`` is the cap's input, ``[low, c]`` its bounds; our own
activations and ``relu6``/``hardtanh(0, c)``/``clamp(x, 0, c)`` have ``low = 0``;
``torch.minimum(relu(x), c)`` and ``clamp(x, max=c)`` have no lower bound, ``low = -inf``):

- ``"ste"``: straight-through over the cap: ``1[x > low]`` (ReLU's gradient when ``low = 0``).
- ``"softcap"``: the derivative of the smooth cap
  ``softplus(t (x - low)) / t - softplus(t (x - c)) / t``, i.e. ``sigmoid(t (x - low)) -
  sigmoid(t (x - c))`` with ``t = temperature / (c - low)``, computed as
  ``sigmoid(t x') * sigmoid(-t (x' - w)) * (1 - exp(-t w))`` (``x' = x - low``, ``w = c - low``)
  so that saturated units keep a small, non-zero gradient in float32. Without a lower bound it
  is ``sigmoid(-t (x - c))`` with ``t = temperature / |c|``; an infinite cap gives the gradient
  of the lower bound alone.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .._torch import check_module
from .ops import (
    CAPPED_TYPES,
    _as_bound,
    _capped_out_of_place,
    _uncapped,
    eager_module,
    module_cap,
    tracking,
)

__all__ = ["DEFAULT_TEMPERATURE", "SURROGATE_MODES", "capped_sites", "surrogate_derivative",
           "surrogate_gradients", "uncapped_twin", "with_surrogate_gradients"]

SURROGATE_MODES = ("ste", "softcap")
#: ``t = DEFAULT_TEMPERATURE / cap`` for ``"softcap"``: the gradient is 0.76 at ``x = cap / 2``.
DEFAULT_TEMPERATURE = 4.0


def capped_sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every capped activation *module* of ours in ``model``
    (exact types). Caps written as ops are found by :func:`~relucap_plugin.adaptive.find_caps`."""
    check_module(model, "capped_sites")
    return [(name, m) for name, m in model.named_modules() if type(m) in CAPPED_TYPES]


def _check_surrogate(mode: str, temperature: float) -> tuple[str, float]:
    """The surrogate gradient's ``mode`` and ``temperature``, checked (one of
    :data:`SURROGATE_MODES`; a positive finite number)."""
    if mode not in SURROGATE_MODES:
        raise ValueError(f"surrogate mode must be one of {', '.join(map(repr, SURROGATE_MODES))}, "
                         f"got {mode!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number (got {temperature!r}); "
                         f"the default is {DEFAULT_TEMPERATURE}")
    return mode, float(temperature)


def surrogate_derivative(x: Tensor, cap: Tensor, mode: str, temperature: float,
                         low: Tensor | float = 0.0) -> Tensor:
    """d(activation)/dx that the surrogate backward uses, elementwise, shape of ``x``."""
    low = torch.as_tensor(low, dtype=x.dtype, device=x.device)
    has_low = torch.isfinite(low)
    low_grad = torch.where(has_low, (x > low).to(x.dtype), torch.ones_like(x))
    if mode == "ste":
        return low_grad
    finite = torch.isfinite(cap)
    lo = torch.where(has_low, low, torch.zeros_like(low))
    width = torch.where(has_low, cap - lo, cap.abs())
    width = torch.where(finite & (width > 0), width, torch.ones_like(width))
    t = temperature / width
    xs = x - lo
    two_sided = torch.sigmoid(t * xs) * torch.sigmoid(-t * (xs - width)) * -torch.expm1(-t * width)
    upper_only = torch.sigmoid(-t * (x - torch.where(finite, cap, torch.zeros_like(cap))))
    soft = torch.where(has_low, two_sided, upper_only)
    return torch.where(finite, soft, low_grad)


class _SurrogateGradient(torch.autograd.Function):
    """Returns the capped output ``y`` unchanged; its backward sends ``grad * g(x)`` to ``x``."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, low: Tensor, cap: Tensor, mode: str, temperature: float) -> Tensor:
        ctx.save_for_backward(x, low, cap)
        ctx.mode, ctx.temperature = mode, temperature
        return y.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, low, cap = ctx.saved_tensors
        g = grad * surrogate_derivative(x, cap, ctx.mode, ctx.temperature, low)
        return g, None, None, None, None, None


def _needs_grad(x: Any) -> bool:
    return torch.is_grad_enabled() and isinstance(x, Tensor) and x.requires_grad


class _Surrogate:
    """The tracker's handlers for the ``"surrogate"`` action."""

    def __init__(self, mode: str, temperature: float):
        self.mode, self.temperature = mode, temperature

    def op(self, path, func, cap, args, kwargs):
        if not _needs_grad(cap.x):
            return None
        x = cap.x.clone() if cap.inplace else cap.x
        y = _capped_out_of_place(func, _replace_x(cap, x) if cap.inplace else cap, args, kwargs)
        out = _SurrogateGradient.apply(x, y, _as_bound(cap.low, x, -math.inf),
                                       _as_bound(cap.high, x, math.inf), self.mode, self.temperature)
        if cap.inplace:
            return cap.x.copy_(out)
        return out

    def module(self, path, module, args, output):
        if not args or not _needs_grad(args[0]):
            return None
        x = args[0]
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        return _SurrogateGradient.apply(x, output, zero, module_cap(module, x), self.mode,
                                        self.temperature)


def _replace_x(cap, x):
    clone = copy.copy(cap)
    clone.x = x
    return clone


def _install(model: nn.Module, mode: str, temperature: float):
    handler = _Surrogate(mode, temperature)
    flipped = []
    for _, module in capped_sites(eager_module(model)):
        if getattr(module, "inplace", False):
            module.inplace = False  # the surrogate needs the input the activation would overwrite
            flipped.append(module)
    return tracking(model, "surrogate", handler.op, handler.module), flipped


@contextlib.contextmanager
def surrogate_gradients(
    model: nn.Module, mode: str = "ste", temperature: float = DEFAULT_TEMPERATURE
) -> Iterator[nn.Module]:
    """Within the block, every cap reached in ``model``'s forward back-propagates a surrogate.

    Caps are found however they are written (see :mod:`relucap_plugin.adaptive.ops`). Forward
    outputs stay bit-identical (in-place caps compute out of place meanwhile); the backward
    pass is ``"ste"`` or ``"softcap"`` (see the module docstring). Works for any attack library
    because it lives in the model. Hooks and ``inplace`` flags are restored on exit, also after
    an exception. Inside scripted submodules nothing changes (:func:`opaque_modules`); for a
    ``torch.compile``-d model, call its eager module (:func:`eager_module`) within the block.
    """
    mode, temperature = _check_surrogate(mode, temperature)
    check_module(model, "surrogate_gradients")
    tracker, flipped = _install(model, mode, temperature)
    try:
        yield model
    finally:
        tracker.remove()
        for module in flipped:
            module.inplace = True


def with_surrogate_gradients(
    model: nn.Module, mode: str = "ste", temperature: float = DEFAULT_TEMPERATURE
) -> nn.Module:
    """A deep copy of ``model`` whose caps always use the surrogate backward.

    The model transform counterpart of :func:`surrogate_gradients`; ``model`` is untouched.
    """
    mode, temperature = _check_surrogate(mode, temperature)
    clone = copy.deepcopy(eager_module(model))
    _install(clone, mode, temperature)
    return clone


def uncapped_twin(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every cap removed; ``model`` itself is untouched.

    The default surrogate of :class:`TransferAttack`. Conversions made by
    :func:`~relucap_plugin.surgery.cap_relus` are undone exactly by
    :func:`~relucap_plugin.surgery.uncap`; capped activations the model was built with are
    replaced by ``nn.ReLU`` (exact types, collected first and replaced second); caps written as
    ops (``clamp``, ``hardtanh``, ``relu6``, ``minimum``, ...) run without their upper bound
    (``relu`` where the lower bound is 0) through a forward hook the copy carries.
    """
    from ..surgery import is_converted, uncap

    check_module(model, "uncapped_twin")
    twin = copy.deepcopy(eager_module(model))
    if is_converted(twin):
        uncap(twin)
    sites = capped_sites(twin)
    for name, _ in sites:
        parent_name, _, child = name.rpartition(".")
        parent = twin.get_submodule(parent_name) if parent_name else twin
        if not child:
            raise ValueError("the model itself is a capped activation; there is nothing to uncap "
                             "inside it, use nn.ReLU() as the surrogate")
        setattr(parent, child, nn.ReLU())
    tracking(twin, "uncap", lambda path, func, cap, args, kwargs: _uncapped(cap))
    return twin
