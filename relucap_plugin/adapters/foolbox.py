"""Foolbox 3 adapter: the threat model mapped onto Foolbox's own parameters.

Quirks handled here: ``import foolbox`` imports GitPython, which fails without a git binary
unless ``GIT_PYTHON_REFRESH=quiet`` (set before the import); ``PyTorchModel(device=None)`` moves
the model to ``cuda:0`` (the model's own device is always passed); inputs outside the bounds hit
a bare ``assert`` (the base class checks the bounds first, with a clear error); Foolbox's
``success`` also counts clean errors (it is not used: the evaluation recomputes predictions);
the clipped output is taken, i.e. minimum-norm results are projected onto the eps-ball.
"""

from __future__ import annotations

import inspect
import os
from types import ModuleType
from typing import Any, ClassVar

import torch

from ..attacks import Attack, CallContext, Native, model_device
from . import LIBRARIES, build_attack

__all__ = ["ALIASES", "ATTACKS", "LIBRARY", "build"]

LIBRARY = "foolbox"
_INFO = LIBRARIES[LIBRARY]


def _lib() -> ModuleType:
    """``import foolbox`` with GitPython's missing-git check silenced."""
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    return _INFO.require()


class FoolboxAttack(Attack):
    """Base of the Foolbox attacks: ``PyTorchModel`` on the model's device, the clipped output."""

    library = LIBRARY
    cls_name: ClassVar[str] = ""

    def _kwargs(self, eps: float, num_classes: int) -> dict[str, Any]:
        """Constructor arguments from the threat model."""
        raise NotImplementedError

    def _mapped_parameters(self) -> dict[str, Any]:
        return self._kwargs(self.threat_model.eps[0], 10)

    def _accepted_overrides(self) -> list[str]:
        params = inspect.signature(getattr(_lib().attacks, self.cls_name)).parameters
        return [p for p in params if p not in ("self", *self._mapped_parameters())]

    def _make(self, eps: float, num_classes: int) -> Any:
        kwargs = {**self._kwargs(eps, num_classes), **self._library_defaults(num_classes), **self.overrides}
        return getattr(_lib().attacks, self.cls_name)(**kwargs)

    def _fmodel(self, model, device) -> Any:
        return _lib().PyTorchModel(model, bounds=self.threat_model.bounds, device=device, preprocessing=None)

    def _run(self, model, x, y, eps, target, ctx: CallContext):
        fb = _lib()
        criterion = (
            fb.criteria.TargetedMisclassification(target) if target is not None else fb.criteria.Misclassification(y)
        )
        _, clipped, _ = self._make(eps, ctx.num_classes)(self._fmodel(model, ctx.device), x, criterion, epsilons=eps)
        return clipped

    def _native(self, model, eps, *, input_shape, num_classes):
        return Native(self._fmodel(model, model_device(model)), self._make(eps, num_classes or 10), {"epsilons": eps})


class _FastGradient(FoolboxAttack):
    """FGSM (Linf) / FGM (L2): one step of size eps from the clean input (no random start)."""

    family = "FGSM"
    losses = ("ce",)

    def _kwargs(self, eps, num_classes):
        return {"random_start": False}


class LinfFastGradientAttack(_FastGradient):
    native_name = cls_name = "LinfFastGradientAttack"
    norms = ("Linf",)


class L2FastGradientAttack(_FastGradient):
    native_name = cls_name = "L2FastGradientAttack"
    norms = ("L2",)


class LinfPGD(FoolboxAttack):
    family = "PGD"
    native_name = cls_name = "LinfPGD"
    norms = ("Linf",)
    losses = ("ce",)

    def _kwargs(self, eps, num_classes):
        tm = self.threat_model
        return {"abs_stepsize": tm.step_size_for(eps), "steps": tm.steps, "random_start": tm.random_start}

    def _mapped_parameters(self):
        return {**super()._mapped_parameters(), "rel_stepsize": "unused: abs_stepsize takes precedence"}


class L2PGD(LinfPGD):
    native_name = cls_name = "L2PGD"
    norms = ("L2",)


class L2CarliniWagnerAttack(FoolboxAttack):
    family = "CW"
    native_name = cls_name = "L2CarliniWagnerAttack"
    norms = ("L2",)
    minimum_norm = True

    def _kwargs(self, eps, num_classes):
        return {"steps": self.threat_model.steps}

    def _library_defaults(self, num_classes):
        return {"binary_search_steps": 9, "stepsize": 0.01, "confidence": 0.0, "initial_const": 1e-3,
                "abort_early": True}


class LinfDeepFoolAttack(FoolboxAttack):
    """DeepFool over the ``min(10, classes)`` most likely classes (Foolbox's speed-up, explicit)."""

    family = "DeepFool"
    native_name = cls_name = "LinfDeepFoolAttack"
    norms = ("Linf",)
    minimum_norm = True
    supports_targeted = False

    def _kwargs(self, eps, num_classes):
        return {"steps": self.threat_model.steps}

    def _library_defaults(self, num_classes):
        return {"candidates": min(10, num_classes), "overshoot": 0.02}


class L2DeepFoolAttack(LinfDeepFoolAttack):
    native_name = cls_name = "L2DeepFoolAttack"
    norms = ("L2",)


class BoundaryAttack(FoolboxAttack):
    """Decision-based; ``steps`` is its iteration count. Needs no gradients."""

    family = "Boundary"
    dtypes = (torch.float32, torch.float64)  # fails in float16/bfloat16
    native_name = cls_name = "BoundaryAttack"
    norms = ("L2",)
    minimum_norm = True
    supports_targeted = False

    def _kwargs(self, eps, num_classes):
        return {"steps": self.threat_model.steps}

    def _library_defaults(self, num_classes):
        return {"spherical_step": 1e-2, "source_step": 1e-2, "step_adaptation": 1.5}


class HopSkipJumpAttack(FoolboxAttack):
    """Decision-based; ``steps`` is its iteration count, the norm its ``constraint``."""

    family = "HopSkipJump"
    dtypes = (torch.float32, torch.float64)  # fails in float16/bfloat16
    native_name = cls_name = "HopSkipJumpAttack"
    minimum_norm = True
    supports_targeted = False

    def _kwargs(self, eps, num_classes):
        return {"steps": self.threat_model.steps, "constraint": self.threat_model.norm.lower()}

    def _library_defaults(self, num_classes):
        return {"initial_gradient_eval_steps": 100, "max_gradient_eval_steps": 10000, "gamma": 1.0}


ATTACKS: dict[str, type[Attack]] = {
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
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    return build_attack(LIBRARY, ATTACKS, ALIASES, name, threat_model, overrides, batch_size)
