"""Capping that survives eager-mode quantization: ``cap_relus(model, cap, quantizable=True)``.

torchvision's ``quantization.*`` models are quantized with ``model.fuse_model()`` (which looks
up exact ``nn.ReLU`` types after conv/bn by attribute name) and ``torch.ao.quantization.prepare``
/ ``convert`` (which swap ``nn.ReLU``, fused modules and ``FloatFunctional`` for quantized ones
by exact type). A ``CappedReLU`` in place of the ReLU, or a regenerated forward that inlines
``FloatFunctional.add_relu``, breaks both. This mode (our own design) keeps every module the
quantization flow looks for and adds the cap where that flow carries it along:

- an ``nn.ReLU``/``nn.ReLU6`` site keeps its module and gets a forward hook that clamps its
  output at the cap. ``fuse_modules`` moves the hooks of the last fused module onto the fused
  module, and ``convert`` keeps forward hooks when it swaps a module, so the cap is applied
  after the fused (and later quantized) conv-bn-relu;
- a ``FloatFunctional`` is wrapped in a :class:`CappedFunctional` that calls it (as its child
  ``inner``, which prepare/convert swap for a ``QFunctional``) and clamps the result of
  ``add_relu``; every other method passes through unchanged.

``torch.clamp`` runs on float and quantized tensors alike (a quantized output keeps its scale
and zero point, so the observer of the module before the cap sets the resolution).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten
from torch.ao.nn.intrinsic.modules.fused import _FusedModule
from torch.ao.nn.quantized import FloatFunctional

from .._torch import all_modules
from ._records import (_RECORDS, CapReport, ConversionCheckError, _check_model, _path_of,
                       _Record)
from ._copy import copy_model
from .verify import reference_run

_RELU_TYPES = (nn.ReLU, nn.ReLU6)


def _clamp(x: Tensor, cap: float) -> Tensor:
    """``clamp(x, 0, cap)`` for float and quantized ``x``. A quantized ``x`` is made contiguous
    first: with the qnnpack engine, torch 2.14's quantized clamp/hardtanh on a channels_last
    tensor (what quantized convs return) writes channels_last data with contiguous strides,
    scrambling the channels (measured: errors up to the cap itself)."""
    if x.is_quantized:
        x = x.contiguous()
    return torch.clamp(x, 0.0, cap)


class _CapHook:
    """Forward hook clamping a ReLU module's output at ``cap`` (picklable, deep-copyable)."""

    def __init__(self, cap: float):
        self.cap = cap

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        if getattr(module, "inplace", False) and not output.is_quantized:
            return output.clamp_(0.0, self.cap)
        return _clamp(output, self.cap)

    def __repr__(self) -> str:
        return f"_CapHook(cap={self.cap:g})"


class CappedFunctional(nn.Module):
    """A ``FloatFunctional`` whose ``add_relu`` is capped: ``min(relu(x + y), cap)``.

    The wrapped ``FloatFunctional`` is the child ``inner``, so eager quantization observes and
    swaps it as usual; the clamp is applied to its (float or quantized) result.
    """

    def __init__(self, inner: nn.Module, cap: float):
        super().__init__()
        self.inner = inner
        self.cap = float(cap)

    def add_relu(self, x: Tensor, y: Tensor) -> Tensor:
        return _clamp(self.inner.add_relu(x, y), self.cap)

    def add(self, x: Tensor, y: Tensor) -> Tensor:
        return self.inner.add(x, y)

    def add_scalar(self, x: Tensor, y: float) -> Tensor:
        return self.inner.add_scalar(x, y)

    def mul(self, x: Tensor, y: Tensor) -> Tensor:
        return self.inner.mul(x, y)

    def mul_scalar(self, x: Tensor, y: float) -> Tensor:
        return self.inner.mul_scalar(x, y)

    def cat(self, x: list[Tensor], dim: int = 0) -> Tensor:
        return self.inner.cat(x, dim=dim)

    def matmul(self, x: Tensor, y: Tensor) -> Tensor:
        return self.inner.matmul(x, y)

    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError("CappedFunctional, like FloatFunctional, is called through its "
                           "methods (add_relu, add, cat, ...), not as a module")

    def extra_repr(self) -> str:
        return f"cap={self.cap:g} (on add_relu)"


def refuse_fused(model: nn.Module) -> None:
    """Raise if a ReLU sits inside a module ``fuse_modules`` made (``ConvReLU2d``, ...):
    ``convert`` rebuilds such a module from its conv alone and applies a plain ReLU, so a cap
    installed there would vanish from the quantized model without a word."""
    for module in all_modules(model):
        if isinstance(module, _FusedModule):
            if any(type(m) in _RELU_TYPES for m in module.children()):
                raise ValueError(
                    f"cap_relus: {_path_of(model, module)!r} is a fused {type(module).__name__} (from fuse_model() "
                    "or fuse_modules): torch.ao.quantization.convert rebuilds it with a plain "
                    "ReLU, so a cap installed inside it would be lost. Cap the model before "
                    "fusing: cap_relus(model, cap, quantizable=True), then model.fuse_model()")


