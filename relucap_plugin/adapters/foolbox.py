"""Foolbox 3 adapter: the threat model mapped onto Foolbox's own parameters.

Quirks handled here: ``import foolbox`` imports GitPython, which fails without a git binary
unless ``GIT_PYTHON_REFRESH=quiet`` (set for the import only, then restored); ``PyTorchModel(device=None)`` moves
the model to ``cuda:0`` (the model's own device is always passed); inputs outside the bounds hit
a bare ``assert`` (the base class checks the bounds first, with a clear error); Foolbox's
``success`` also counts clean errors (it is not used: the evaluation recomputes predictions);
the clipped output is taken, i.e. minimum-norm results are projected onto the eps-ball.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import Any

import torch

from .._torch import float_dtype, model_device
from ..attacks import CallContext, Native
from . import LIBRARIES, ModelView, build_attack
from .base import From, LibraryAttack

__all__ = ["ALIASES", "ATTACKS", "LIBRARY", "build"]

LIBRARY = "foolbox"
_INFO = LIBRARIES[LIBRARY]


def _lib() -> ModuleType:
    """``import foolbox`` with GitPython's missing-git check silenced for the import only."""
    if "foolbox" in sys.modules:
        return sys.modules["foolbox"]
    saved = os.environ.get("GIT_PYTHON_REFRESH")
    os.environ["GIT_PYTHON_REFRESH"] = saved or "quiet"
    try:
        return _INFO.require()
    finally:
        if saved is None:
            os.environ.pop("GIT_PYTHON_REFRESH", None)


class FoolboxAttack(LibraryAttack):
    """Base of the Foolbox attacks: ``PyTorchModel`` on the model's device, the clipped output."""

    library = LIBRARY

    @classmethod
    def _library_class(cls) -> type:
        return getattr(_lib().attacks, cls.cls_name)

    def _to_native(self, param, field, value):
        return value.lower() if field == "norm" else value

    @classmethod
    def _from_native(cls, param, field, value, bounds):
        if field == "norm":
            return {"norm": {"linf": "Linf", "l2": "L2"}.get(str(value).lower(), value)}
        return {field: value}

    def _make(self, eps: float, num_classes: int) -> Any:
        return self._library_class()(**self._kwargs(eps, num_classes, self.batch_size or 0))

    def _fmodel(self, model, device, keep_modes: bool = False) -> Any:
        if keep_modes:
            model = ModelView(model, device=device, dtype=float_dtype(model, torch.float32), keep_modes=True)
        return _lib().PyTorchModel(model, bounds=self.threat_model.bounds, device=device, preprocessing=None)

    def _run(self, model, x, y, eps, target, ctx: CallContext):
        fb = _lib()
        criterion = (
            fb.criteria.TargetedMisclassification(target) if target is not None else fb.criteria.Misclassification(y)
        )
        _, clipped, _ = self._make(eps, ctx.num_classes)(self._fmodel(model, ctx.device), x, criterion, epsilons=eps)
        return clipped

    def _native(self, model, eps, *, input_shape, num_classes):
        fmodel = self._fmodel(model, model_device(model), keep_modes=True)
        return Native(fmodel, self._make(eps, num_classes or 10), {"epsilons": eps})


class _FastGradient(FoolboxAttack):
    """FGSM (Linf) / FGM (L2): one step of size eps from the clean input (no random start)."""

    family = "FGSM"
    losses = ("ce",)
    harness = {"random_start": "False (one step from the clean input)"}
    defaults = {"random_start": False}


class LinfFastGradientAttack(_FastGradient):
    native_name = cls_name = "LinfFastGradientAttack"
    norms = ("Linf",)


class L2FastGradientAttack(_FastGradient):
    native_name = cls_name = "L2FastGradientAttack"
    norms = ("L2",)


class LinfPGD(FoolboxAttack):
    family = "PGD"
    native_name = cls_name = "LinfPGD"
    norms, losses = ("Linf",), ("ce",)
    mapping = {"abs_stepsize": "step_size", "steps": "steps", "random_start": "random_start"}
    harness = {"rel_stepsize": "unused: abs_stepsize takes precedence"}