def _numeric_cap(cap: Any) -> float:
    ok = isinstance(cap, (int, float)) and not isinstance(cap, bool)
    if not ok or math.isnan(cap) or cap <= 0:
        raise TypeError(
            f"cap_relus(..., quantizable=True) takes one positive number or math.inf as cap "
            f"(got {cap!r}); per-site mappings, per-channel tensors and activation specs have no "
            "quantized kernel: use cap_relus(model, cap) for a float model instead")
    return float(cap)


def cap_quantizable(model: nn.Module, cap: Any, sites: Any, example_input: Any,
                    inplace: bool) -> tuple[nn.Module, CapReport]:
    """The ``quantizable=True`` path of :func:`cap_relus` (see the module docstring).

    Self-check: the result must give bit-identical outputs to the float conversion
    ``cap_relus(model, cap)`` (itself self-checked against the original) on the check input,
    and every ReLU site must be an ``nn.ReLU``/``nn.ReLU6`` module or a ``FloatFunctional``
    ``add_relu`` call; anything else raises with the model unchanged.
    """
    from .convert import cap_relus  # convert imports this module

    _check_model(model, "cap_relus")
    value = _numeric_cap(cap)
    if sites is not None:
        raise TypeError(
            "cap_relus(..., quantizable=True) caps every site (got sites=...): select sites "
            "with the float path cap_relus(model, cap, sites=...), which is not quantizable")
    reference, float_report = cap_relus(model, cap, example_input=example_input)
    found = float_report.sites
    args, _, unchecked = reference_run(reference, example_input)
    target = model if inplace else copy_model(model)
    functionals = [(p, m) for p, m in target.named_modules() if type(m) is FloatFunctional]
    relus = [m for m in target.modules() if type(m) in _RELU_TYPES]
    functional_sites = [s.name for s in found if s.kind != "module"]
    if functional_sites and (args is None
                             or _add_relu_calls(target, functionals, args) != len(functional_sites)):
        raise ValueError(
            f"cap_relus(..., quantizable=True): of the function/method ReLU sites "
            f"{functional_sites}, some are not FloatFunctional.add_relu calls (or no input ran "
            "to tell: pass example_input); eager quantization can neither fuse nor cap them. "
            "Only nn.ReLU/nn.ReLU6 modules and FloatFunctional.add_relu are supported: replace "
            "the others by modules in the model code, or use cap_relus(model, cap) for a "
            "float model")
    record = _Record()
    if not math.isinf(value):
        for module in relus:
            bound = min(value, 6.0) if type(module) is nn.ReLU6 else value
            hook = _CapHook(bound)
            module.register_forward_hook(hook)
            record.hooks.append((module, hook))
        for path, module in functionals:
            parent_path, _, name = path.rpartition(".")
            parent = target.get_submodule(parent_path)
            parent._modules[name] = capped = CappedFunctional(module, value)
            record.replaced.append((parent, name, module))
            record.installed.append(capped)
    target.__dict__.setdefault(_RECORDS, []).append(record)
    notes = tuple(float_report.warnings)
    if args is None:
        check = f"not run: {unchecked}"
        notes += (f"cap_relus(..., quantizable=True): the conversion was not self-checked: "
                  f"{unchecked}",)
        warnings.warn(notes[-1], UserWarning, stacklevel=3)
    else:
        try:
            check = _check_against(target, reference, args, len(relus), len(functionals))
        except ConversionCheckError:
            target.__dict__[_RECORDS].pop()
            if not target.__dict__[_RECORDS]:
                target.__dict__.pop(_RECORDS)
            record.undo()
            raise
    how = {s.name: "hook" if s.kind == "module" else "functional" for s in found}
    return target, CapReport(
        model=target, method="quantizable", rewritten=(), sites=found,
        replaced={n: f"clamp(0, {value:g})" for n in how},
        paths={s.name: s.module_path or s.owner for s in found},
        warnings=notes, _record=record, how=how, check=check)


def _add_relu_calls(model: nn.Module, functionals: list, args: tuple) -> int:
    """How many ``FloatFunctional.add_relu`` calls one forward of ``args`` makes."""
    calls = []
    for _, module in functionals:
        method = module.add_relu
        module.__dict__["add_relu"] = (
            lambda x, y, _m=method: calls.append(1) or _m(x, y))
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for _, module in functionals:
            module.__dict__.pop("add_relu", None)
    return len(calls)


def _check_against(target: nn.Module, reference: nn.Module, args: tuple | None,
                   n_modules: int, n_functionals: int) -> str:
    """``target`` must match the float conversion ``reference`` bit for bit on ``args``."""
    with torch.no_grad():
        want, got = tree_flatten(reference(*args))[0], tree_flatten(target(*args))[0]
    same = len(want) == len(got) and all(
        torch.equal(w, g) if isinstance(w, Tensor) else w == g for w, g in zip(want, got))
    if not same:
        worst = max(((w - g).abs().max().item() for w, g in zip(want, got)
                     if isinstance(w, Tensor) and w.shape == g.shape), default=math.inf)
        raise ConversionCheckError(
            f"cap_relus(..., quantizable=True): the quantizable form differs from the float "
            f"conversion by up to {worst:.3g} on the check input: some ReLU is applied where "
            "no hook or CappedFunctional caps it. Use cap_relus(model, cap) for a float "
            "model, and report the model")
    return (f"passed: bit-identical to cap_relus(model, cap) on the check input; "
            f"{n_modules} ReLU modules hooked, {n_functionals} FloatFunctional wrapped")