class L2PGD(LinfPGD):
    native_name = cls_name = "L2PGD"
    norms = ("L2",)


class L2CarliniWagnerAttack(FoolboxAttack):
    family = "CW"
    native_name = cls_name = "L2CarliniWagnerAttack"
    norms = ("L2",)
    minimum_norm = True
    mapping = {"steps": "steps"}
    defaults = {"binary_search_steps": 9, "stepsize": 0.01, "confidence": 0.0, "initial_const": 1e-3,
                "abort_early": True}


class LinfDeepFoolAttack(FoolboxAttack):
    """DeepFool over the ``min(10, classes)`` most likely classes (Foolbox's speed-up, explicit)."""

    family = "DeepFool"
    native_name = cls_name = "LinfDeepFoolAttack"
    norms = ("Linf",)
    minimum_norm, supports_targeted = True, False
    mapping = {"steps": "steps"}
    defaults = {"candidates": From("candidate_classes"), "overshoot": 0.02}


class L2DeepFoolAttack(LinfDeepFoolAttack):
    native_name = cls_name = "L2DeepFoolAttack"
    norms = ("L2",)


class BoundaryAttack(FoolboxAttack):
    """Decision-based; ``steps`` is its iteration count. Needs no gradients."""

    family = "Boundary"
    native_name = cls_name = "BoundaryAttack"
    dtypes = (torch.float32, torch.float64)  # fails in float16/bfloat16
    norms = ("L2",)
    minimum_norm, supports_targeted = True, False
    mapping = {"steps": "steps"}
    defaults = {"spherical_step": 1e-2, "source_step": 1e-2, "step_adaptation": 1.5}


class HopSkipJumpAttack(FoolboxAttack):
    """Decision-based; ``steps`` is its iteration count, the norm its ``constraint``."""

    family = "HopSkipJump"
    dtypes = (torch.float32, torch.float64)  # fails in float16/bfloat16
    native_name = cls_name = "HopSkipJumpAttack"
    minimum_norm, supports_targeted = True, False
    mapping = {"steps": "steps", "constraint": "norm"}
    defaults = {"initial_gradient_eval_steps": 100, "max_gradient_eval_steps": 10000, "gamma": 1.0}


ATTACKS: dict[str, type[FoolboxAttack]] = {
    cls.native_name: cls
    for cls in (
        LinfFastGradientAttack, L2FastGradientAttack, LinfPGD, L2PGD, L2CarliniWagnerAttack,
        LinfDeepFoolAttack, L2DeepFoolAttack, BoundaryAttack, HopSkipJumpAttack,
    )
}
ALIASES: dict[str, tuple[Any, dict[str, Any]]] = {
    "FGSM": ({"Linf": "LinfFastGradientAttack", "L2": "L2FastGradientAttack"}, {}),
    "FGM": ("L2FastGradientAttack", {}),
    "PGD": ({"Linf": "LinfPGD", "L2": "L2PGD"}, {}),
    "LinfProjectedGradientDescentAttack": ("LinfPGD", {}),
    "L2ProjectedGradientDescentAttack": ("L2PGD", {}),
    "CW": ("L2CarliniWagnerAttack", {}),
    "CW-L2": ("L2CarliniWagnerAttack", {}),
    "DeepFool": ({"Linf": "LinfDeepFoolAttack", "L2": "L2DeepFoolAttack"}, {}),
    "Boundary": ("BoundaryAttack", {}),
    "HopSkipJump": ("HopSkipJumpAttack", {}),
    "HSJ": ("HopSkipJumpAttack", {}),
}


def build(name, threat_model, overrides, batch_size=None):
    return build_attack(LIBRARY, ATTACKS, ALIASES, name, threat_model, overrides, batch_size)


def from_native(obj, threat_model, eps=None, batch_size=None):
    """The attack configured like the Foolbox attack object ``obj`` run at ``eps`` (its
    epsilons; None: the threat model's), or None if ``obj`` is not one of ours."""
    member = FoolboxAttack.member_for(ATTACKS, obj)
    return None if member is None else member.from_native(obj, threat_model, eps, batch_size=batch_size)
